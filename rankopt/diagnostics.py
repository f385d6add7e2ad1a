r"""Finite-difference checks of gradients, Hessians and retractions (Manopt ``checkgradient`` style).

Each check evaluates an error ``E(t)`` on log-spaced steps ``t``, fits the slope of
``log E`` against ``log t`` in the best linear window, and returns a result you can assert on
(``slope``, ``ok``, the raw data) and optionally ``.plot()``. Nothing is only printed.

* gradient: ``E(t) = |f(R_x(t d)) - f(x) - t g_x(grad f, d)|`` is O(t^2) iff
  ``g_x(grad f, d) = Df(x)[d]``; this holds for any metric, so it checks the Riemannian gradient
  under the manifold's metric, not just the Euclidean case.
* Hessian: ``E(t) = |f(R_x(t d)) - f(x) - t g(grad, d) - t^2/2 g(Hess d, d)|`` is O(t^3) when the
  retraction is second order (the metric projection one is).
* retraction: ``||R_x(t xi) - (X + t xi)||_F`` is O(t^2); its tangential part is O(t^3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .containers import FixedRankPoint, TangentVector

__all__ = ["CheckResult", "check_gradient", "check_hessian", "check_retraction", "fit_slope"]


@dataclass
class CheckResult:
    """Outcome of a finite-difference check.

    Attributes
    ----------
    name : str
    expected_slope : float
    slope : float
        Fitted slope of log error against log step in the selected window; nan when no window
        of at least 6 steps above the round-off floor fits a line (then ``ok`` is False and
        ``extra["reason"]`` says why).
    ok : bool
        ``slope >= expected_slope - slope_tol`` for a finite fitted slope. Never True without a
        fit: a check whose errors all lie at round-off level (steps too small for the cost's
        precision, e.g. at a point with tiny singular values) or never follow a line is
        inconclusive, not passed.
    steps, errors : numpy arrays
    window : (int, int)
        Index range ``[i, j)`` used for the fit.
    extra : dict
        Check-specific numbers (e.g. tangency error of the gradient, symmetry of the Hessian).
    """

    name: str
    expected_slope: float
    slope: float
    ok: bool
    steps: np.ndarray
    errors: np.ndarray
    window: tuple[int, int]
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"CheckResult({self.name}: slope={self.slope:.3f} (expected {self.expected_slope}), "
            f"ok={self.ok}, extra={self.extra})"
        )

    def plot(self, ax: Any = None, path: str | None = None) -> Any:
        """Log-log plot of the error with the fitted window and a reference slope."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 4))
        else:
            fig = ax.figure
        ax.loglog(self.steps, np.maximum(self.errors, 1e-300), ".-", label="error")
        i, j = self.window
        if j > i and math.isfinite(self.slope):
            t = self.steps[i:j]
            ref = self.errors[i] * (t / t[0]) ** self.slope
            ax.loglog(t, ref, "--", label=f"fit: slope {self.slope:.2f}")
        ax.set_xlabel("step t")
        ax.set_ylabel("error")
        ax.set_title(f"{self.name} (expected slope {self.expected_slope})")
        ax.legend()
        if path is not None:
            fig.savefig(path, dpi=100, bbox_inches="tight")
        return ax


_MIN_WINDOW = 6  # shortest window of steps a slope is fitted on


def fit_slope(
    steps: np.ndarray, errors: np.ndarray, floor: float, min_len: int = _MIN_WINDOW
) -> tuple[float, tuple[int, int]]:
    """Slope of log(error) vs log(step) on the most linear window above the noise floor.

    Windows of every length >= ``min_len`` whose errors all exceed ``floor`` are fitted by least
    squares; the longest one whose residual stays below 0.1 (in log10 units) wins, ties by
    smallest residual. Returns ``(nan, (0, 0))`` if no window qualifies.
    """
    lt, le = np.log10(steps), np.log10(np.maximum(errors, 1e-300))
    good = errors > floor
    best, best_key = (math.nan, (0, 0)), None
    n = len(steps)
    for i in range(n):
        for j in range(i + min_len, n + 1):
            if not good[i:j].all():
                break
            A = np.vstack([lt[i:j], np.ones(j - i)]).T
            coef, *_ = np.linalg.lstsq(A, le[i:j], rcond=None)
            res = float(np.max(np.abs(A @ coef - le[i:j])))
            if res > 0.1:
                continue
            key = (j - i, -res)
            if best_key is None or key > best_key:
                best_key, best = key, (float(coef[0]), (i, j))
    return best


