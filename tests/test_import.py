"""``import rankopt`` stays light: torch, cupy and pymanopt load only on first use.

Each check runs in a fresh interpreter (``sys.modules`` of the test process already holds
torch from other tests).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "cupy", "cupyx", "pymanopt")


def _loaded_after(code: str) -> list[str]:
    """Run ``code`` in a new interpreter; return the heavy modules it left in sys.modules."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_rankopt_is_light():
    assert _loaded_after("import rankopt, rankopt.diagnostics, rankopt.metrics") == []


def test_numpy_workflow_stays_light():
    """Using the NumPy backend end to end (point, projection, retraction, checks) loads none."""
    code = (
        "import numpy as np, rankopt as ro\n"
        "from rankopt import diagnostics, metrics\n"
        "M = ro.FixedRankManifold(5, 4, 2, metric=metrics.Preconditioned(core_weight=0.5))\n"
        "x = M.random_point(0)\n"
        "A = np.ones((5, 4))\n"
        "r = diagnostics.check_gradient(M, lambda x: 0.5 * float(((x.to_dense() - A) ** 2).sum()),\n"
        "                               lambda x: x.to_dense() - A)\n"
        "assert r.ok\n"
    )
    assert _loaded_after(code) == []


def test_torch_backend_loads_torch_on_first_use():
    pytest.importorskip("torch", reason="PyTorch not installed")
    code = (
        "import rankopt as ro, sys\n"
        "assert 'torch' not in sys.modules\n"
        "ro.FixedRankManifold(5, 4, 2, backend='torch').random_point(0)\n"
    )
    assert "torch" in _loaded_after(code)


API_NAMES = (
    "FixedRankManifold", "FixedRankPoint", "LowRankMatrix", "TangentVector", "metrics",
    "problems", "solve", "solvers", "diagnostics", "pymanopt", "torch", "rules", "SolverResult",
    "RankWarning", "ConvergenceWarning", "__version__",
)  # fmt: skip


def test_dir_lists_the_public_names_and_loads_nothing_heavy():
    """``dir(rankopt)`` shows the API (API.md's names, loaded or not) and none of the module's
    helpers; listing it, reading ``__all__`` and ``from rankopt import *`` load no optional
    library (torch and pymanopt are in ``dir`` but not in ``__all__``)."""
    code = (
        "import json, rankopt\n"
        "ns = {}\n"
        "exec('from rankopt import *', ns)\n"
        "print(json.dumps({'dir': dir(rankopt), 'all': rankopt.__all__,\n"
        "                  'star': sorted(k for k in ns if not k.startswith('__'))}))\n"
    )
    probe = (
        code + "import sys\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
    )
    probe += f"{HEAVY!r})))"
    out = (
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
        )
        .stdout.strip()
        .splitlines()
    )
    names, heavy = json.loads(out[-2]), json.loads(out[-1])
    assert heavy == []
    for name in API_NAMES:
        assert name in names["dir"], name
    for helper in ("Any", "annotations", "importlib", "containers", "geometry", "manifold"):
        assert helper not in names["dir"], helper
    assert set(names["star"]) == set(names["all"])
    assert "torch" not in names["all"] and "pymanopt" not in names["all"]


def test_every_listed_name_resolves():
    import rankopt

    for name in rankopt.__all__:
        assert getattr(rankopt, name) is not None, name
    assert rankopt.solve is rankopt.solvers.solve
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rankopt.nope  # noqa: B018
