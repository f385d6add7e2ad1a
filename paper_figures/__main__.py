"""``python -m paper_figures [--quick] [--out DIR] [--only NAME ...]``: every paper figure."""

from __future__ import annotations

from paper_figures.make_all import main

if __name__ == "__main__":
    for path in main():
        print(path)
