r"""Figure: the two seed papers' claims side by side with the field's optimizers on (i)-(iv).

The problems and methods of ``benchmarks/optimizers.py`` (see its docstring): low-rank linear
regression (i) well-conditioned, (ii) ill-conditioned inputs, (iii) rank 8 fit to a rank-2
target, (iv) an imbalanced start. Shown, each at the learning rate of its grid that reaches
relative loss 1e-12 first (else the lowest final loss), the first seed (the JSON and
``benchmarks/optimizers.py``'s table have every seed):

* factor methods: LoRA + AdamW, LoRA + heavy ball, ScaledGD;
* PEFT's optimizers: ``create_riemannian_optimizer`` (AdamW) and ``create_loraplus_optimizer``;
* the first seed paper (Bian et al., NeurIPS 2025) as its code does it: the authors' RAdamW and
  RAdaGrad (``rankopt.rules.ReferenceRAdamW``/``ReferenceRAdaGrad``), and rankopt's RAdamW and
  RAdaGrad;
* the second (Schotthöfer, Klein, Kusch, NeurIPS 2025): DLRAAdam and DLRAHeavyBall (augmented
  BUG).

By default the curves come from the benchmark's own results
(``out/optimizers/optimizers_results.json``, ``--bench-json``) when that file exists; otherwise
(and always with ``--quick``) this script runs the same code on a smaller grid.

    python -m paper_figures.fig_seeds [--quick] [--out DIR] [--bench-json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import _optimizers_lib as lib
from paper_figures._common import DEFAULT_OUT, floor_curve, save

HERE = Path(__file__).resolve().parent

NAME = "fig_seeds"
BENCH_JSON = Path("out") / "optimizers" / "optimizers_results.json"
PROBLEMS = ("i", "ii", "iii", "iv")
#: method -> (color, line style); grouped as in the module docstring
METHODS = {
    k: lib.METHOD_STYLES[k]
    for k in (
        "LoRA + AdamW",
        "LoRA + heavy ball",
        "ScaledGD",
        "PEFT Riemannian AdamW",
        "PEFT LoRA+ AdamW",
        "authors' RAdamW (reference)",
        "authors' RAdaGrad (reference)",
        "RAdamW",
        "RAdaGrad",
        "DLRAAdam",
        "DLRAHeavyBall",
    )
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, short runs (seconds)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench-json", type=Path, default=BENCH_JSON)
    return ap.parse_args(argv)


def compute(quick: bool, seed: int) -> dict:
    """``{problem: {method: {seed: {"curve", "lr", "steps", "final"}}}}`` by the benchmark's code."""
    steps, size, seeds = (120, 3, 1) if quick else (500, 8, 1)
    methods = [m for m in lib.all_methods() if m.name in METHODS]
    out: dict = {}
    for pk in PROBLEMS:
        t0 = time.perf_counter()
        out[pk] = {}
        for s in range(seed, seed + seeds):
            prob = lib.regression(lib.PROBLEMS[pk], s)
            for m in methods:
                best = None
                for lr in lib.lr_grid(m, size, 300.0):
                    r = (
                        lib.run_rule(m, prob, lr, steps)
                        if m.kind == "rule"
                        else lib.run_lora(m, prob, lr, steps, s)
                    )
                    st = r.steps_to()
                    key = (st if st is not None else math.inf, r.final)
                    if best is None or key < best[0]:
                        best = (key, lr, r)
                _, lr, r = best
                out[pk].setdefault(m.name, {})[str(s)] = {
                    "curve": [float(v) for v in r.losses], "lr": lr, "steps": r.steps_to(),
                    "final": r.final,
                }  # fmt: skip
        print(f"({pk}) {len(methods)} methods in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def from_benchmark(path: Path) -> dict:
    """The same structure from ``benchmarks/optimizers.py``'s saved results."""
    reg = json.loads(path.read_text())["regressions"]
    out: dict = {}
    for pk in PROBLEMS:
        out[pk] = {}
        for name in METHODS:
            for s, per in reg[pk].get(name, {}).items():
                b = per["best_steps"]
                entry = per["lrs"][f"{b['lr']:.6g}"]
                out[pk].setdefault(name, {})[s] = {
                    "curve": b["curve"], "lr": b["lr"], "steps": entry["steps"],
                    "final": entry["final"],
                }  # fmt: skip
    return out


def plot(runs: dict, out: Path, note: str) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10), sharey=True, layout="constrained")
    for ax, pk in zip(axes.flat, PROBLEMS, strict=True):
        for name, (color, ls) in METHODS.items():
            per = runs[pk].get(name)
            if not per:
                continue
            seeds = sorted(per)[:1]
            for s in seeds:
                v = per[s]
                first = s == seeds[0]
                label = (
                    f"{name} ({v['steps'] if v['steps'] is not None else '–'} steps)"
                    if first
                    else None
                )
                ax.semilogy(floor_curve(v["curve"], 1e-30), ls, color=color,
                            lw=1.6 if first else 0.6, alpha=1.0 if first else 0.5, label=label)  # fmt: skip
        ax.axhline(lib.TARGET, color="0.6", lw=0.8)
        ax.set_title(lib.PROBLEMS[pk].title, fontsize=10)
        ax.set_ylim(1e-30, 10)
        ax.set_xlabel("step")
        ax.set_ylabel("relative loss")
        ax.legend(
            fontsize=7, loc="lower left", title="steps to 1e-12 (first seed)", title_fontsize=7
        )
    fig.suptitle("The seeds' optimizers (as their code does them and as rankopt does them) "
                 "against LoRA and PEFT's optimizers" + note, fontsize=11)  # fmt: skip
    return save(fig, out, NAME)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write ``fig_seeds.png`` and ``fig_seeds.json``."""
    args = parse(argv)
    if not args.quick and args.bench_json.exists():
        runs, source = from_benchmark(args.bench_json), str(args.bench_json)
        note = ""
    else:
        runs, source = compute(args.quick, args.seed), "computed by fig_seeds.py"
        note = " — QUICK run (small grid, short runs)" if args.quick else " (one seed)"
    path = plot(runs, Path(args.out), note)
    summary = {
        "source": source,
        "runs": {
            pk: {
                name: {s: {k: v for k, v in d.items() if k != "curve"} for s, d in per.items()}
                for name, per in runs[pk].items()
            }
            for pk in PROBLEMS
        },
    }
    (Path(args.out) / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    return [path]


if __name__ == "__main__":
    np.seterr(all="ignore")
    for p in main():
        print(p)
