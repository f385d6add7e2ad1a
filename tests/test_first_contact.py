"""What a new user meets first: ``python -m rankopt`` with and without arguments, its help, the
demo's screen, and ``import peft`` from the test environment. Each command runs in a fresh
interpreter, as the user runs it, and what it prints is checked."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import rankopt as ro
from rankopt.__main__ import _Run, _run, _verdict

DEMO_OPTIONS = (
    "--size", "--rank", "--kappa", "--oversampling", "--tol", "--seed", "--max-time",
    "--max-iter", "--methods", "--plot",
)  # fmt: skip
SMALL_DEMO = ["demo", "--size", "200", "--max-iter", "150", "--plot", ""]


def _cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m rankopt ARGS`` in a new interpreter, in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "rankopt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _option_help(text: str) -> dict[str, str]:
    """Option -> its help text, from argparse's help output (an option's block runs until the
    next line that starts with an option)."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(
            r"^\s{2}(--?[\w-]+)(?:,\s*--[\w-]+)?((?: [A-Z_]+)*(?: \[[^\]]*\])?)\s*(.*)$", line
        )
        if m:
            current = m.group(1)
            blocks[current] = m.group(3)
        elif current and line.startswith(" " * 6):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_is_plain_text(tmp_path):
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "``" not in proc.stdout and "`" not in proc.stdout  # no reST/markdown markup
    assert "demo" in proc.stdout and "python -m rankopt demo" in proc.stdout


def test_demo_help_explains_every_option(tmp_path):
    proc = _cli(["demo", "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "`" not in proc.stdout
    helps = _option_help(proc.stdout)
    for opt in DEMO_OPTIONS:
        assert opt in helps, f"{opt} missing from the demo's help"
        assert len(helps[opt].split()) >= 5, f"{opt} is not explained: {helps[opt]!r}"
    for opt in ("--size", "--rank", "--kappa", "--oversampling", "--tol", "--seed"):
        assert "default" in helps[opt], f"{opt}: no default in {helps[opt]!r}"


def test_no_command_prints_help_and_exits_0(tmp_path):
    proc = _cli([], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "usage:" in proc.stdout and "python -m rankopt demo" in proc.stdout


def test_unknown_command_is_an_error(tmp_path):
    proc = _cli(["bogus"], tmp_path)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.slow
def test_demo_screen_has_no_warning_and_says_why_the_comparison_stops(tmp_path):
    """The comparison method (rcg) stops at its iteration limit: the table and a sentence say
    so; nothing that reads as a failure goes to stderr; the exit status is 0."""
    proc = _cli(SMALL_DEMO, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    assert proc.stderr == ""
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if re.match(r"^\w+\s+\d+\s", ln)}
    assert set(rows) == {"auto", "rcg"}
    assert rows["auto"].rstrip().endswith("yes")
    assert rows["rcg"].rstrip().endswith("no: iteration limit (comparison)")
    text = " ".join(proc.stdout.split())
    assert "shown for comparison" in text and "not an error" in text
    assert "recovered (check passed)" in text


@pytest.mark.slow
def test_demo_does_not_hide_a_failure_of_the_checked_method(tmp_path):
    """When the first (checked) method does not converge, its ConvergenceWarning reaches
    stderr, the table says NO, and the exit status is 1."""
    proc = _cli(["demo", "--size", "150", "--methods", "rcg", "--max-iter", "20", "--plot", ""],
                tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "ConvergenceWarning" in proc.stderr
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("rcg "))
    assert row.rstrip().endswith("NO")
    assert "NOT recovered" in proc.stdout


def _fake_solve(stop: str, extra: type[Warning] | None):
    """A stand-in for ``rankopt.solve`` that warns as the real one does for ``stop``."""

    def solve(problem, **kw):
        if extra is not None:
            warnings.warn("something else went wrong", extra, stacklevel=2)
        warnings.warn(f"stopped: {stop}", ro.ConvergenceWarning, stacklevel=2)
        return types.SimpleNamespace(stop_reason=stop, converged=False, iterations=3, point=None)

    return solve


@pytest.mark.parametrize("stop", ["non-finite", "min-step"])
def test_comparison_keeps_warnings_that_are_not_a_budget_stop(stop):
    """Only a comparison's budget stop (max-iter, max-time) is turned into a table line: any
    other ConvergenceWarning, and every other warning, still reaches the user."""
    fake_ro = types.SimpleNamespace(
        solve=_fake_solve(stop, None), ConvergenceWarning=ro.ConvergenceWarning
    )
    problem = types.SimpleNamespace(relative_error=lambda point: 0.5)
    args = types.SimpleNamespace(max_time=None, max_iter=None, rank=2, tol=1e-12, seed=0)
    with pytest.warns(ro.ConvergenceWarning, match=stop):
        run = _run(fake_ro, problem, "rcg", args, compare=True)
    assert run.caught == [] and _verdict(run, first=False) == "NO"


def test_comparison_budget_stop_is_caught_but_other_warnings_pass():
    fake_ro = types.SimpleNamespace(
        solve=_fake_solve("max-iter", RuntimeWarning), ConvergenceWarning=ro.ConvergenceWarning
    )
    problem = types.SimpleNamespace(relative_error=lambda point: 0.5)
    args = types.SimpleNamespace(max_time=None, max_iter=None, rank=2, tol=1e-12, seed=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run = _run(fake_ro, problem, "rcg", args, compare=True)
    assert [w.category for w in seen] == [RuntimeWarning]
    assert run.caught == ["stopped: max-iter"] and isinstance(run, _Run)
    assert _verdict(run, first=False) == "no: iteration limit (comparison)"
    fake_ro.solve = _fake_solve("max-iter", None)
    with pytest.warns(ro.ConvergenceWarning):  # the checked method's warning: never caught
        first = _run(fake_ro, problem, "rcg", args, compare=False)
    assert first.caught == [] and _verdict(first, first=True) == "NO"


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_import_peft_prints_nothing():
    """PEFT (and GaLore, through bitsandbytes) import without a message: the data extra pins
    bitsandbytes below 0.49, whose import asks the Hugging Face Hub for a CPU kernel and logs
    "Failed to load CPU gemm_4bit_forward" when it cannot."""
    code = "import peft\nimport importlib.util\n"
    code += "if importlib.util.find_spec('galore_torch'):\n    import galore_torch\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
