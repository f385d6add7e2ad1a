"""No silently wrong adapter file or PEFT conversion: what load_adapters, save_adapters,
from_peft and to_peft check, and the outputs they must reproduce.

Every case that used to load or convert with wrong outputs now raises an error naming the
layer, file or option, or gives the right outputs. Models are float64; two computation paths
must agree to ``RTOL`` (1e-12) relative to the largest output, far above the rounding of these
tiny models (~1e-15) and far below the errors the checks prevent (0.1 to 1000).
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[data]'")
from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RTOL = 1e-12
ADAPTER_FILE = rt.adapters.ADAPTER_FILE
CONFIG_FILE = rt.adapters.CONFIG_FILE
Q0 = "bert.encoder.layer.0.attention.self.query"


def _bert(layers: int = 2, seed: int = 0):
    """A float64 BertForSequenceClassification from a config (random weights, no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).double().eval()


IDS = torch.randint(1, 60, (4, 10), generator=torch.Generator().manual_seed(0))


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    """``max |a - b| <= rtol max |b|``: equal to rounding (two paths of the same function)."""
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


def _train(model, params=None, steps: int = 2, loss=None):
    """``steps`` RAdamW steps on ``params`` (default: the trainable ones) of ``loss(model)``."""
    params = rt.trainable_parameters(model) if params is None else params
    loss = loss or (lambda m: (m(input_ids=IDS).logits - 1).pow(2).sum())
    opt = rt.RAdamW(params, lr=5e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    return model


def _adapted(targets=("query", "value"), rank: int = 4, seed: int = 0, steps: int = 2):
    model = rt.apply_low_rank(_bert(), rank, list(targets), modules_to_save=["classifier"],
                              seed=seed)  # fmt: skip
    return _train(model, steps=steps) if steps else model


def _compressed(targets=("query", "value"), rank: int = 4):
    model = rt.apply_low_rank(_bert(), rank, list(targets), mode="compress")
    return _train(model, rt.manifold_parameters(model))  # the rest stays the base model's


def _edit_file(folder, edit) -> None:
    """Apply ``edit`` to the tensors of an adapter file (a file changed after saving)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / ADAPTER_FILE))
    edit(tensors)
    save_file(tensors, str(folder / ADAPTER_FILE))


# --------------------------------------------------------------------------- mode


def test_adapter_file_into_compressed_model_names_layer_and_mode(tmp_path):
    """Used to load with outputs off by 0.61, the frozen base dropped and the config rewritten
    to 'adapter'. Now: ValueError naming the layer, the file and both modes; the model is left
    as it was; the same file loads onto a fresh base model with the saved outputs."""
    model = _adapted()
    y = _out(model)
    rt.save_adapters(model, tmp_path / "ad")
    comp = rt.apply_low_rank(_bert(), 4, ["query", "value"], mode="compress")
    y_comp = _out(comp)
    with pytest.raises(ValueError, match=re.escape(Q0)) as err:
        rt.load_adapters(comp, tmp_path / "ad")
    msg = str(err.value)
    assert str(tmp_path / "ad" / ADAPTER_FILE) in msg
    assert "mode='adapter'" in msg and "mode='compress'" in msg and "fresh copy" in msg
    assert comp.rankopt_config["mode"] == "compress" and _close(_out(comp), y_comp, 0.0)
    fresh = rt.load_adapters(_bert(), tmp_path / "ad")
    assert _close(_out(fresh), y) and not _close(_out(_bert()), y, 1e-3)


def test_compressed_file_into_adapter_model_names_layer_and_mode(tmp_path):
    """Used to load with outputs off by 1.34. Now: ValueError naming layer, file and modes;
    onto a fresh base model the compressed layers load with the saved outputs."""
    model = _compressed()
    y = _out(model)
    rt.save_adapters(model, tmp_path / "comp")
    with pytest.raises(ValueError, match=re.escape(Q0)) as err:
        rt.load_adapters(_adapted(seed=1, steps=0), tmp_path / "comp")
    msg = str(err.value)
    assert str(tmp_path / "comp" / ADAPTER_FILE) in msg
    assert "holds a compressed layer (mode='compress'" in msg and "has an adapter" in msg
    fresh = rt.load_adapters(_bert(), tmp_path / "comp")
    assert fresh.bert.encoder.layer[0].attention.self.query.base_weight is None
    assert _close(_out(fresh), y) and not _close(_out(_bert()), y, 1e-3)


# --------------------------------------------------------------------------- layer set, rank


def test_file_with_fewer_layers_than_the_converted_model_is_refused(tmp_path):
    """A file of query adapters into a model with query and value adapters used to load with
    no warning (outputs off by 0.17). Now: ValueError naming the layers the file lacks; into a
    model converted with exactly the file's layers (other seed) the outputs are the saved."""
    model = _adapted(targets=("query",))
    y = _out(model)
    rt.save_adapters(model, tmp_path / "q")
    both = _adapted(seed=1)
    with pytest.raises(ValueError, match="does not hold") as err:
        rt.load_adapters(both, tmp_path / "q")
    msg = str(err.value)
    assert "bert.encoder.layer.1.attention.self.value" in msg
    assert str(tmp_path / "q" / ADAPTER_FILE) in msg
    same = _adapted(targets=("query",), seed=1, steps=0)
    assert not _close(_out(same), y, 1e-3)
    assert _close(_out(rt.load_adapters(same, tmp_path / "q")), y)


def test_layer_missing_from_the_model_is_named(tmp_path):
    """A file of a 2-layer BERT onto a 1-layer BERT used to fail with "ModuleList has no
    attribute '1'". Now: ValueError naming the layer and the file."""
    rt.save_adapters(_adapted(), tmp_path / "two")
    with pytest.raises(ValueError, match=re.escape("'bert.encoder.layer.1.attention.self.query'")) as err:  # fmt: skip
        rt.load_adapters(_bert(layers=1), tmp_path / "two")
    assert "which the model does not have" in str(err.value)
    assert str(tmp_path / "two" / ADAPTER_FILE) in str(err.value)


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _seq(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()


def test_tensors_missing_from_the_file_are_named(tmp_path):
    """A file whose safetensors lacks a layer its JSON lists used to fail with a bare
    KeyError: '2.V'. Now: ValueError naming the missing tensors and both files."""
    model = _train(rt.apply_low_rank(_seq(), 2, ["0", "2"], seed=0), loss=lambda m: m(X).sum())
    rt.save_adapters(model, tmp_path / "s")
    _edit_file(tmp_path / "s", lambda t: [t.pop(k) for k in ("2.U", "2.s", "2.V")])
    with pytest.raises(ValueError, match=re.escape("'2.V'")) as err:
        rt.load_adapters(_seq(), tmp_path / "s")
    assert str(tmp_path / "s" / ADAPTER_FILE) in str(err.value)
    assert str(tmp_path / "s" / CONFIG_FILE) in str(err.value)


def test_other_kind_shape_or_head_is_named(tmp_path):
    """A layer of another shape, or a saved module (classifier) of another shape, is refused
    naming the module and the file before the model is changed."""
    rt.save_adapters(_train(rt.apply_low_rank(_seq(), 2, ["0", "2"], seed=0),
                            loss=lambda m: m(X).sum()), tmp_path / "s")  # fmt: skip
    other = _seq()
    other[2] = nn.Linear(6, 5).double()
    with pytest.raises(ValueError, match=r"module '2' is a Linear \(shape \[5, 6\]\)") as err:
        rt.load_adapters(other, tmp_path / "s")
    assert str(tmp_path / "s" / ADAPTER_FILE) in str(err.value)
    assert not any(isinstance(m, rt.LowRankLinear) for m in other.modules())
    rt.save_adapters(_adapted(steps=0), tmp_path / "ad")
    two = _bert()
    two.classifier = nn.Linear(32, 2).double()
    with pytest.raises(ValueError, match="saved module 'classifier'") as err:
        rt.load_adapters(two, tmp_path / "ad")
    assert "'weight'" in str(err.value) and str(tmp_path / "ad" / ADAPTER_FILE) in str(err.value)


def test_file_rank_is_taken_and_checked(tmp_path):
    """A model converted at rank 2 takes the file's rank 4 (a rank-adaptive optimizer may have
    changed it), started or not, with the saved outputs; a config whose rank disagrees with
    its tensors is refused naming layer and file."""
    model = _adapted(targets=("query",), steps=0)
    q0 = model.get_submodule(Q0)
    _train(model, [q0.U, q0.S, q0.V])  # layer 0's query started, layer 1's not
    y = _out(model)
    rt.save_adapters(model, tmp_path / "r")
    low = _adapted(targets=("query",), rank=2, seed=1, steps=0)
    rt.load_adapters(low, tmp_path / "r")
    queries = [blk.attention.self.query for blk in low.bert.encoder.layer]
    assert [q.rank for q in queries] == [4, 4] and [q.started for q in queries] == [True, False]
    assert _close(_out(low), y) and not _close(_out(_bert()), y, 1e-3)
    config = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    config["layers"][Q0]["rank"] = 3
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(Q0)) as err:
        rt.load_adapters(_bert(), tmp_path / "r")
    assert "rank 3" in str(err.value) and str(tmp_path / "r" / ADAPTER_FILE) in str(err.value)


def test_tied_layers_must_be_tied_in_the_model(tmp_path):
    """Layers sharing factors in the file (tied embedding and head) load onto a model whose
    two weights are tied; onto one where they are not: ValueError naming both layers."""

    class Tied(nn.Module):
        def __init__(self, tie: bool = True):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(20, 8).double()
            self.head = nn.Linear(8, 20, bias=False).double()
            if tie:
                self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.emb(idx)))

    idx = torch.tensor([[1, 5, 7], [2, 3, 19]])
    model = rt.apply_low_rank(Tied(), 3, ["emb", "head"], seed=0)
    assert model.head.U is model.emb.U
    model.emb.set_factors(model.emb.U, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64),
                          model.emb.V)  # fmt: skip
    with torch.no_grad():
        y = model(idx)
    rt.save_adapters(model, tmp_path / "t")
    back = rt.load_adapters(Tied(), tmp_path / "t")
    with torch.no_grad():
        assert back.head.U is back.emb.U and _close(back(idx), y)
    with pytest.raises(ValueError, match="'head': tied to 'emb'") as err:
        rt.load_adapters(Tied(tie=False), tmp_path / "t")
    assert str(tmp_path / "t" / ADAPTER_FILE) in str(err.value)


