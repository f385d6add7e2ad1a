"""Saving and loading converted models as Hugging Face users do: save_pretrained +
from_pretrained come back right (the merged weights are written beside the factors), a plain
checkpoint is refused by a converted model instead of leaving its adapters as they are, and
adapter-only Trainer checkpoints (rt.AdapterCheckpointCallback) hold no frozen base, resume
exactly, and are refused by from_pretrained."""

from __future__ import annotations

import os

import pytest
from conftest import assert_same_outputs

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[data]'")

import rankopt.torch as rt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bert(seed=0, dropout=0.1, dtype=torch.float32):
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def _gpt2(seed=0, dropout=0.1, dtype=torch.float32):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=dropout,
                                  embd_pdrop=dropout, attn_pdrop=dropout)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


MODELS = {
    "bert": (_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "gpt2": (_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
}


def _converted(kind, seed=0, adapter_seed=None, **kw):
    make, opts = MODELS[kind]
    seed_ad = seed if adapter_seed is None else adapter_seed
    return rt.apply_low_rank(make(seed=seed, **kw), rank=4, seed=seed_ad, **opts)


def _ids(n=4):
    return torch.randint(1, 60, (n, 12), generator=torch.Generator().manual_seed(0))


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(model, ids, steps=3):
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("kind", list(MODELS))
def test_save_pretrained_then_from_pretrained_gives_the_trained_function(tmp_path, kind):
    """A trained converted model's save_pretrained comes back from the plain class's
    from_pretrained with its outputs (float64: 1e-12 relative; the merged weight W0 + U S V^T
    rounds differently from the two products); the same file loads into a freshly converted
    model exactly (every tensor bitwise), the merged copies dropped (GPT-2's tied lm_head.weight is
    not written by save_pretrained, as for any tied weight)."""
    from safetensors.torch import load_file

    model = _converted(kind, dropout=0.0, dtype=torch.float64).eval()
    ids = _ids()
    _train(model, ids)
    y = _out(model, ids)
    model.save_pretrained(tmp_path / "m")
    cls = type(model)
    back = cls.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    assert not any(isinstance(m, rt.LowRankConv1D | rt.LowRankLinear) for m in back.modules())
    err, scale = float((_out(back, ids) - y).abs().max()), float(y.abs().max())
    assert err <= 1e-12 * scale, (err, scale)
    fresh = _converted(kind, seed=7, dropout=0.0, dtype=torch.float64).eval()
    res = fresh.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")), strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) <= {"lm_head.weight"}  # HF: tied
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    assert_same_outputs(_out(fresh, ids), y)


def test_plain_checkpoint_into_a_converted_model_is_refused(tmp_path):
    """The state dict of the plain model (before conversion, or merged) holds <layer>.weight
    and no factors: loading it into a converted model raises (strict or not), naming the
    layer, instead of keeping the adapters silently."""
    plain = _bert(dropout=0.0)
    sd = plain.state_dict()
    model = _converted("bert")
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention.self.query.weight'"
                                             r" but no factors"):  # fmt: skip
            model.load_state_dict(sd, strict=strict)


def _trainer(model, out, max_steps, callbacks=()):
    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = torch.randint(1, 60, (48, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            labels = self.ids[i] if isinstance(model, transformers.GPT2LMHeadModel) else (
                self.ids[i, 0] % 3)  # fmt: skip
            return {"input_ids": self.ids[i], "labels": labels}

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, save_steps=3,
        save_strategy="steps", logging_steps=100, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    return Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, sched),
                   callbacks=list(callbacks))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_only_trainer_checkpoint_resumes_exactly(tmp_path, kind):
    """With rt.AdapterCheckpointCallback a Trainer checkpoint holds the trained tensors (and
    the optimizer state), no frozen base: its model.safetensors has no base_weight and is a
    small fraction of the full save; a fresh Trainer on a freshly converted model resumed
    from step 3 ends with the parameters of an uninterrupted 6-step run (1e-6, dropout on);
    from_pretrained of the checkpoint fails (a README says how to load it); after training,
    save_model writes the full, loadable model again."""
    from safetensors.torch import load_file

    cb = rt.AdapterCheckpointCallback
    full = _converted(kind)
    _trainer(full, tmp_path / "full", 6, [cb()]).train()
    part = _converted(kind)
    trainer = _trainer(part, tmp_path / "part", 6, [cb()])
    trainer.train()
    ckpt = tmp_path / "part" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "README.md").exists()
    saved = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.endswith("base_weight") for k in saved)
    trained = {n for n, p in part.named_parameters() if p.requires_grad}
    assert trained <= set(saved)
    markers = [k for k, v in saved.items() if v.numel() == 1 and k.endswith("weight")]
    assert markers  # one-element markers under the merged weights' names
    size = sum(v.numel() for v in saved.values())
    assert size < 0.5 * sum(v.numel() for v in part.state_dict().values())
    resumed = _converted(kind, adapter_seed=5)  # the same base, other random adapters
    _trainer(resumed, tmp_path / "resumed", 6, [cb()]).train(resume_from_checkpoint=str(ckpt))
    ref = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, ref[name], rtol=0, atol=1e-6), name
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(part).from_pretrained(ckpt)
    trainer.save_model(str(tmp_path / "final"))  # after training: the full save
    back = type(part).from_pretrained(tmp_path / "final").eval()
    part.eval()
    ids = _ids()
    assert torch.allclose(_out(back, ids), _out(part, ids), rtol=0, atol=1e-5)
