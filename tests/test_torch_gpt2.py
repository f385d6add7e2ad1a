"""The layers people fine-tune beyond nn.Linear: transformers' Conv1D (GPT-2, weight stored
(in, out): PEFT's fan_in_fan_out), nn.MultiheadAttention (q/k/v blocks and out_proj), nn.Conv1d;
and the conversion report. Function preserved at conversion (1e-6 relative in float32, 1e-12 in
float64), training moves the loss, adapter files and PEFT round trips, merge back to the
original module types."""

from __future__ import annotations

import copy
import os

import pytest
from conftest import assert_same_outputs

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
D = torch.float64
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _close(a, b, rtol, absolute=False):
    """``max|a - b| <= rtol * max|b|`` (the tolerance the conversion promises for the dtype),
    or ``<= rtol`` with ``absolute`` (PEFT round trips: another factorization of the update,
    float32 logits below 1, as in tests/test_torch_hf.py)."""
    err, scale = float((a - b).abs().max()), 1.0 if absolute else float(b.abs().max())
    assert a.shape == b.shape and err <= rtol * scale, (err, rtol * scale)


def _rtol(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-12


def _gpt2(seed=0, dtype=torch.float32):
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[data]'")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def _ids(n=3, seed=0):
    return torch.randint(0, 100, (n, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _conv1d_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


@pytest.mark.parametrize("dtype", [torch.float32, D], ids=["float32", "float64"])
def test_gpt2_conv1d_adapters_convert_train_save_and_merge(tmp_path, dtype):
    """Every Conv1D named c_attn / c_proj / c_fc becomes a LowRankConv1D with the same outputs;
    5 RAdamW steps lower the LM loss; save_adapters / load_adapters onto a fresh GPT-2 give the
    same outputs; merge gives Conv1D modules again with the same outputs."""
    from transformers.pytorch_utils import Conv1D

    model, ids = _gpt2(dtype=dtype), _ids()
    names = _conv1d_names(model)
    y0 = _logits(model, ids)
    rt.apply_low_rank(model, rank=4, target_modules=TARGETS, seed=0)
    assert sorted(model.rankopt_report.converted_names) == sorted(names) and len(names) == 8
    assert all(isinstance(model.get_submodule(n), rt.LowRankConv1D) for n in names)
    assert {c.kind for c in model.rankopt_report.converted} == {"hf_conv1d"}
    _close(_logits(model, ids), y0, _rtol(dtype))
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    y = _logits(model, ids)
    rt.save_adapters(model, tmp_path / "ad")
    fresh = rt.load_adapters(_gpt2(dtype=dtype), tmp_path / "ad")
    assert_same_outputs(_logits(fresh, ids), y)
    rt.merge(model)
    assert all(type(model.get_submodule(n)) is Conv1D for n in names)
    _close(_logits(model, ids), y, 1e-5 if dtype == torch.float32 else 1e-12)


def test_gpt2_conv1d_compress_at_full_rank_keeps_the_function():
    """mode="compress" factors Conv1D's (out x in) map (its stored (in, out) weight
    transposed): at full rank the function is kept (float64, 1e-12)."""
    model, ids = _gpt2(dtype=D), _ids()
    y0 = _logits(model, ids)
    rt.apply_low_rank(model, rank=32, target_modules=["c_attn", "attn.c_proj"], mode="compress")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, rt.LowRankConv1D) and layer.base_weight is None
    assert layer.dense_weight().shape == (32, 96)  # Conv1D's (in, out) layout
    _close(_logits(model, ids), y0, 1e-12)


def test_gpt2_peft_lora_from_and_to_peft():
    """A PEFT LoRA GPT-2 (fan_in_fan_out=True on Conv1D) goes through from_peft with the same
    outputs (1e-6), trains, and to_peft writes an adapter PeftModel.from_pretrained loads with
    the same outputs (1e-6)."""
    peft = pytest.importorskip("peft")
    base, ids = _gpt2(), _ids()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True, lora_dropout=0.0)  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    y = _logits(pm, ids)
    model = rt.from_peft(pm)
    assert isinstance(model.transformer.h[0].attn.c_attn, rt.LowRankConv1D)
    _close(_logits(model, ids), y, 1e-6, absolute=True)
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    y1 = _logits(model, ids)
    assert float((y1 - y).abs().max()) > 1e-4  # it trained
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rt.to_peft(model, d)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        _close(_logits(back, ids), y1, 1e-6, absolute=True)
        assert back.peft_config["default"].fan_in_fan_out


# --------------------------------------------------------------------------- report


def test_report_lists_converted_and_skipped_with_reasons():
    """target_modules=None on GPT-2: the 8 Conv1D converted, the tied head skipped (tied), the
    embeddings skipped (not targeted); one warning lists the head only."""
    model = _gpt2()
    with pytest.warns(UserWarning, match=r"left 1 module\(s\) as they are: 'lm_head' \(its weight"):
        rt.apply_low_rank(model, rank=4)
    rep = model.rankopt_report
    assert isinstance(rep, rt.ConversionReport) and len(rep.converted) == 8
    assert [(s.name, s.reason) for s in rep.skipped_for("tied")] == [("lm_head", "tied")]
    assert {s.name for s in rep.skipped_for("not targeted")} == {
        "transformer.wte",
        "transformer.wpe",
    }
    assert "converted 'transformer.h.0.attn.c_attn': hf_conv1d 96 x 32, rank 4" in str(rep)
    small = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(4, 4, 3, groups=2), nn.Linear(8, 2),
                          nn.Conv3d(2, 2, 1), nn.Linear(8, 8))  # fmt: skip
    with pytest.warns(UserWarning, match="left 3 module"):
        rt.apply_low_rank(small, rank=3, exclude_modules=["4"])
    reasons = {s.name: s.reason for s in small.rankopt_report.skipped}
    assert reasons == {"1": "grouped conv", "2": "too small for the rank", "3": "unsupported type",
                       "4": "excluded"}  # fmt: skip