def _result(name, expected, steps, errors, floor, slope_tol, extra) -> CheckResult:
    slope, window = fit_slope(steps, errors, floor)
    if math.isfinite(slope):
        ok = slope >= expected - slope_tol
    else:  # no fit is no evidence: inconclusive checks fail, with the reason
        ok = False
        above = int(np.sum(errors > floor))
        extra = dict(extra)
        extra["reason"] = (
            f"no linear window: {above} of {len(errors)} errors lie above the round-off floor "
            f"{floor:.1e}"
            + (
                " (the steps are too small to show the Taylor error at this point: try larger "
                "steps=, a better-conditioned point, or float64)"
                if above < 6
                else " (the error never follows a line over 6 steps: check the cost for noise)"
            )
        )
    return CheckResult(name, expected, slope, bool(ok), steps, errors, window, extra)


def _check_steps(steps: Any) -> np.ndarray:
    """User steps: at least 6 (the shortest fitted window), positive, finite, distinct."""
    ts = np.asarray(steps, dtype=np.float64).ravel()
    if ts.size < _MIN_WINDOW or not np.all(np.isfinite(ts)) or not np.all(ts > 0):
        raise ValueError(
            f"steps must hold at least {_MIN_WINDOW} positive finite step sizes (the fit needs "
            f"a window of {_MIN_WINDOW}), got {ts.size} values: {ts[:8]}"
        )
    if np.unique(ts).size != ts.size:
        raise ValueError("steps must be distinct")
    return np.sort(ts)


def _default_steps(be, scale: float = 1.0) -> np.ndarray:
    lo = -8 if not be.is_float32 else -4
    return scale * np.logspace(lo, 0, 51 if not be.is_float32 else 31)


def _as_float(be, v) -> float:
    return be.to_float(v) if not isinstance(v, float) else v


def _cost_value(be, v: Any) -> float:
    """The value of ``cost(point)`` as a float; raises unless it is a real scalar.

    A Python or NumPy number, or a 0-d array of any backend. An array with dimensions (even
    of size 1) raises ``ValueError`` naming its shape; a non-number or a complex value
    ``TypeError``.
    """
    if isinstance(v, float):
        return v
    shape = getattr(v, "shape", None)
    if shape is not None and len(shape) > 0:
        raise ValueError(
            f"cost must return a scalar (a float or a 0-d array), but it returned an array of "
            f"shape {tuple(shape)}: reduce it to the cost's value, e.g. 0.5 * np.sum(R**2)"
        )
    if isinstance(v, (bool, np.bool_, str, bytes)) or "complex" in str(
        getattr(v, "dtype", type(v))
    ):
        raise TypeError(f"cost must return a real scalar, got {v!r} ({type(v).__name__})")
    try:
        return _as_float(be, v)
    except (TypeError, ValueError):
        raise TypeError(
            f"cost must return a real scalar (a float or a 0-d array), got {type(v).__name__}"
        ) from None


def _cost_at_base(be, cost: Callable, x: FixedRankPoint) -> float:
    """``cost(x)`` at the base point: a finite real scalar, else an error naming it."""
    f0 = _cost_value(be, cost(x))
    if not math.isfinite(f0):
        raise ValueError(f"cost(x) is {f0} at the base point x: the check needs a finite cost")
    return f0


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(
            f"seed must be an integer or None (it seeds the point and the directions: seed, "
            f"seed + 1, ...), got {type(seed).__name__}"
        )


def _setup(manifold, x, direction, seed):
    _check_seed(seed)
    if x is None:
        x = manifold.random_point(seed)
    manifold.check_point(x)
    if direction is None:
        direction = manifold.random_tangent_vector(x, None if seed is None else seed + 1)
    manifold.check_tangent(x, direction)
    return x, direction


