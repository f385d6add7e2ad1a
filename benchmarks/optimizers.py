r"""Optimizers for low-rank training, side by side: the field's, the seed papers' (as their code
does them) and rankopt's, on five problems, three seeds, equal-size learning-rate grids.

Problems (see ``benchmarks/_optimizers_lib.py``): low-rank linear regression, float64, full
batch, relative loss ``f(W)/f(0)``:

* (i)   ``W*`` 60 x 50 of rank 4, kappa 100, Gaussian inputs (400 samples), rank-4 fit, W = 0;
* (ii)  the same with input features scaled by ``logspace(0, -2)`` (ill-conditioned Hessian);
* (iii) over-parameterized: rank 8 fit to a rank-2 target (kappa 10), W = 0;
* (iv)  (i) from an imbalanced start ``W0 = B0 A0`` (``B0 = 10 B1``, ``A0 = 0.1 A1``);

and (v) an MLP 64-256-256-10 on scikit-learn's 1797 real digits (60/20/20 split) whose hidden
256 x 256 layer has rank 8, trained from scratch and compressed from a trained dense layer
(truncated SVD), cross-entropy, batch 64.

Methods: LoRA factors with AdamW, heavy ball and ScaledGD; PEFT's
``create_riemannian_optimizer`` (AdamW) and ``create_loraplus_optimizer`` (AdamW); the authors'
RAdamW and RAdaGrad (``rankopt.rules.ReferenceRAdamW``/``ReferenceRAdaGrad``, also
``faithful``); every rankopt rule and metric variant; the DLRA optimizers (augmented BUG) and the
retraction-based rank-adaptive variants they replace. Every method gets ``--lrs`` learning rates
(default 8) spread over the same ratio (300) from its own lowest value; for (i)-(iv) each seed
takes the learning rate with the lowest final loss (final-loss column) and, separately, the one
that reaches relative loss 1e-12 in the fewest steps (steps column); for (v) the one with the
best validation accuracy. Medians over the seeds are reported; an asterisk marks a best
learning rate at the edge of its grid. Weight decay is 0 for every method.

Times: a separate pass in torch (float64 for the (i) layer through the module's forward and
backward, float32 for the MLP), interleaved rounds, median ms per training step (forward +
backward + optimizer step), plus the optimizer's state in bytes
(:func:`benchmarks.harness.optimizer_state_bytes`: every tensor reachable from
``optimizer.state``; before the harness this column counted elements). Every thread pool (BLAS,
OpenMP, numba, torch) has one thread. The rules in (i)-(iv) run on the NumPy backend (the same
rule code as the torch optimizers), the LoRA methods in torch with the closed-form gradient.

Usage::

    python -m benchmarks.optimizers                 # full run (about an hour on 2 busy cores)
    python -m benchmarks.optimizers --quick         # seconds: one seed, 2 lrs, short runs
    python -m benchmarks.optimizers --out out/ --seeds 3 --steps 500

Writes ``optimizers_results.json``, ``optimizers_table.md`` and ``optimizers.png`` in ``--out``
(default ``out/optimizers``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _optimizers_lib as lib
from benchmarks.harness import machine_info, pin_threads, pyplot

LR_RATIO = 300.0
REG_PROBLEMS = ("i", "ii", "iii", "iv")
DIGIT_STARTS = ("scratch", "compressed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 2 lrs, short runs (CI)")
    ap.add_argument("--out", type=Path, default=Path("out") / "optimizers")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", type=int, default=8, help="learning rates per method (all grids)")
    ap.add_argument("--steps", type=int, default=500, help="steps on (i)-(iv)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs on (v)")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of method names")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument(
        "--only-timing",
        action="store_true",
        help="only the timing pass (short: run it under flock), writes optimizers_timing.json",
    )
    ap.add_argument(
        "--timing-json",
        type=Path,
        default=None,
        help="take the timings from an --only-timing run instead of measuring "
        "(if the file does not exist yet, the table has no timings)",
    )
    ap.add_argument(
        "--reuse-regressions",
        action="store_true",
        help="take (i)-(iv) from a previous run's optimizers_regressions.json in --out",
    )
    ap.add_argument(
        "--ii-seeds",
        type=int,
        default=0,
        help="only: steps to 1e-12 on (ii) over this many seeds for RAdamW, the authors' RAdamW, "
        "PEFT Riemannian AdamW and LoRA + AdamW (writes optimizers_ii_seeds.json)",
    )
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="rebuild table and figure from a saved optimizers_results.json",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.lrs, args.steps, args.epochs = 1, 2, 60, 1
    return args


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------


def run_regressions(methods, args, log) -> dict:
    """``{problem: {method: {seed: {lr: summary}}}}`` plus the best runs' curves."""
    out: dict = {}
    for pk in REG_PROBLEMS:
        out[pk] = {}
        for seed in range(args.seeds):
            prob = lib.regression(lib.PROBLEMS[pk], seed)
            t0 = time.perf_counter()
            for m in methods:
                per = out[pk].setdefault(m.name, {}).setdefault(str(seed), {"lrs": {}})
                best = {}
                for lr in lib.lr_grid(m, args.lrs, LR_RATIO):
                    if m.kind == "rule":
                        run = lib.run_rule(m, prob, lr, args.steps)
                    else:
                        run = lib.run_lora(m, prob, lr, args.steps, seed)
                    steps = run.steps_to()
                    per["lrs"][f"{lr:.6g}"] = {
                        "final": run.final, "steps": steps, "final_rank": int(run.ranks[-1]),
                        "max_rank": int(run.ranks.max()), "state_bytes": run.state_bytes,
                    }  # fmt: skip
                    for crit, key in (
                        ("final", (_fin(run.final),)),
                        ("steps", (steps if steps is not None else math.inf, _fin(run.final))),
                    ):
                        if crit not in best or key < best[crit][0]:
                            best[crit] = (key, lr, run)
                for crit, (_, lr, run) in best.items():
                    per[f"best_{crit}"] = {
                        "lr": lr,
                        "curve": [_fin(v) for v in run.losses],
                        "ranks": [int(v) for v in run.ranks],
                    }
            log(
                f"({pk}) seed {seed}: {len(methods)} methods x {args.lrs} lrs in {time.perf_counter() - t0:.0f} s"
            )
    return out


