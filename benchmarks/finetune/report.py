"""The finetune benchmark's report: the markdown tables, ``finetune.json`` and the figure.

The accuracy table (per task and method: chosen rate and grid, test accuracy mean ± s.e. over
seeds, validation accuracy, optimizer state in KiB, trainable parameters) and the timing
table (ms per step and per optimizer step, from the timing stage).
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.finetune.models import COMPRESS_RANK, RANK
from benchmarks.finetune.tasks import COMPRESS_DATA, TASKS
from benchmarks.harness import command_line, pyplot


def summarize(res: dict) -> dict:
    """One method's final runs: test accuracy mean, s.e. and count, validation accuracy, median
    ms per step and per optimizer step, state bytes, trainable count, runs flagged diverged."""
    acc = [r["test_acc"] for r in res["finals"]]
    n = len(acc)
    mean = statistics.fmean(acc)
    se = statistics.stdev(acc) / math.sqrt(n) if n > 1 else float("nan")
    return dict(mean=mean, se=se, n=n, val=statistics.fmean(r["val_acc"] for r in res["finals"]),
                ms_step=statistics.median(r["ms_step"] for r in res["finals"]),
                ms_opt=statistics.median(r["ms_opt"] for r in res["finals"]),
                state=res["finals"][0]["opt_state_bytes"], trainable=res["finals"][0]["trainable"],
                diverged=sum(r["status"] != "ok" for r in res["tune"] + res["finals"]))  # fmt: skip


def table(all_results: dict, timing: dict | None = None) -> str:
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


def _panel(ax: Any, task: str, res: dict) -> None:
    """One task: test accuracy (mean ± s.e.) per method, rankopt's in red."""
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
    classes = TASKS[COMPRESS_DATA if task == "compress" else task].classes
    chance = f"chance {1.0 / len(classes):.2f}" if classes else "next-token acc."
    lo = min(v["mean"] - e for v, e in zip(s, se, strict=True))
    hi = max(v["mean"] + e for v, e in zip(s, se, strict=True))
    pad = max(0.01, 0.15 * (hi - lo))
    ax.set_xlim(lo - pad, hi + pad)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("test accuracy (mean ± s.e. over seeds)", fontsize=8)
    what = (f"rank {COMPRESS_RANK}, {COMPRESS_DATA} data" if task == "compress"
            else f"{len(classes)} classes, rank {RANK}" if classes
            else f"causal LM, rank {RANK} on c_attn")  # fmt: skip
    ax.set_title(f"{task}: {what} ({chance})", fontsize=9)


def plot(all_results: dict, args: Namespace, path: Path) -> None:
    """One panel per task (:func:`_panel`); the title says a ``--quick`` run is a smoke run."""
    plt = pyplot()
    tasks = list(all_results)
    ncol = 2 if len(tasks) > 1 else 1
    nrow = math.ceil(len(tasks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(7.0 * ncol, 3.6 * nrow + 0.8), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        _panel(ax, task, all_results[task])
    title = (f"MiniLM-L6 / GPT-2 fine-tuning, {args.steps} steps, {len(args.seeds)} seed(s), each "
             "method at its best lr on validation; red: rankopt, gray: PEFT / GaLore / SVD+AdamW")  # fmt: skip
    title = "\n".join(textwrap.wrap(title, 100 * ncol))  # one panel: two lines
    if args.quick:
        title = "SMOKE RUN (--quick: tiny data, few steps; numbers mean nothing)\n" + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(all_results: dict, timing: dict, args: Namespace, argv: list[str] | None) -> str:
    """Print the tables and write ``finetune.md``, ``finetune.json`` and ``finetune.png`` to
    ``args.out``; returns the markdown tables."""
    md = table(all_results, timing)
    print(md)
    out = Path(args.out)
    (out / "finetune.md").write_text(
        f"# finetune benchmark{' (QUICK smoke run)' if args.quick else ''}\n\n"
        f"Command: `{command_line('benchmarks.finetune', argv)}`\n\n{md}\n"
    )
    (out / "finetune.json").write_text(json.dumps(
        {k: {m: dict(summarize(r), label=r["label"], best_lr=r["best_lr"]) for m, r in v.items()}
         for k, v in all_results.items()}, indent=1))  # fmt: skip
    plot(all_results, args, out / "finetune.png")
    return md