def _step_scale(manifold, x, d) -> float:
    """Steps are scaled so that ``t = 1`` moves by the smallest singular value."""
    s_min = float(manifold.backend.to_float(manifold.backend.xp.min(x.s)))
    return s_min / max(manifold.norm(x, d), 1e-300) if s_min > 0 else 1.0


def check_gradient(
    manifold,
    cost: Callable[[FixedRankPoint], Any],
    egrad: Callable[[FixedRankPoint], Any] | None = None,
    x: FixedRankPoint | None = None,
    direction: TangentVector | None = None,
    *,
    rgrad: Callable[[FixedRankPoint], TangentVector] | None = None,
    steps: np.ndarray | None = None,
    seed: int | None = 0,
    slope_tol: float = 0.2,
) -> CheckResult:
    """Check a gradient against the cost by finite differences along a retraction curve.

    Parameters
    ----------
    manifold : FixedRankManifold
        Its metric defines the Riemannian gradient being checked.
    cost : callable(point) -> float
        A real scalar (a number or a 0-d array); an array with dimensions raises
        ``ValueError`` naming its shape, a non-finite ``cost(x)`` at the base point too.
    egrad : callable(point) -> ambient matrix (dense, sparse or LowRankMatrix)
        Euclidean gradient; converted with ``manifold.euclidean_to_riemannian_gradient``.
    x, direction : optional point and tangent direction (random from ``seed`` otherwise)
    seed : int or None
        Seeds ``x`` and ``direction`` when they are not given (``seed``, ``seed + 1``).
    rgrad : callable(point) -> TangentVector, optional
        Riemannian gradient given directly (instead of ``egrad``).

    Returns
    -------
    CheckResult
        ``slope`` ~ 2 for a correct gradient; ``extra["tangency"]`` is
        ``max(|U^T Up|, |V^T Vp|)`` of the gradient.

    Notes
    -----
    In float32 the round-off floor (~1e-7 |f|) leaves a short window for the fit: a correct
    gradient still gives slope 2, but a gradient that is only ~10% wrong is missed in about a
    quarter of our test cases (``tests/test_diagnostics.py``, marked xfail). Check gradients in
    float64 (cast the manifold with ``dtype="float64"``) whenever you can.
    """
    if (egrad is None) == (rgrad is None):
        raise ValueError("give exactly one of egrad or rgrad")
    be = manifold.backend
    x, d = _setup(manifold, x, direction, seed)
    g = manifold.euclidean_to_riemannian_gradient(x, egrad(x)) if rgrad is None else rgrad(x)
    manifold.check_tangent(x, g)
    f0 = _cost_at_base(be, cost, x)
    slope_d = manifold.inner_product(x, g, d)
    ts = _default_steps(be, _step_scale(manifold, x, d)) if steps is None else _check_steps(steps)
    errs = np.array(
        [
            abs(_cost_value(be, cost(manifold.retraction(x, d * float(t)))) - f0 - t * slope_d)
            for t in ts
        ]
    )
    xp = be.xp
    tang = max(be.to_float(xp.max(xp.abs(x.U.T @ g.Up))), be.to_float(xp.max(xp.abs(x.V.T @ g.Vp))))
    floor = 100 * be.eps * (abs(f0) + 1e-30) + 1e-300
    return _result("gradient", 2.0, ts, errs, floor, slope_tol, {"tangency": tang, "df": slope_d})


