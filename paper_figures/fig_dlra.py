r"""Figure: DLRA by the augmented BUG integrator against fixed rank and against a tangent step with
a rank-adaptive retraction: loss and rank trajectories.

Problem: the rank-4 target of ``benchmarks/optimizers.py``'s problem (i) (60 x 50, kappa 100,
Gaussian inputs, relative loss), started at a random rank-10 point (``_optimizers_lib.
DLRA_START``): the budget is 10, the target's rank 4. Methods, each at the learning rate of an
8-value grid (3 with ``--quick``) with the lowest final loss after 500 steps (ties: the one
that reaches 1e-12 first; Adam-type methods at larger rates reach 1e-12 sooner and then leave
it again, a post-convergence instability the JSON's ``grid_finals`` shows):

* ``DLRAAdam`` and ``DLRAHeavyBall`` (``rank_tol=1e-3``, ``max_rank`` = the starting rank);
* ``DLRAAdam(second_moment="core")``: Adam on the entries of the core, as the DLRA group's
  training layers do;
* ``RAdamW(rank_tol=1e-3)``: a tangent step and the rank-adaptive retraction (a different
  method from DLRA), whose rank is bounded only by 2r per step;
* ``RAdamW`` at fixed rank 10 (the budget) and at rank 4 (an oracle that knows the rank).

Top: relative loss; bottom: rank, against the step.

    python -m paper_figures.fig_dlra [--quick] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import _optimizers_lib as lib
from paper_figures._common import floor_curve, parse_args, save
from rankopt import rules

HERE = Path(__file__).resolve().parent

NAME = "fig_dlra"
#: label -> (method name in the benchmark, or a (rule factory, lr_lo, fit rank) of its own; color, style)
METHODS = {
    "DLRAAdam": ("DLRAAdam", "tab:red", "-"),
    "DLRAHeavyBall": ("DLRAHeavyBall", "tab:orange", "-"),
    "DLRAAdam core (the group's)": ("DLRAAdam core (group's)", "tab:purple", ":"),
    "RAdamW rank_tol=1e-3 (retraction)": ("RAdamW rank_tol=1e-3 (retraction)", "tab:blue", "--"),
    "RAdamW rank 10 (fixed)": ("RAdamW", "tab:green", "-"),
    "RAdamW rank 4 (oracle)": ("RAdamW@4", "tab:gray", "-."),
}


def _method(name: str) -> lib.Method:
    if name == "RAdamW@4":
        return lib.Method("RAdamW@4", "rankopt", "rule", 1e-3, lambda lr: rules.RAdamW(lr=lr))
    return {m.name: m for m in lib.all_methods()}[name]


def run(quick: bool, seed: int) -> dict:
    """Every method at its best learning rate; curves of loss and rank."""
    steps = 150 if quick else 500
    size = 3 if quick else 8
    out = {}
    for label, (name, _, _) in METHODS.items():
        t0 = time.perf_counter()
        method = _method(name)
        spec = lib.DLRA_START
        if name == "RAdamW@4":
            spec = dataclasses.replace(spec, fit_rank=4)
        prob = lib.regression(spec, seed)
        best = None
        finals = {}
        for lr in lib.lr_grid(method, size, 300.0):
            r = lib.run_rule(method, prob, lr, steps)
            st = r.steps_to()
            finals[f"{lr:.3g}"] = r.final
            key = (max(r.final, lib.FLOOR), st if st is not None else math.inf)
            if best is None or key < best[0]:
                best = (key, lr, r)
        _, lr, r = best
        out[label] = {
            "lr": lr,
            "loss": [float(v) for v in r.losses],
            "rank": [int(v) for v in r.ranks],
            "final_loss": r.final,
            "final_rank": int(r.ranks[-1]),
            "max_rank": int(r.ranks.max()),
            "steps_to_1e-12": r.steps_to(),
            "grid_finals": finals,
        }
        print(
            f"{label:36s} lr={lr:.3g} final={r.final:.2e} rank={r.ranks[-1]} "
            f"max rank={r.ranks.max()} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return out


def plot(runs: dict, out: Path, quick: bool) -> Path:
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, layout="constrained")
    for label, (_, color, ls) in METHODS.items():
        v = runs[label]
        top.semilogy(floor_curve(v["loss"], 1e-30), ls, color=color, lw=1.6,
                     label=f"{label} (lr {v['lr']:.2g})")  # fmt: skip
        bottom.plot(v["rank"], ls, color=color, lw=1.6)
    top.axhline(1e-12, color="0.6", lw=0.8)
    top.set_ylabel("relative loss")
    top.set_ylim(1e-30, 10)
    top.legend(fontsize=8)
    bottom.axhline(10, color="0.3", lw=0.8, ls=":")
    bottom.axhline(4, color="0.3", lw=0.8, ls=":")
    bottom.set_ylabel("rank")
    bottom.set_xlabel("step")
    title = "DLRA (augmented BUG) vs fixed rank vs rank-adaptive retraction: rank-4 target, start rank 10"
    fig.suptitle(title + (" — QUICK run (small grid)" if quick else ""), fontsize=11)
    return save(fig, out, NAME)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the experiment and write ``fig_dlra.png`` and ``fig_dlra.json``."""
    args = parse_args(__doc__.splitlines()[0], argv)
    runs = run(args.quick, args.seed)
    path = plot(runs, Path(args.out), args.quick)
    summary = {
        "problem": lib.DLRA_START.title,
        "runs": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("loss", "rank")}
            for k, v in runs.items()
        },
    }
    (Path(args.out) / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    return [path]


if __name__ == "__main__":
    for p in main():
        print(p)