def test_target_that_matches_nothing_names_close_candidates():
    model = _gpt2()
    with pytest.raises(ValueError, match=r"Close names: 'c_attn' \(Conv1D, e.g. 'transformer"):
        rt.apply_low_rank(model, rank=2, target_modules=["c_atn"])
    with pytest.raises(ValueError, match=r"matched only modules that cannot be converted: "
                                         r"'transformer.h.0.ln_1' \(LayerNorm\)"):  # fmt: skip
        rt.apply_low_rank(model, rank=2, target_modules=["ln_1"])
    assert not any(isinstance(m, rt.LowRankConv1D) for m in model.modules())  # unchanged


# --------------------------------------------------------------------------- nn.Conv1d


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv1d(8, 6, 5, stride=2, padding="valid", dilation=1), nn.ReLU(),
                         nn.Conv1d(6, 6, 3, padding="same", dilation=2), nn.Flatten(),
                         nn.Linear(6 * 6, 4)).to(D)  # fmt: skip


def test_conv1d_adapter_compress_train_and_merge():
    """nn.Conv1d: adapters keep the function (1e-12), RAdamW and DLRAAdam steps train them,
    merge gives nn.Conv1d back with the trained function; compress at full rank keeps it;
    unbatched inputs work."""
    x = torch.randn(5, 3, 16, dtype=D)
    model = _conv_net()
    y0 = model(x)
    rt.apply_low_rank(model, rank=2, target_modules=["0", "2", "4"], seed=0)
    assert all(isinstance(model[i], rt.LowRankConv1d) for i in (0, 2, 4))
    _close(model(x), y0, 1e-12)
    _close(model[0](x[0]), model[0](x[:1])[0], 1e-12)
    for cls, kw in ((rt.RAdamW, {}), (rt.DLRAAdam, dict(max_rank=2))):
        opt = cls(rt.trainable_parameters(model), lr=1e-2, **kw)
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    y = model(x).detach()
    assert float((y - y0).abs().max()) > 1e-4 and model[0].rank <= 2
    rt.merge(model)
    assert all(type(model[i]) is nn.Conv1d for i in (0, 2, 4))
    _close(model(x), y, 1e-12)
    full = _conv_net()
    rt.apply_low_rank(full, rank=6, target_modules=["2", "4"], mode="compress")
    _close(full(x), y0, 1e-12)


def test_conv1d_grouped_is_skipped_and_named_raises():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 1))
    with pytest.warns(UserWarning, match=r"'0' \(grouped convolutions \(groups=2\)"):
        rt.apply_low_rank(model, rank=2)
    assert isinstance(model[1], rt.LowRankConv1d) and type(model[0]) is nn.Conv1d
    with pytest.raises(ValueError, match="module '0': grouped convolutions"):
        rt.apply_low_rank(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)), rank=2, target_modules=["0"])


# --------------------------------------------------------------------------- attention


class _Att(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, q, k, v, **kw):
        out, w = self.attn(q, k, v, **kw)
        return self.head(out), w


ATT_CASES = {
    "self": (dict(), dict()),
    "batch_first+masks": (dict(batch_first=True), dict(mask=True)),
    "kdim_vdim+bias_kv+zero_attn": (
        dict(kdim=5, vdim=6, add_bias_kv=True, add_zero_attn=True),
        dict(mask=True),
    ),  # fmt: skip
    "no_bias+per_head_weights": (dict(bias=False), dict(average_attn_weights=False)),
}


