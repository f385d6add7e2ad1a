"""The documentation builds strictly and its API reference covers every public module.

``mkdocs build --strict`` (broken links and anchors fail it, see ``mkdocs.yml``) runs in a
subprocess, about 3 s; mkdocs and the mkdocstrings handler are in the ``test`` extra for this.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    """Dotted names of rankopt's public modules (files and packages not starting with ``_``)."""
    out = []
    for path in sorted((ROOT / "rankopt").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or "__pycache__" in parts:
            continue
        out.append(".".join(parts))
    return out


def documented_modules() -> set[str]:
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    return set(re.findall(r"^::: ([\w.]+)", text, re.M))


def test_api_reference_covers_every_public_module():
    mods = public_modules()
    assert {"rankopt.solvers", "rankopt.problems", "rankopt.torch", "rankopt.pymanopt"} <= set(mods)
    documented = documented_modules()
    missing = [m for m in mods if m not in documented]
    assert not missing, f"public modules without an API reference entry in docs/api/: {missing}"


def test_api_pages_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        assert f"api/{page.name}" in nav, page.name


def test_which_solver_table_is_in_the_docs():
    text = (ROOT / "docs" / "solvers.md").read_text()
    section = text.split("## Which solver when")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 10  # header + situations
    for key in ("kappa", "noisy", "gradient only", "large", "GPU", "stochastic", "measured"):
        assert key in section, key
    # every situation row carries measured numbers (or says it was not measured)
    assert all(re.search(r"\d\.\d", row) or "not measured" in row for row in rows[1:]), rows


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs not installed: pip install -e '.[test]' (it is in the test extra)",
)
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "solvers" / "index.html").is_file()