# --------------------------------------------------------------------------- values


def _nan_u(t):
    t[f"{Q0}.U"][0, 0] = float("nan")


def _nonzero_s(t):
    t[f"{Q0}.s"][0] = 0.5


def _scaled_v(t):
    t[f"{Q0}.V"] *= 2.0


def _inf_s(t):
    t[f"{Q0}.s"][1] = float("inf")


@pytest.mark.parametrize("steps", [0, 2], ids=["never-stepped", "stepped"])
@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_nan_u, "U has non-finite"),
        (_inf_s, "s has non-finite"),
        (_nonzero_s, None),
        (_scaled_v, "V must have orthonormal columns"),
    ],  # fmt: skip
    ids=["nan-U", "inf-s", "changed-s", "scaled-V"],
)
def test_adapter_values_are_checked_stepped_or_not(tmp_path, steps, edit, problem):
    """A file whose adapters hold NaN or inf, s != 0 for a never-stepped adapter (a fresh one
    has S = 0) or U, V that are not orthonormal used to be accepted (NaN outputs). Now:
    ValueError naming layer, file and problem, before the model is converted."""
    rt.save_adapters(_adapted(steps=steps), tmp_path / "v")
    _edit_file(tmp_path / "v", edit)
    base = _bert()
    if problem is None:  # changing s of a stepped adapter gives another valid point
        problem = "never took a step, so s must be 0" if steps == 0 else None
    if problem is None:
        rt.load_adapters(base, tmp_path / "v")
        assert float(base.get_submodule(Q0).S.detach()[0, 0]) == 0.5
        return
    with pytest.raises(ValueError, match=re.escape(problem)) as err:
        rt.load_adapters(base, tmp_path / "v")
    assert Q0 in str(err.value) and str(tmp_path / "v" / ADAPTER_FILE) in str(err.value)
    assert not any(isinstance(m, rt.LowRankLinear) for m in base.modules())  # left unchanged