def _fin(v: float) -> float:
    return float(v) if math.isfinite(v) else math.inf


def run_digits(methods, args, log) -> dict:
    """``{start: {method: {seed: {lr: result}}}}`` for problem (v)."""
    out: dict = {}
    starts = DIGIT_STARTS[:1] if args.quick else DIGIT_STARTS
    for start in starts:
        out[start] = {}
        for seed in range(args.seeds):
            data = lib.digits(seed)
            parts = lib.digits_start(data, start, 8, seed, pretrain_epochs=2 if args.quick else 20)
            t0 = time.perf_counter()
            for m in methods:
                per = out[start].setdefault(m.name, {}).setdefault(str(seed), {})
                for lr in lib.lr_grid(m, args.lrs, LR_RATIO):
                    try:
                        res = lib.train_digits(m, data, parts, lr, args.epochs, seed)
                    except (ValueError, RuntimeError) as e:
                        # a diverging run: a rankopt optimizer refusing a non-finite gradient, or
                        # a factorization of non-finite values (torch's LinAlgError)
                        res = {"val_acc": 0.0, "test_acc": 0.0, "error": str(e)[:200]}
                    per[f"{lr:.6g}"] = res
            log(
                f"(v) {start} seed {seed}: {len(methods)} methods in {time.perf_counter() - t0:.0f} s"
            )
    return out


# ---------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------


def _median(vals: list[float]) -> float:
    return float(np.median(vals)) if vals else math.nan


