"""``python -m benchmarks.finetune``: the options, and the benchmark's stages in order.

Machine header and thread counts; the accuracy runs of every task (:mod:`.protocol`); the timing
stage of the ``--timing-task`` tasks (:mod:`.timing`); the tables, JSON and figure
(:mod:`.report`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import benchmarks.finetune as package
from benchmarks.finetune.methods import COMPRESS_METHODS, METHODS, Method
from benchmarks.finetune.models import load_encoder, offline
from benchmarks.finetune.protocol import run_task
from benchmarks.finetune.report import write
from benchmarks.finetune.runs import Runner
from benchmarks.finetune.tasks import COMPRESS_DATA, TASKS
from benchmarks.finetune.timing import timing_stage
from benchmarks.harness import LOCK, machine_info, pin_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` sets the smoke run's sizes (and no lock)."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.finetune", description=package.__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="CI smoke run (< 60 s)")
    ap.add_argument("--tasks", nargs="+", default=[*TASKS, "compress"])
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the method keys")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data-seed", type=int, default=0, help="the train/val/test split")
    ap.add_argument("--threads", type=int, default=1, help="threads of every pool (torch, BLAS)")
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
    return args


def accuracy_runs(runner: Runner, args: argparse.Namespace) -> dict:
    """task -> method key -> results of the learning-rate protocol."""

    def grids(method: Method) -> tuple[float, ...]:
        return method.grid[1:2] if args.quick else method.grid

    def pick(methods: dict[str, Method]) -> dict[str, Method]:
        return {k: v for k, v in methods.items() if args.methods is None or k in args.methods}

    all_results = {}
    for task in args.tasks:
        print(f"== {task}", flush=True)
        if task == "compress":
            all_results[task] = run_task(runner, task, pick(COMPRESS_METHODS), COMPRESS_DATA,
                                         args.seeds, grids)  # fmt: skip
        else:
            all_results[task] = run_task(runner, task, pick(METHODS), task, args.seeds, grids)
    return all_results


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns task -> method key -> results."""
    args = parse_args(argv)
    offline()
    threads = pin_threads(args.threads, torch=True)
    print(machine_info(("numpy", "torch", "transformers", "peft", "galore-torch", "rankopt")))
    print(threads)
    print(f"steps {args.steps}, batch {args.batch}, seeds {args.seeds}, out {args.out}", flush=True)
    runner = Runner(args, load_encoder())
    all_results = accuracy_runs(runner, args)
    timing = {}
    for ttask in args.timing_task.split(","):
        if ttask not in all_results:
            continue
        print(f"== timing ({ttask}, {args.timing_rounds} x {args.timing_steps} steps per "
              "method, interleaved)", flush=True)  # fmt: skip
        timing[ttask] = timing_stage(runner, ttask, all_results[ttask], args.timing_rounds,
                                     args.timing_steps)  # fmt: skip
    write(all_results, timing, args, argv)
    out = Path(args.out)
    print(f"wrote {out / 'finetune.png'}, {out / 'finetune.md'} "
          f"({time.perf_counter() - runner.t0:.0f} s)")  # fmt: skip
    return all_results
