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