def summarize(methods, reg: dict, dig: dict, timing: dict, args) -> dict:
    grids = {m.name: [f"{v:.6g}" for v in lib.lr_grid(m, args.lrs, LR_RATIO)] for m in methods}
    rows = {}
    for m in methods:
        row: dict[str, Any] = {"family": m.family, "note": m.note}
        for pk in REG_PROBLEMS:
            per = reg[pk][m.name]
            finals = [per[s]["lrs"][f"{per[s]['best_final']['lr']:.6g}"]["final"] for s in per]
            steps = [per[s]["lrs"][f"{per[s]['best_steps']['lr']:.6g}"]["steps"] for s in per]
            steps_v = [math.inf if v is None else v for v in steps]
            edge = any(
                f"{per[s][c]['lr']:.6g}" in (grids[m.name][0], grids[m.name][-1])
                for s in per for c in ("best_final", "best_steps")
            )  # fmt: skip
            ranks = [per[s]["lrs"][f"{per[s]['best_final']['lr']:.6g}"]["final_rank"] for s in per]
            maxr = [v["max_rank"] for s in per for v in per[s]["lrs"].values()]
            state = [v["state_bytes"] for s in per for v in per[s]["lrs"].values()]
            row[pk] = {
                "final_median": _median(finals), "finals": finals,
                "steps_median": _median(steps_v), "steps": steps,
                "lr_final": [per[s]["best_final"]["lr"] for s in per],
                "lr_steps": [per[s]["best_steps"]["lr"] for s in per],
                "edge": edge, "final_rank": _median(ranks), "max_rank_any_lr": max(maxr),
                "state_bytes": max(state),
            }  # fmt: skip
        for start, per_m in dig.items():
            per = per_m[m.name]
            best = [
                max(per[s].items(), key=lambda kv: (kv[1]["val_acc"], -float(kv[0]))) for s in per
            ]
            row[f"v-{start}"] = {
                "test_acc_median": _median([b[1]["test_acc"] for b in best]),
                "test_accs": [b[1]["test_acc"] for b in best],
                "val_accs": [b[1]["val_acc"] for b in best],
                "lrs": [float(b[0]) for b in best],
                "edge": any(b[0] in (grids[m.name][0], grids[m.name][-1]) for b in best),
                "final_rank": [b[1].get("final_rank") for b in best],
                "max_rank": max((b[1].get("max_rank") or 0) for b in best),
                "max_rank_any_lr": max(
                    (v.get("max_rank") or 0) for s in per for v in per[s].values()
                ),
                "start_rank": max((b[1].get("start_rank") or 0) for b in best),
            }
        row["timing"] = timing.get(m.name, {})
        rows[m.name] = row
    return rows


def _ii_steps_line(ours: dict, ref: dict) -> str:
    """(ii): steps to 1e-12 of RAdamW against the authors' RAdamW, and the target ratio."""
    a, b = ours["ii"]["steps_median"], ref["ii"]["steps_median"]
    sa = ["-" if v is None else v for v in ours["ii"]["steps"]]
    sb = ["-" if v is None else v for v in ref["ii"]["steps"]]
    if math.isfinite(a) and math.isfinite(b):
        verdict = f"ratio {a / b:.2f}"
    elif math.isfinite(a):
        verdict = "ratio < 1 (the authors' median seed does not reach 1e-12)"
    else:
        verdict = "RAdamW's median seed does not reach 1e-12"
    return (
        f"(ii) from W = 0, steps to 1e-12 (median of seeds, each at its fastest lr): RAdamW "
        f"{a:g} (seeds: {sa}) vs authors' RAdamW {b:g} (seeds: {sb}): {verdict} "
        "(target: ratio <= 1.25)"
    )


def _final_loss_line(pk: str, a: float, other: str, b: float, floor: float) -> str:
    """One final-loss comparison, said as a comparison: which is lower, and by how much."""
    if max(a, b) <= floor or a == b:
        verdict = "equal"
    elif a < b:
        verdict = f"RAdamW lower, {other}'s is {b / max(a, floor):.1f}x RAdamW's"
    else:
        verdict = f"RAdamW higher, {a / max(b, floor):.1f}x {other}'s"
    return (
        f"({pk}) comparison of final relative loss (lower is better; each method at its best "
        f"lr, median of seeds): RAdamW {a:.2e} vs {other} {b:.2e}: {verdict} (losses below "
        f"{floor:g} count as equal)"
    )


