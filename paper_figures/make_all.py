r"""Regenerate every paper figure with one command.

    python -m paper_figures                     # full mode (the same as make_all.py)
    python -m paper_figures --quick             # small sizes: seconds per figure
    python -m paper_figures.make_all --out DIR --only fig_kappa fig_metrics

Each figure script also runs on its own (``python -m paper_figures.fig_kappa --quick``). The
scripts run in this one process (one import of NumPy/Numba/Matplotlib, one JIT warm-up) and
each writes ``<name>.png`` and ``<name>.json`` (the numbers the figure shows) into ``--out``
(default ``out/paper_figures``).
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence
from pathlib import Path

from paper_figures._common import DEFAULT_OUT

FIGURES = ("fig_kappa", "fig_factorized", "fig_metrics", "fig_seeds", "fig_dlra")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the selected figure scripts; return the PNG paths written."""
    ap = argparse.ArgumentParser(description="Regenerate the paper figures.")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds per figure)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    args = ap.parse_args(argv)
    passthrough = ["--out", str(args.out), "--seed", str(args.seed)]
    if args.quick:
        passthrough.append("--quick")
    written: list[Path] = []
    for name in args.only:
        t0 = time.perf_counter()
        print(f"== {name} {' '.join(passthrough)}", flush=True)
        written += importlib.import_module(f"paper_figures.{name}").main(passthrough)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