def test_never_stepped_adapter_loads_as_a_fresh_one(tmp_path):
    """An adapter that never stepped loads unstarted with S = 0 and the saved U, V: the base
    model's outputs to rounding."""
    model = _adapted(steps=0)
    rt.save_adapters(model, tmp_path / "new")
    back = rt.load_adapters(_bert(), tmp_path / "new")
    q, q0 = back.bert.encoder.layer[0].attention.self.query, model.get_submodule(Q0)
    assert not q.started and torch.count_nonzero(q.S) == 0 and _close(q.U, q0.U, 0.0)
    assert _close(_out(back), _out(_bert()))


def test_save_refuses_a_never_stepped_adapter_with_nonzero_s(tmp_path):
    """S != 0 without a step (set by hand) would be saved as a 'fresh' adapter that load
    refuses: save_adapters names the layer and the fix instead."""
    model = _adapted(steps=0)
    with torch.no_grad():
        model.get_submodule(Q0).S[0, 0] = 1.0
    with pytest.raises(ValueError, match=re.escape(Q0)) as err:
        rt.save_adapters(model, tmp_path / "bad")
    assert "never took a step" in str(err.value) and "set_factors" in str(err.value)


def test_damaged_files_are_named(tmp_path):
    """A damaged safetensors file used to fail with a message not naming it; a damaged JSON
    with a bare JSONDecodeError. Now: ValueError naming the file."""
    rt.save_adapters(_adapted(steps=0), tmp_path / "d")
    data = (tmp_path / "d" / ADAPTER_FILE).read_bytes()
    (tmp_path / "d" / ADAPTER_FILE).write_bytes(b"garbage!" + data[8:])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "d" / ADAPTER_FILE))):
        rt.load_adapters(_bert(), tmp_path / "d")
    (tmp_path / "d" / ADAPTER_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        rt.load_adapters(_bert(), tmp_path / "d")
    (tmp_path / "d" / CONFIG_FILE).write_text('{"format": "rankopt.adapters", ')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "d" / CONFIG_FILE))):
        rt.load_adapters(_bert(), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none" / CONFIG_FILE))):
        rt.load_adapters(_bert(), tmp_path / "none")


# --------------------------------------------------------------------------- PEFT


def _lora(model, seed: int = 0, **kw):
    """A PEFT LoRA model with random (trained-like) factors."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                     **kw)  # fmt: skip
    pm = get_peft_model(model, cfg)
    _randomize(pm, seed)
    return pm


def _randomize(pm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_from_peft_after_merge_adapter_unmerges(tmp_path):
    """After pm.merge_adapter() the update used to count twice (outputs off by 7.5). Now
    from_peft unmerges first, as PEFT's unmerge_adapter() does, with a warning: the outputs
    are the PEFT model's and the frozen base is the pretrained weight, to rounding."""
    pytest.importorskip("peft")
    base = _bert()
    pm = _lora(copy.deepcopy(base))
    y = _out(pm)
    pm.merge_adapter()
    assert _close(_out(pm), y, 1e-10)  # merged: the same function (other rounding)
    with pytest.warns(UserWarning, match=re.escape("unmerge_adapter()")):
        model = rt.from_peft(pm)
    assert _close(_out(model), y) and not _close(_out(base), y, 1e-3)
    q = model.get_submodule(Q0)
    assert q.started and _close(q.base_weight, base.get_submodule(Q0).weight)


@pytest.mark.parametrize("saved", [None, ["classifier"]], ids=["lora-only", "with-head"])
def test_from_peft_converts_exactly_the_named_adapter(saved):
    """adapter_name="other" while "default" is active ("other" targets fewer modules) used to
    leave a PEFT layer with "default" (off by 2.6), or fail with KeyError: 'other' when
    "default" had modules_to_save. Now: no PEFT module is left, exactly "other"'s layers are
    converted, outputs are PEFT's with "other" active, the classifier is the original one."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    base = _bert()
    pm = _lora(copy.deepcopy(base), modules_to_save=saved)
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["value"],
                                       lora_dropout=0.0))  # fmt: skip
    _randomize(pm, seed=1)
    pm.set_adapter("other")
    y_other = _out(pm)
    pm.set_adapter("default")
    y_default = _out(pm)
    model = rt.from_peft(pm, adapter_name="other")
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]
    low = {n: m.rank for n, m in model.named_modules() if isinstance(m, rt.LowRankLinear)}
    assert low == {f"bert.encoder.layer.{i}.attention.self.value": 2 for i in range(2)}
    assert rt.saved_module_names(model) == []
    assert _close(model.classifier.weight, base.classifier.weight, 0.0)
    assert _close(_out(model), y_other) and not _close(y_default, y_other, 1e-3)


def test_from_peft_adapter_choice_errors_are_named():
    """An unknown adapter_name is refused listing the model's adapters (it was a bare
    KeyError); with two adapters active and none named (PEFT's output adds both), from_peft
    asks for adapter_name instead of converting the first. The model is left as it was."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    pm = _lora(_bert())
    with pytest.raises(ValueError, match=r"adapter_name='nope'.*\['default'\]"):
        rt.from_peft(pm, adapter_name="nope")
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["value"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"several adapters are active.*pass adapter_name="):
        rt.from_peft(pm)
    assert type(pm.get_base_model().get_submodule(Q0)).__module__.startswith("peft")


class _QNet(nn.Module):
    """Modules named q, sub.q and sub.k: PEFT's rank_pattern key "q" also matches "sub.q"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(16, 16).double()
        self.sub = nn.Module()
        self.sub.q = nn.Linear(16, 16).double()
        self.sub.k = nn.Linear(16, 16).double()

    def forward(self, x):
        return self.sub.k(torch.tanh(self.sub.q(torch.tanh(self.q(x)))))


@pytest.mark.parametrize(
    "ranks",
    [{"q": 2, "sub.q": 4, "sub.k": 4}, {"q": 4, "sub.q": 2, "sub.k": 4}],
    ids=["q-rank2", "sub.q-rank2"],
)
def test_to_peft_rank_pattern_matches_only_its_module(tmp_path, ranks):
    """Adapters on q (rank 2) and sub.q, sub.k (rank 4) used to give "RuntimeError: shape
    '[2, 16]' is invalid": the key "q" matched "sub.q". Now the keys are anchored ("^q"),
    PeftModel.from_pretrained builds each LoRA at its rank and reproduces the outputs."""
    pytest.importorskip("peft")
    from peft import PeftModel

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = _QNet()
    for rank in sorted(set(ranks.values())):
        names = [n for n, r in ranks.items() if r == rank]
        rt.apply_low_rank(model, rank, re.compile("|".join(map(re.escape, names))), seed=rank)
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=5e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    with torch.no_grad():
        y = model(x)
    rt.to_peft(model, tmp_path / "p")
    conf = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert all(k.startswith("^") for k in conf["rank_pattern"]) and conf["rank_pattern"]
    loaded = PeftModel.from_pretrained(_QNet(), str(tmp_path / "p"))
    inner = loaded.get_base_model()
    assert {n: inner.get_submodule(n).lora_A["default"].weight.shape[0] for n in ranks} == ranks
    with torch.no_grad():
        assert _close(loaded(x), y) and not _close(_QNet()(x), y, 1e-3)