def _att_inputs(mod_kw, call_kw):
    g = torch.Generator().manual_seed(3)
    L, S, B = 4, 5, 2
    shape = (lambda n, d: (B, n, d)) if mod_kw.get("batch_first") else (lambda n, d: (n, B, d))
    q = torch.randn(shape(L, 8), generator=g, dtype=D)
    k = torch.randn(shape(S, mod_kw.get("kdim", 8)), generator=g, dtype=D)
    v = torch.randn(shape(S, mod_kw.get("vdim", 8)), generator=g, dtype=D)
    kw = {k_: v_ for k_, v_ in call_kw.items() if k_ != "mask"}
    if call_kw.get("mask"):
        kw["attn_mask"] = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=2)
        kw["key_padding_mask"] = torch.tensor([[False] * S, [False] * (S - 1) + [True]])
    return (q, k, v), kw


@pytest.mark.parametrize("case", list(ATT_CASES))
def test_multihead_attention_blocks_convert_train_and_merge(case):
    """Naming the attention converts q/k/v blocks and out_proj: outputs and attention weights
    equal at conversion (float64, 1e-12), with and without need_weights; after training steps,
    merge gives an nn.MultiheadAttention computing the trained function."""
    mod_kw, call_kw = ATT_CASES[case]
    model = _Att(**mod_kw).to(D)
    args, kw = _att_inputs(mod_kw, call_kw)
    y0, w0 = model(*args, **kw)
    rt.apply_low_rank(model, rank=2, target_modules=["attn"], seed=0)
    assert isinstance(model.attn, rt.LowRankMultiheadAttention)
    assert sorted(model.rankopt_report.converted_names) == sorted(
        f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))  # fmt: skip
    y1, w1 = model(*args, **kw)
    _close(y1, y0, 1e-12)
    _close(w1, w0, 1e-12)
    _close(model(*args, need_weights=False, **{k: v for k, v in kw.items()
                                              if k != "average_attn_weights"})[0], y0, 1e-12)  # fmt: skip
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(*args, **kw)[0].pow(2).mean().backward()
        opt.step()
    y, w = (t.detach() for t in model(*args, **kw))
    assert float((y - y0).abs().max()) > 1e-4
    rt.merge(model)
    assert type(model.attn) is nn.MultiheadAttention
    y2, w2 = model(*args, **kw)
    _close(y2, y, 1e-12)
    _close(w2, w, 1e-12)


def test_attention_projections_by_name_and_adapter_files(tmp_path):
    """Naming q_proj / v_proj converts those blocks only (k_proj, out_proj stay plain and
    frozen); naming attn.out_proj (an nn.Linear subclass inside the attention) converts it;
    save_adapters / load_adapters onto a fresh model reproduce the outputs."""
    model = _Att().to(D)
    args, _ = _att_inputs({}, {})
    rt.apply_low_rank(model, rank=2, target_modules=["q_proj", "v_proj"], seed=0)
    assert isinstance(model.attn.q_proj, rt.LowRankLinear) and type(model.attn.k_proj) is nn.Linear
    assert (
        not model.attn.k_proj.weight.requires_grad and not model.attn.out_proj.weight.requires_grad
    )
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    model(*args)[0].pow(2).mean().backward()
    opt.step()
    y = model(*args)[0].detach()
    rt.save_adapters(model, tmp_path / "ad")
    fresh = rt.load_adapters(_Att().to(D), tmp_path / "ad")
    assert isinstance(fresh.attn.v_proj, rt.LowRankLinear)
    assert_same_outputs(fresh(*args)[0], y)
    only_out = rt.apply_low_rank(_Att().to(D), rank=2, target_modules=["attn.out_proj"])
    assert only_out.rankopt_report.converted_names == ["attn.out_proj"]
    assert isinstance(only_out.attn.out_proj, rt.LowRankLinear)
    with pytest.raises(ValueError, match="unpacked nn.MultiheadAttention"):
        rt.to_peft(model)


def test_transformer_encoder_layer_with_target_none():
    """nn.TransformerEncoderLayer: target_modules=None converts its attention's projections
    and its two linears; the function is kept (eval, float64, 1e-12)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer = layer.to(D).eval()
    x = torch.randn(2, 5, 8, dtype=D)
    y0 = layer(x)
    rt.apply_low_rank(layer, rank=2)
    assert len(layer.rankopt_report.converted) == 6
    _close(layer(x), y0, 1e-12)
    rt.merge(layer)
    assert type(layer.self_attn) is nn.MultiheadAttention
    _close(layer(x), y0, 1e-12)
