"""The README's code example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    """The "Fifteen lines" example (fifteen lines of code at most, blank lines aside) runs, and
    every number it prints comes with its label."""
    src = README.read_text()
    code = re.search(r"## Fifteen lines\n\n```python\n(.*?)```", src, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip()
    assert out.startswith("stop: gradient, iterations: "), out
    for label in ("time: ", "relative error: "):
        assert label in out
    for number in re.findall(r"[-+]?\d[\d.e+-]*", out):  # each number follows "label: "
        assert re.search(r"\w: " + re.escape(number), out), (number, out)
    assert float(out.split("relative error: ")[1]) < 1e-8


def test_readme_commands_match_ci():
    src = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = (
        re.search(r"Install and run the tests.*?```bash\n(.*?)\n```", src, re.S).group(1).strip()
    )
    assert test_cmd in ci.splitlines(), "'.ci/run' must run exactly the README's test command"
    assert "python -m rankopt demo" in src


def _demo_rows(text: str) -> dict[str, tuple[int, float, int, str]]:
    """method -> (iterations, relative error, rank, stop) from the demo's table (its columns:
    method, iterations, time, relative error, rank, stop, converged in words)."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 7 and parts[1].isdigit():
            rows[parts[0]] = (int(parts[1]), float(parts[3]), int(parts[4]), parts[5])
    return rows


def test_demo_numbers_meet_its_claims_and_repeat(tmp_path, capsys):
    """The demo (small size) exits 0 only when "auto" recovers the matrix (error <= 1e-6), prints
    finite numbers, writes a readable PNG, and a second run gives the same iteration counts
    (no time limit by default: counts do not depend on the machine's load)."""
    import math

    import matplotlib.image as mpimg

    from rankopt.__main__ import main

    png = tmp_path / "demo.png"
    args = ["demo", "--size", "200", "--kappa", "100", "--max-iter", "150", "--plot", str(png)]
    assert main(args) == 0
    first = _demo_rows(capsys.readouterr().out)
    assert set(first) == {"auto", "rcg"}
    for it, err, rank, _ in first.values():
        assert it > 0 and math.isfinite(err) and rank == 10
    assert first["auto"][1] <= 1e-6 and first["auto"][3] == "gradient"
    assert first["rcg"][1] > 1e-3  # the demo's point: a fixed-rank method stalls at kappa 100
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200
    assert main(args[:-1] + [""]) == 0
    second = _demo_rows(capsys.readouterr().out)
    assert {k: v[0] for k, v in first.items()} == {k: v[0] for k, v in second.items()}


# The user docs of this repository that say how to install rankopt and what it measured today
# (docs/torch.md, optimizers.md, solvers.md and manifold.md are checked by their own tests).
USER_DOCS = ["README.md"] + [
    f"docs/{name}.md"
    for name in ("index", "completion", "pymanopt", "backends", "figures", "optimizer-core")
]
INTERNAL_HISTORY = re.compile(
    r"\bissue \d|\bissue's\b|\b(last|later|lead) session\b|before the rewrite|"
    r"until 20\d\d-\d\d|\bthe old code\b|\bprevious default\b|\bbefore this change\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("name", USER_DOCS)
def test_user_docs_install_from_a_clone_and_state_what_is_true_now(name):
    """rankopt is not published: install lines are ``pip install -e ".[extra]"`` from a clone,
    never ``pip install 'rankopt[extra]'``; and no development history ("issue 12", "last
    session", ...) in place of what is true now."""
    text = (README.parent / name).read_text()
    assert not re.search(r"pip install\s+['\"]?rankopt\b", text), name
    found = [m.group(0) for m in INTERNAL_HISTORY.finditer(text)]
    assert not found, f"{name}: {found}"
