"""Smoke test of ``python -m benchmarks.completion --quick``: it runs, prints its table and writes its files.

The script is run in a subprocess exactly as a user would run it (about 15-25 s on 2 cores,
most of it imports and numba's cache load). Beyond "it runs", the test checks what the output
claims: the table has a row per method and problem, the "auto" solver recovers the kappa = 1
truth to the acceptance accuracy, the JSON results agree with the printed table, and the PNG
is a real image of the expected layout (2 rows of panels).
"""

from __future__ import annotations

import importlib.util
import json

import pytest


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_script):
    out = tmp_path_factory.mktemp("completion_quick")
    proc = run_script(["-m", "benchmarks.completion", "--quick", "--repeats", "1", "--out", out])
    return proc.stdout, out


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| n |"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_prints_machine_info_and_table(quick_run):
    stdout, _ = quick_run
    assert "CPU:" in stdout and "load average" in stdout and "versions:" in stdout
    assert "| n | kappa | oversampling | method | iterations | time [s] | rel. error |" in stdout
    rows = _table_rows(stdout)
    methods = {r[3] for r in rows}
    assert {"auto", "RCG"} <= methods
    assert {r[1] for r in rows} == {"1", "100"}  # the two quick kappas
    for r in rows:
        assert r[0] == "300" and int(r[4]) >= 0 and float(r[5]) > 0 and float(r[6]) >= 0


def test_auto_recovers_truth_in_quick_run(quick_run):
    stdout, out = quick_run
    results = json.loads((out / "completion_results.json").read_text())
    auto = {r["kappa"]: r for r in results["rows"] if r["method"] == "auto"}
    assert set(auto) == {1.0, 100.0}
    assert auto[1.0]["stop"] == "gradient" and auto[1.0]["rel_error"] <= 1e-8, auto[1.0]
    # the same stopping rule for rankopt and pymanopt: a run stopped by the iteration cap made
    # exactly that many steps (pymanopt counts its start as an iteration; the script corrects it)
    for r in results["rows"]:
        assert r["iterations"] <= 200
        if r["stop"] == "max-iter":
            assert r["iterations"] == (200 if r["method"] == "auto" else 150), r
    # the printed table reports the same numbers as the JSON
    printed = {(r[1], r[3]): r for r in _table_rows(stdout)}
    for r in results["rows"]:
        row = printed[(f"{r['kappa']:g}", r["method"])]
        assert int(row[4]) == r["iterations"]
        assert float(row[6]) == pytest.approx(r["rel_error"], rel=0.06, abs=1e-17)


def test_writes_png_and_markdown(quick_run):
    _, out = quick_run
    png = out / "completion_convergence.png"
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    h, w = img.shape[:2]
    assert w > 600 and h > 600 and h > 0.6 * w  # two rows (iteration, time) x two kappas
    assert img.std() > 0.05  # not a blank canvas
    md = (out / "completion_table.md").read_text()
    assert md.startswith("# completion benchmark")
    assert "| method |" in md and "rankopt.solve median" in md
    if importlib.util.find_spec("pymanopt") is not None:
        assert "pymanopt CG" in md and "ratio of medians" in md
