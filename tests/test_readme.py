"""The README's code example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    src = README.read_text()
    code = re.search(r"## Fifteen lines\n\n```python\n(.*?)```", src, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md", "exec"), {})


def test_readme_commands_match_ci():
    src = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = (
        re.search(r"Install and run the tests.*?```bash\n(.*?)\n```", src, re.S).group(1).strip()
    )
    assert test_cmd in ci.splitlines(), "'.ci/run' must run exactly the README's test command"
    assert "python -m rankopt demo" in src


def _demo_rows(text: str) -> dict[str, tuple[int, float, int, str]]:
    """method -> (iterations, relative error, rank, stop) from the demo's table."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1].isdigit():
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