def acceptance(rows: dict) -> list[str]:
    """The benchmark's summary lines, as measured here: RAdamW against the authors' RAdamW
    (steps, with its target), RAdamW's final loss against LoRA + AdamW and PEFT's Riemannian
    AdamW (comparisons: either may be lower), and whether the DLRA optimizers stay within
    their starting rank."""
    out = []
    ours, ref = rows.get("RAdamW"), rows.get("authors' RAdamW (reference)")
    if ours and ref:
        out.append(_ii_steps_line(ours, ref))
    floor = 1e-25
    for other in ("LoRA + AdamW", "PEFT Riemannian AdamW"):
        if ours and other in rows:
            for pk in REG_PROBLEMS:
                a, b = ours[pk]["final_median"], rows[other][pk]["final_median"]
                out.append(_final_loss_line(pk, a, other, b, floor))
    for name in ("DLRAAdam", "DLRAHeavyBall"):
        r = rows.get(name, {}).get("v-compressed")
        if r:
            hi = r["max_rank_any_lr"]
            out.append(
                f"(v) compressed, {name}: start rank {r['start_rank']}, highest rank in any run "
                f"(every lr and seed) {hi}: never above the start: {hi <= r['start_rank']}"
            )
    return out


# ---------------------------------------------------------------------------
# table and figure
# ---------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.1e}"


