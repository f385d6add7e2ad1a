"""``python -m benchmarks.finetune [--quick] ...``: see :mod:`benchmarks.finetune`."""

from benchmarks.finetune.cli import main

if __name__ == "__main__":
    main()
