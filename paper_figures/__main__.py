"""``python -m paper_figures [--quick] [--out DIR] [--only NAME ...]``: every paper figure."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_all import main  # noqa: E402

if __name__ == "__main__":
    for path in main():
        print(path)