def table(rows: dict, args, header: str) -> str:
    lines = [
        "# Optimizer benchmark (python -m benchmarks.optimizers)", "", "```", header, "```", "",
        f"Seeds: {args.seeds}; learning rates per method: {args.lrs} (ratio {LR_RATIO:g} end to "
        f"end); steps on (i)-(iv): {args.steps}; epochs on (v): {args.epochs}."
        + (" QUICK MODE: numbers are a smoke test, not results." if args.quick else ""), "",
        "## (i)-(iv): final relative loss (median over seeds, each at its best lr) / steps to 1e-12", "",
        "| method | family | (i) | (ii) | (iii) | (iv) | final rank (iii) | highest rank (ii), any lr |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in rows.items():
        cells = []
        for pk in REG_PROBLEMS:
            c = r[pk]
            st = c["steps_median"]
            cells.append(
                f"{_fmt(c['final_median'])} / {'–' if not math.isfinite(st) else int(st)}{'*' if c['edge'] else ''}"
            )
        lines.append(
            f"| {name} | {r['family']} | "
            + " | ".join(cells)
            + f" | {r['iii']['final_rank']:g} | {r['ii']['max_rank_any_lr']} |"
        )
    lines += ["", "`*`: a best learning rate at the edge of its grid.", ""]
    lines += [
        "## (v) digits MLP, hidden 256 x 256 at rank 8: test accuracy (median; lr by validation), and cost", "",
        "| method | from scratch | compressed | final rank (compressed) | ms/step (i) layer | ms/step (v) MLP | state bytes (i) | state bytes (v) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in rows.items():
        acc = []
        for start in DIGIT_STARTS:
            c = r.get(f"v-{start}")
            acc.append(
                "–" if c is None else f"{c['test_acc_median']:.3f}{'*' if c['edge'] else ''}"
            )
        comp = r.get("v-compressed")
        rank = "–" if comp is None else "/".join(str(v) for v in comp["final_rank"])
        t = r["timing"]
        ms = [f"{t[k]['ms_median']:.2f}" if k in t else "–" for k in ("(i) layer", "(v) MLP")]
        se = [f"{t[k]['state_bytes']:,}" if k in t else "–" for k in ("(i) layer", "(v) MLP")]
        lines.append(
            f"| {name} | {acc[0]} | {acc[1]} | {rank} | {ms[0]} | {ms[1]} | {se[0]} | {se[1]} |"
        )
    return "\n".join(lines) + "\n"


FIG_METHODS = {
    k: lib.METHOD_STYLES[k]
    for k in (
        "LoRA + AdamW",
        "ScaledGD",
        "PEFT Riemannian AdamW",
        "PEFT LoRA+ AdamW",
        "authors' RAdamW (reference)",
        "authors' RAdaGrad (reference)",
        "RAdamW",
        "RAdaGrad",
        "RAdamW quartic+PCG",
        "DLRAAdam",
        "DLRAHeavyBall",
        "Riemannion",
        "Riemannion + LOI",
    )
}


def plot(reg: dict, rows: dict, path: Path, quick: bool) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), layout="constrained")
    for ax, pk in zip(axes.flat[:4], REG_PROBLEMS, strict=True):
        for name, (color, ls) in FIG_METHODS.items():
            per = reg[pk].get(name)
            if not per:
                continue
            curve = np.array(per["0"]["best_steps"]["curve"], dtype=float)
            ax.semilogy(np.maximum(curve, 1e-30), color=color, ls=ls, lw=1.4, label=name)
        ax.axhline(lib.TARGET, color="0.6", lw=0.8)
        ax.set_title(lib.PROBLEMS[pk].title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("relative loss (seed 0, fastest lr)")
        ax.set_ylim(1e-30, 10)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    ax = axes.flat[4]
    names = [n for n in rows if "v-scratch" in rows[n]]
    ypos = np.arange(len(names))
    for off, start, color in ((-0.2, "scratch", "tab:blue"), (0.2, "compressed", "tab:orange")):
        vals = [rows[n].get(f"v-{start}", {}).get("test_acc_median", np.nan) for n in names]
        ax.barh(ypos + off, vals, height=0.4, color=color, label=start)
    ax.set_yticks(ypos, names, fontsize=6)
    ax.set_xlim(0.9, 1.0)
    ax.set_xlabel("(v) test accuracy (median of seeds; 0.9 at the left edge)")
    ax.legend(fontsize=7)
    ax = axes.flat[5]
    for n, r in rows.items():
        t = r["timing"].get("(i) layer")
        st = r["ii"]["steps_median"]
        if t and math.isfinite(st):
            ax.scatter(t["state_bytes"] + 1, st, s=18)
            ax.annotate(n, (t["state_bytes"] + 1, st), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state [bytes], (i) layer (+1)")
    ax.set_ylabel("(ii) steps to 1e-12 (median)")
    title = "Optimizers on (i)-(v)" + (" — QUICK smoke run, not results" if quick else "")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def losses_and_accuracies(methods: list, args: argparse.Namespace, log, header: str) -> tuple:
    """(i)-(iv) and (v): run, or read from ``--from-json`` (with its header and settings) or
    ``--reuse-regressions``; returns the methods, the two results and the header."""
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        reg, dig, header = (
            saved["regressions"],
            saved["digits"],
            saved["machine"].split("\ntimings from")[0],
        )
        for k in ("seeds", "lrs", "steps", "epochs", "quick"):
            setattr(args, k, saved["args"][k])
        return [m for m in methods if m.name in reg["i"]], reg, dig, header
    partial = args.out / "optimizers_regressions.json"
    if args.reuse_regressions and partial.exists():
        reg = json.loads(partial.read_text())
        log(f"(i)-(iv) taken from {partial}")
    else:
        reg = run_regressions(methods, args, log)
        partial.write_text(json.dumps(reg, default=_json_default))
    dig = {} if args.skip_digits else run_digits(methods, args, log)
    return methods, reg, dig, header


def timings(methods: list, args: argparse.Namespace, log, header: str) -> tuple[dict, str]:
    """The timing pass: measured now, or read from ``--timing-json`` (whose machine joins the
    header); returns the timings and the header."""
    if args.timing_json is None:
        return measure_timing(methods, args, log), header
    if not args.timing_json.exists():
        log(f"no {args.timing_json} yet: the table has no timings")
        return {}, header
    saved_t = json.loads(args.timing_json.read_text())
    header += "\ntimings from " + str(args.timing_json) + ", measured on:\n" + saved_t["machine"]
    return saved_t["timing"], header


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    threads = pin_threads(1, torch=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = machine_info(("numpy", "scipy", "torch", "peft", "scikit-learn", "rankopt"))
    header += "\n" + threads

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(header)
    methods = lib.all_methods()
    if args.methods:
        unknown = set(args.methods) - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}")
        methods = [m for m in methods if m.name in args.methods]
    t0 = time.perf_counter()
    if args.ii_seeds:
        res = ii_seeds(methods, args, log)
        (args.out / "optimizers_ii_seeds.json").write_text(json.dumps({"machine": header, **res}))
        return 0
    if args.only_timing:
        timing = measure_timing(methods, args, log)
        payload = {"machine": header, "timing": timing, "threads": torch.get_num_threads()}
        (args.out / "optimizers_timing.json").write_text(json.dumps(payload))
        log(f"wrote {args.out}/optimizers_timing.json ({time.perf_counter() - t0:.0f} s)")
        return 0
    methods, reg, dig, header = losses_and_accuracies(methods, args, log, header)
    timing, header = timings(methods, args, log, header)
    rows = summarize(methods, reg, dig, timing, args)
    checks = acceptance(rows)
    md = (
        table(rows, args, header)
        + "\n## Summary: measured comparisons (not pass/fail tests)\n\n"
        + "\n".join(f"- {c}" for c in checks)
        + "\n"
    )
    (args.out / "optimizers_table.md").write_text(md)
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": header, "rows": rows, "checks": checks, "regressions": reg, "digits": dig,
               "seconds": time.perf_counter() - t0}  # fmt: skip
    (args.out / "optimizers_results.json").write_text(json.dumps(payload, default=_json_default))
    plot(reg, rows, args.out / "optimizers.png", args.quick)
    print(md)
    log(f"wrote {args.out}/optimizers_table.md, optimizers_results.json, optimizers.png "
        f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return 0


II_METHODS = ("RAdamW", "authors' RAdamW (reference)", "PEFT Riemannian AdamW", "LoRA + AdamW")


def ii_seeds(methods, args, log) -> dict:
    """Steps to 1e-12 on (ii) for ``args.ii_seeds`` seeds (each at its fastest lr of the same
    grids), for the methods of the (ii) comparison."""
    chosen = [m for m in methods if m.name in II_METHODS]
    per: dict = {m.name: [] for m in chosen}
    for seed in range(args.ii_seeds):
        prob = lib.regression(lib.PROBLEMS["ii"], seed)
        for m in chosen:
            best = math.inf
            for lr in lib.lr_grid(m, args.lrs, LR_RATIO):
                run = (
                    lib.run_rule(m, prob, lr, args.steps)
                    if m.kind == "rule"
                    else lib.run_lora(m, prob, lr, args.steps, seed)
                )
                st = run.steps_to()
                best = min(best, st if st is not None else math.inf)
            per[m.name].append(best)
        log(f"(ii) seed {seed}: " + ", ".join(f"{k} {v[-1]}" for k, v in per.items()))
    med = {k: float(np.median(v)) for k, v in per.items()}
    both = [
        (a, b) for a, b in zip(per["RAdamW"], per["authors' RAdamW (reference)"], strict=True)
        if math.isfinite(a) and math.isfinite(b)
    ]  # fmt: skip
    out = {"steps": per, "median": med, "ratio_where_both_reach": [a / b for a, b in both]}
    log(f"medians: {med}; RAdamW / authors' on the seeds where both reach 1e-12: "
        f"{[round(x, 2) for x in out['ratio_where_both_reach']]}")  # fmt: skip
    return out


def measure_timing(methods, args, log) -> dict:
    """The interleaved timing pass (see the module docstring)."""
    data = lib.digits(0)
    parts = lib.digits_start(data, "scratch", 8, 0)
    setups = lib.timing_setups(lib.regression(lib.PROBLEMS["i"], 0), data, parts)
    rounds, steps, warm = (1, 3, 2) if args.quick else (5, 20, 5)
    return lib.time_methods(methods, setups, rounds, steps, warm, lambda m: m.lr_lo, log)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


if __name__ == "__main__":
    raise SystemExit(main())