def check_hessian(
    manifold,
    cost: Callable[[FixedRankPoint], Any],
    egrad: Callable[[FixedRankPoint], Any],
    ehess: Callable[[FixedRankPoint, Any], Any],
    x: FixedRankPoint | None = None,
    direction: TangentVector | None = None,
    *,
    steps: np.ndarray | None = None,
    seed: int | None = 0,
    slope_tol: float = 0.25,
) -> CheckResult:
    """Check a Hessian: second-order Taylor model along the retraction, expected slope 3.

    ``ehess(x, D)`` is the Euclidean Hessian applied to an ambient direction ``D`` (given as
    the ``LowRankMatrix`` that ``manifold.embed`` returns); ``cost`` returns a real scalar,
    as in :func:`check_gradient`. ``extra["symmetry"]`` is
    ``|g(H d1, d2) - g(d1, H d2)|`` relative to ``|g(H d1, d2)|`` for two random directions.
    """
    be = manifold.backend
    x, d = _setup(manifold, x, direction, seed)
    Z = egrad(x)
    g = manifold.euclidean_to_riemannian_gradient(x, Z)

    def hess(v):
        return manifold.euclidean_to_riemannian_hessian(x, Z, ehess(x, manifold.embed(x, v)), v)

    f0 = _cost_at_base(be, cost, x)
    gd = manifold.inner_product(x, g, d)
    hdd = manifold.inner_product(x, hess(d), d)
    ts = _default_steps(be, _step_scale(manifold, x, d)) if steps is None else _check_steps(steps)
    errs = np.array(
        [
            abs(
                _cost_value(be, cost(manifold.retraction(x, d * float(t))))
                - f0
                - t * gd
                - 0.5 * t * t * hdd
            )
            for t in ts
        ]
    )
    d1 = manifold.random_tangent_vector(x, None if seed is None else seed + 11)
    d2 = manifold.random_tangent_vector(x, None if seed is None else seed + 12)
    a, b = manifold.inner_product(x, hess(d1), d2), manifold.inner_product(x, d1, hess(d2))
    sym = abs(a - b) / max(abs(a), abs(b), 1e-300)
    floor = 100 * be.eps * (abs(f0) + 1e-30) + 1e-300
    return _result("hessian", 3.0, ts, errs, floor, slope_tol, {"symmetry": sym, "hdd": hdd})


def check_retraction(
    manifold,
    x: FixedRankPoint | None = None,
    xi: TangentVector | None = None,
    *,
    steps: np.ndarray | None = None,
    seed: int | None = 0,
    slope_tol: float = 0.2,
) -> CheckResult:
    """Check that the retraction is second order.

    ``||R_x(t xi) - X - t xi||_F`` must be O(t^2) (slope 2, in the result) and its tangential
    part ``||P_x(R_x(t xi) - X - t xi)||`` O(t^3) (``extra["tangential"]``, a CheckResult).
    ``t`` is scaled by the smallest singular value of x. Also reports the orthonormality of
    the retracted factors (``extra["orthonormality"]``, max over steps of ``|U^T U - I|``).

    At full rank (``r = min(m, n)``) the manifold is open in ``R^{m x n}`` and the retraction
    is exactly ``X + t xi``: there is no slope to fit, and the check instead requires every
    error to lie at round-off level (``ok``; ``extra["reason"]`` says so).
    """
    be, xp = manifold.backend, manifold.backend.xp
    x, xi = _setup(manifold, x, xi, seed)
    ts = _default_steps(be, _step_scale(manifold, x, xi)) if steps is None else _check_steps(steps)
    X = x.to_lowrank()
    E = manifold.embed(x, xi)
    errs, tans, orth = [], [], 0.0
    eye = be.eye(manifold.r)
    for t in ts:
        y = manifold.retraction(x, xi * float(t))
        diff = y.to_lowrank() - X - E * float(t)
        errs.append(diff.fro_norm())
        p = manifold.geometry.project(x, diff)
        tans.append(math.sqrt(be.to_float(manifold.euclidean_inner(p, p))))
        orth = max(
            orth,
            be.to_float(xp.max(xp.abs(y.U.T @ y.U - eye))),
            be.to_float(xp.max(xp.abs(y.V.T @ y.V - eye))),
        )
    errs, tans = np.array(errs), np.array(tans)
    nrm = X.fro_norm()
    floor = 100 * be.eps * nrm
    if manifold.r == min(manifold.m, manifold.n):
        exact = bool(np.all(errs <= floor))
        reason = f"full rank: R_x(t xi) = X + t xi exactly; max error {errs.max():.1e} vs floor {floor:.1e}"
        extra = {"orthonormality": orth, "reason": reason}
        return CheckResult("retraction", 2.0, math.nan, exact, ts, errs, (0, 0), extra)
    tan_res = _result("retraction (tangential part)", 3.0, ts, tans, floor, slope_tol, {})
    res = _result(
        "retraction",
        2.0,
        ts,
        errs,
        floor,
        slope_tol,
        {"tangential": tan_res, "orthonormality": orth},
    )
    res.ok = bool(res.ok and tan_res.ok)
    return res
