r"""Problems, methods and runners of ``python -m benchmarks.optimizers`` (see its docstring).

Problems (i)-(iv): low-rank linear regression, float64, full batch. ``W*`` (m x n) of rank k
with singular values geometric from 1 to ``1/kappa`` and Haar factors; inputs ``x ~ N(0, I)``
(400 samples), for (ii) with feature j scaled by ``10^(-2 j / (n - 1))``; targets ``W* x``. The
loss is relative, ``f(W) = 1/2 ||(W - W*) L||_F^2 / f(0)`` with ``Sigma = X^T X / N = L L^T``
(the same loss as over the 400 samples), gradient ``(W - W*) Sigma / f(0)``.

Methods: LoRA-style factors ``W = B A`` (rank r) trained in torch (AdamW, heavy ball, ScaledGD,
PEFT's Riemannian-preconditioned AdamW and LoRA+), and the rules of :mod:`rankopt.rules`
(rankopt's own, the DLRA ones, the authors' reference ones) stepped directly on the NumPy
backend (the same rule code the torch optimizers run; ``tests/test_torch_dlra.py`` checks the
torch path). Starts: "zero" (``W = 0``: LoRA with ``B = 0`` and PEFT's uniform ``A``; rankopt's
adapter start, i.e. its rule applied once at ``U0 0 V0^T`` with ``U0``, ``V0`` the top singular
subspaces of the first gradient, which is what ``rankopt.torch`` does for an adapter; the
authors' reference rules take their code's dense first step ``H_r(W')``) or "imbalanced"
(``W0 = B0 A0`` with ``B0 = 10 B1``, ``A0 = 0.1 A1``: the factors see it, the manifold methods
only see ``W0``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import rankopt as ro
from benchmarks.harness import optimizer_state_bytes, state_bytes, time_interleaved
from rankopt import rules
from rankopt.containers import FixedRankPoint, TangentVector

# ---------------------------------------------------------------------------
# problems (i)-(iv)
# ---------------------------------------------------------------------------

SAMPLES = 400
#: relative loss that counts as "reached" (steps-to-target column)
TARGET = 1e-12
#: below this a run has converged to rounding level: it stops and keeps this loss
FLOOR = 1e-30
#: a loss above this (relative) or non-finite counts as diverged
DIVERGED = 1e6


@dataclass(frozen=True)
class ProblemSpec:
    key: str
    title: str
    m: int = 60
    n: int = 50
    target_rank: int = 4
    kappa: float = 100.0
    fit_rank: int = 4
    ill: bool = False
    start: str = "zero"
    start_scale: float = 0.1


#: one line style per method, shared by the benchmark's figure and paper_figures/fig_seeds.py
#: (each plots a subset): method name -> (color, line style)
METHOD_STYLES = {
    "LoRA + AdamW": ("tab:gray", "-"),
    "LoRA + heavy ball": ("tab:gray", ":"),
    "ScaledGD": ("tab:brown", "-"),
    "PEFT Riemannian AdamW": ("tab:pink", "-"),
    "PEFT LoRA+ AdamW": ("tab:olive", "-"),
    "authors' RAdamW (reference)": ("black", "--"),
    "authors' RAdaGrad (reference)": ("black", ":"),
    "RAdamW": ("tab:green", "-"),
    "RAdaGrad": ("tab:cyan", "-"),
    "RAdamW quartic+PCG": ("tab:green", ":"),
    "DLRAAdam": ("tab:red", "-"),
    "DLRAHeavyBall": ("tab:orange", "-"),
    "Riemannion": ("tab:purple", "-"),
    "Riemannion + LOI": ("tab:purple", "--"),
    "Riemannion + cosine": ("tab:purple", "-."),
    "Riemannion Newton-Schulz": ("tab:purple", ":"),
}

PROBLEMS = {
    "i": ProblemSpec("i", "(i) rank 4, kappa 100, Gaussian inputs, from W = 0"),
    "ii": ProblemSpec("ii", "(ii) as (i), features scaled 1 .. 1e-2 (ill-conditioned)", ill=True),
    "iii": ProblemSpec(
        "iii",
        "(iii) rank 8 fit to a rank-2 target (kappa 10), from W = 0",
        target_rank=2,
        kappa=10.0,
        fit_rank=8,
    ),  # fmt: skip
    "iv": ProblemSpec(
        "iv", "(iv) as (i), imbalanced start B0 = 10 B1, A0 = 0.1 A1", start="imbalanced"
    ),
}


#: the singular values of the locally optimal start (Riemannion + LOI), small next to the
#: targets' (1 .. 1e-2 for (i)-(ii), 1 .. 0.1 for (iii))
LOI_SCALE = 1e-3

#: the DLRA scenario (tests/test_dlra.py, paper_figures/fig_dlra.py): problem (i)'s target from a
#: random rank-10 point (Haar factors, singular values of rankopt's random point times 0.1)
DLRA_START = ProblemSpec(
    "i-r10", "(i)'s rank-4 target from a random rank-10 start", fit_rank=10, start="random"
)


@dataclass
class Regression:
    spec: ProblemSpec
    Wstar: np.ndarray
    L: np.ndarray
    Sigma: np.ndarray
    f0: float
    B0: np.ndarray | None = None
    A0: np.ndarray | None = None
    seed: int = 0

    def cost(self, W: np.ndarray) -> float:
        E = (W - self.Wstar) @ self.L
        return 0.5 * float(np.vdot(E, E)) / self.f0

    def grad(self, W: np.ndarray) -> np.ndarray:
        return (W - self.Wstar) @ self.Sigma / self.f0


def regression(spec: ProblemSpec, seed: int) -> Regression:
    """The problem ``spec`` with seed ``seed`` (target, data and, for (iv), the start)."""
    rng = np.random.default_rng(1000 * seed + 17)
    m, n, k = spec.m, spec.n, spec.target_rank
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    Wstar = (U * np.geomspace(1.0, 1.0 / spec.kappa, k)) @ V.T
    X = rng.standard_normal((SAMPLES, n))
    if spec.ill:
        X = X * np.logspace(0, -2, n)
    Sigma = X.T @ X / SAMPLES
    L = np.linalg.cholesky(Sigma)
    E = Wstar @ L
    out = Regression(spec, Wstar, L, Sigma, 0.5 * float(np.vdot(E, E)), seed=seed)
    if spec.start == "imbalanced":
        r = spec.fit_rank
        B1 = rng.standard_normal((m, r)) * 0.3 / math.sqrt(m)
        A1 = rng.standard_normal((r, n)) * 0.3 / math.sqrt(n)
        out.B0, out.A0 = 10.0 * B1, 0.1 * A1
    return out


# ---------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One optimizer of the benchmark.

    ``kind``: "rule" (a :mod:`rankopt.rules` spec, ``make(lr)``) or "lora" (LoRA factors in
    torch, ``make(model, lr)`` returns a torch optimizer). ``lr_lo``: the smallest learning rate
    of its grid (every grid has the same size and the same ratio between its ends).
    ``torch``: ``(params, lr) -> optimizer`` of rankopt.torch for the timing pass and (v).
    """

    name: str
    family: str
    kind: str
    lr_lo: float
    make: Callable[..., Any]
    torch: Callable[..., Any] | None = None
    note: str = ""
    #: "loi": from W = 0, start at rankopt.locally_optimal_start of the first gradient
    start: str = "zero"
    #: "cosine": lr_k = lr (1 + cos(pi k / steps)) / 2 on (i)-(iv) (the torch runs: constant)
    schedule: str = "constant"


def _rt():
    import rankopt.torch as rt

    return rt


def _lora_methods() -> list[Method]:
    import torch

    def peft_riemannian(model, lr):
        from peft.optimizers import create_riemannian_optimizer

        return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)

    def peft_loraplus(model, lr):
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0, weight_decay=0.0
        )

    def trainable(model):
        return [p for p in model.parameters() if p.requires_grad]

    return [
        Method("LoRA + AdamW", "factors", "lora", 1e-3,
               lambda model, lr: torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0),
               note="torch.optim.AdamW on B, A (weight_decay 0)"),
        Method("LoRA + heavy ball", "factors", "lora", 3e-3,
               lambda model, lr: torch.optim.SGD(trainable(model), lr=lr, momentum=0.9),
               note="torch.optim.SGD(momentum=0.9) on B, A"),
        Method("ScaledGD", "factors", "lora", 3e-3, lambda model, lr: ScaledGD(model, lr),
               note="B -= lr dB (A A^T + d I)^-1, A -= lr (B^T B + d I)^-1 dA, d = 1e-10 (Tong, Ma, Chi 2021)"),
        Method("PEFT Riemannian AdamW", "PEFT", "lora", 3e-3, peft_riemannian,
               note="peft.optimizers.create_riemannian_optimizer(AdamW), reg 1e-2 (PEFT's default)"),
        Method("PEFT LoRA+ AdamW", "PEFT", "lora", 1e-4, peft_loraplus,
               note="peft.optimizers.create_loraplus_optimizer(AdamW, loraplus_lr_ratio=16)"),
    ]  # fmt: skip


def _rule_methods() -> list[Method]:
    R = rules
    rt = _rt

    def torch_of(cls_name: str, **kw):
        return lambda params, lr: getattr(rt(), cls_name)(params, lr=lr, **kw)

    return [
        Method("authors' RAdamW (reference)", "authors' code", "rule", 3e-4,
               lambda lr: R.ReferenceRAdamW(lr=lr, weight_decay=0.0),
               torch_of("ReferenceRAdamW", weight_decay=0.0),
               "rules.ReferenceRAdamW(weight_decay=0): dense m x n AdamW moments, eps 1e-6, no bias correction"),
        Method("authors' RAdaGrad (reference)", "authors' code", "rule", 1e-2,
               lambda lr: R.ReferenceRAdaGrad(lr=lr),
               torch_of("ReferenceRAdaGrad"),
               "rules.ReferenceRAdaGrad: D = (1 + diag(G G^T))^1/4 per side, SGD step, projection"),
        Method("authors' RAdaGrad (faithful)", "authors' code", "rule", 1e-2,
               lambda lr: R.ReferenceRAdaGrad(lr=lr, faithful=True),
               torch_of("ReferenceRAdaGrad", faithful=True),
               "rules.ReferenceRAdaGrad(faithful=True): the code's weighted (non-projection) formula"),
        Method("RSGD", "rankopt", "rule", 1e-2, lambda lr: R.RSGD(lr=lr), torch_of("RSGD"),
               "rules.RSGD: Riemannian gradient step"),
        Method("RHeavyBall", "rankopt", "rule", 3e-3, lambda lr: R.RHeavyBall(lr=lr),
               torch_of("RSGD", momentum=0.9), "rules.RHeavyBall (momentum 0.9, transported)"),
        Method("RAdaGrad", "rankopt", "rule", 3e-3, lambda lr: R.RAdaGrad(lr=lr),
               torch_of("RAdaGrad"), "rules.RAdaGrad defaults (Adafactor-factored, exact solve)"),
        Method("RAdaGrad quartic", "rankopt", "rule", 1e-3,
               lambda lr: R.RAdaGrad(lr=lr, factoring="quartic", metric_eps=1e-8),
               torch_of("RAdaGrad", factoring="quartic", metric_eps=1e-8),
               "factoring='quartic' (the 1/4 power per side), eps 1e-8"),
        Method("RAdamW", "rankopt", "rule", 1e-3, lambda lr: R.RAdamW(lr=lr), torch_of("RAdamW"),
               "rules.RAdamW defaults: Adafactor-factored metric, full, exact direct solve"),
        Method("RAdamW quartic+PCG", "rankopt", "rule", 1e-3,
               lambda lr: R.RAdamW(lr=lr, factoring="quartic", metric_eps=1e-8, solver="pcg"),
               torch_of("RAdamW", factoring="quartic", metric_eps=1e-8, solver="pcg"),
               "factoring='quartic', metric_eps 1e-8, PCG to 1e-4"),
        Method("RAdamW block", "rankopt", "rule", 1e-3, lambda lr: R.RAdamW(lr=lr, structure="block"),
               torch_of("RAdamW", structure="block"), "structure='block' (block-diagonal metric)"),
        Method("RAdamW precondition-only", "rankopt", "rule", 1e-3,
               lambda lr: R.RAdamW(lr=lr, exact=False), torch_of("RAdamW", exact=False),
               "exact=False: P_X(D_L^-1 m D_R^-1), not a Riemannian gradient"),
        Method("RAdamWElementwise", "rankopt", "rule", 1e-3, lambda lr: R.RAdamWElementwise(lr=lr),
               torch_of("RAdamWElementwise"), "elementwise Adam metric (m x n second moment), PCG"),
        Method("DLRAHeavyBall", "DLRA", "rule", 3e-3, lambda lr: R.DLRAHeavyBall(lr=lr),
               torch_of("DLRAHeavyBall"), "augmented BUG, heavy ball on the core, rank_tol 1e-3"),
        Method("DLRAAdam", "DLRA", "rule", 1e-3, lambda lr: R.DLRAAdam(lr=lr), torch_of("DLRAAdam"),
               "augmented BUG, Adam with the factored metric on the core, rank_tol 1e-3"),
        Method("DLRAAdam core (group's)", "DLRA", "rule", 1e-4,
               lambda lr: R.DLRAAdam(lr=lr, second_moment="core", metric_eps=1e-8),
               torch_of("DLRAAdam", second_moment="core", metric_eps=1e-8),
               "second_moment='core': elementwise Adam on the core, eps 1e-8 (the group's layers)"),
        Method("RAdamW rank_tol=1e-3 (retraction)", "DLRA", "rule", 1e-3,
               lambda lr: R.RAdamW(lr=lr, rank_tol=1e-3), torch_of("RAdamW", rank_tol=1e-3),
               "tangent step + rank-adaptive retraction, rank up to 2r per step"),
        Method("Riemannion", "Riemannion", "rule", 1e-3, lambda lr: R.Riemannion(lr=lr),
               torch_of("Riemannion"),
               "rules.Riemannion: heavy ball 0.9, exact matrix sign (2r x 2r SVD), SVD retraction"),
        Method("Riemannion + LOI", "Riemannion", "rule", 1e-3, lambda lr: R.Riemannion(lr=lr),
               torch_of("Riemannion"),
               f"from W = 0: locally_optimal_start(G_0, scale={LOI_SCALE:g}); (iv), (v): as Riemannion",
               start="loi"),
        Method("Riemannion + cosine", "Riemannion", "rule", 1e-3, lambda lr: R.Riemannion(lr=lr),
               torch_of("Riemannion"),
               "(i)-(iv): cosine decay of lr to 0 over the run; (v): constant lr, as Riemannion",
               schedule="cosine"),
        Method("Riemannion Newton-Schulz", "Riemannion", "rule", 1e-3,
               lambda lr: R.Riemannion(lr=lr, ns_steps=5), torch_of("Riemannion", ns_steps=5),
               "ns_steps=5: Muon's quintic Newton-Schulz instead of the exact sign (rankopt's)"),
        Method("RHeavyBall rank_tol=1e-3 (retraction)", "DLRA", "rule", 3e-3,
               lambda lr: R.RHeavyBall(lr=lr, rank_tol=1e-3), torch_of("RSGD", momentum=0.9, rank_tol=1e-3),
               "tangent heavy ball + rank-adaptive retraction"),
    ]  # fmt: skip


def all_methods() -> list[Method]:
    return _lora_methods() + _rule_methods()


def lr_grid(method: Method, size: int, ratio: float) -> list[float]:
    """``size`` learning rates from ``lr_lo`` to ``ratio lr_lo``, geometric."""
    return [float(v) for v in method.lr_lo * np.geomspace(1.0, ratio, size)]


# ---------------------------------------------------------------------------
# runners for (i)-(iv)
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """Losses ``[f(W_0), ..., f(W_T)]`` (relative), ranks, wall time of the steps, and the
    optimizer's state in bytes (:func:`benchmarks.harness.state_bytes`)."""

    losses: np.ndarray
    ranks: np.ndarray
    seconds: float
    state_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def final(self) -> float:
        return float(self.losses[-1])

    def steps_to(self, target: float = TARGET) -> int | None:
        hit = np.flatnonzero(self.losses <= target)
        return int(hit[0]) if hit.size else None


def _finish(losses: list, ranks: list, steps: int, t0: float, state: int) -> Run:
    """Pad a stopped run: with inf after a divergence, with its last loss after convergence."""
    L = np.full(steps + 1, np.inf)
    L[: len(losses)] = losses
    if losses and np.isfinite(losses[-1]) and losses[-1] <= FLOOR:
        L[len(losses) :] = losses[-1]
    R = np.full(steps + 1, ranks[-1] if ranks else 0)
    R[: len(ranks)] = ranks
    return Run(L, R, time.perf_counter() - t0, state)


def _extra(spec, M, G) -> dict:
    kind = rules.gradient_input(spec)
    if kind == "normal":
        return {"normal": rules.normal_block_of(M, G)}
    if kind == "dense":
        return {"egrad": G}
    return {}


def run_rule(method: Method, prob: Regression, lr: float, steps: int) -> Run:
    """A rule of :mod:`rankopt.rules` on the NumPy backend, from the problem's start."""
    spec = method.make(lr)
    r = prob.spec.fit_rank
    manifolds: dict[int, Any] = {}

    def man(k):
        if k not in manifolds:
            manifolds[k] = ro.FixedRankManifold(prob.spec.m, prob.spec.n, k, validate=False)
        return manifolds[k]

    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        if prob.spec.start == "zero" and method.start == "loi":
            G = prob.grad(np.zeros((prob.spec.m, prob.spec.n)))
            x = ro.locally_optimal_start(man(r), G, LOI_SCALE)
            st = spec.init(man(r), x)
            W = x.to_dense()
            G = prob.grad(W)
            xi = man(r).geometry.project(x, G)
            losses, ranks = [prob.cost(W)], [r]
        elif prob.spec.start == "zero":
            G = prob.grad(np.zeros((prob.spec.m, prob.spec.n)))
            u, sg, vt = np.linalg.svd(G)
            x = FixedRankPoint(u[:, :r], np.zeros(r), vt[:r].T)
            st = spec.init(man(r), x)
            xi = TangentVector(
                np.diag(sg[:r]), np.zeros((prob.spec.m, r)), np.zeros((prob.spec.n, r))
            )
            losses, ranks = [1.0], [r]
        else:
            if prob.spec.start == "random":
                x = man(r).random_point(prob.seed + 100)
                x = FixedRankPoint(x.U, prob.spec.start_scale * x.s, x.V)
            else:
                x = man(r).from_matrix(prob.B0 @ prob.A0)
            st = spec.init(man(r), x)
            W = x.to_dense()
            G = prob.grad(W)
            xi = man(r).geometry.project(x, G)
            losses, ranks = [prob.cost(W)], [r]
        size = state_bytes(rules.state_arrays(st))
        for k in range(steps):
            M = man(x.rank)
            lr_k = (
                lr
                if method.schedule == "constant"
                else lr * (1 + math.cos(math.pi * k / steps)) / 2
            )
            x, st = spec.step(M, x, xi, st, lr=lr_k, **_extra(spec, M, G))
            W = x.to_dense()
            f = prob.cost(W)
            losses.append(f)
            ranks.append(x.rank)
            if not (math.isfinite(f) and f < DIVERGED) or f <= FLOOR:
                break
            G = prob.grad(W)
            xi = man(x.rank).geometry.project(x, G)
    if not (math.isfinite(losses[-1]) and losses[-1] < DIVERGED):
        losses[-1] = np.inf
    return _finish(losses, ranks, steps, t0, size)


class ScaledGD:
    """ScaledGD on LoRA factors (Tong, Ma, Chi, JMLR 2021): ``B -= lr dB (A A^T + d I)^-1``,
    ``A -= lr (B^T B + d I)^-1 dA`` (simultaneously), ``d = 1e-10``; plain SGD elsewhere."""

    DAMPING = 1e-10

    def __init__(self, model: Any, lr: float) -> None:
        import torch

        self.lr = lr
        self.pairs = []
        self.others = []
        for mod in model.modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                self.pairs.append((mod.lora_B["default"].weight, mod.lora_A["default"].weight))
        paired = {id(p) for pair in self.pairs for p in pair}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
        self.state: dict = {}
        self._torch = torch

    def zero_grad(self) -> None:
        for B, A in self.pairs:
            B.grad = A.grad = None
        for p in self.others:
            p.grad = None

    def step(self) -> None:
        torch = self._torch
        with torch.no_grad():
            for B, A in self.pairs:
                eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                dB = torch.linalg.solve(A @ A.T + self.DAMPING * eye, B.grad.T).T
                dA = torch.linalg.solve(B.T @ B + self.DAMPING * eye, A.grad)
                B.sub_(self.lr * dB)
                A.sub_(self.lr * dA)
            for p in self.others:
                if p.grad is not None:
                    p.sub_(self.lr * p.grad)


def lora_model(m: int, n: int, r: int, B: Any = None, A: Any = None, seed: int = 0):
    """A PEFT LoRA model of one ``nn.Linear(n, m)`` with a zero base weight: ``W = B A``.

    Default factors: PEFT's init, ``B = 0`` and ``A`` uniform in ``+-1/sqrt(n)``
    (``kaiming_uniform_(a=sqrt(5))``), drawn from a seeded generator.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(n, m, bias=False, dtype=torch.float64)
            torch.nn.init.zeros_(self.lin.weight)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(One(), LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    g = torch.Generator().manual_seed(seed)
    lin = model.base_model.model.lin
    with torch.no_grad():
        if A is None:
            bound = 1.0 / math.sqrt(n)
            A = (torch.rand(r, n, generator=g, dtype=torch.float64) * 2 - 1) * bound
            B = torch.zeros(m, r, dtype=torch.float64)
        lin.lora_A["default"].weight.copy_(torch.as_tensor(A))
        lin.lora_B["default"].weight.copy_(torch.as_tensor(B))
    return model


def run_lora(method: Method, prob: Regression, lr: float, steps: int, seed: int) -> Run:
    """LoRA factors of a PEFT model in torch (float64), ``W = B A``; the full-batch gradient in
    closed form, ``dB = G A^T``, ``dA = B^T G`` with ``G = (W - W*) Sigma / f(0)`` (what
    autograd through the model gives for this loss, without the per-step module overhead; the
    step itself is the optimizer's, PEFT's own for its optimizers)."""
    import torch

    s = prob.spec
    model = lora_model(s.m, s.n, s.fit_rank, prob.B0, prob.A0, seed)
    lin = model.base_model.model.lin
    B, A = lin.lora_B["default"].weight, lin.lora_A["default"].weight
    opt = method.make(model, lr)
    Ws, Sig = torch.as_tensor(prob.Wstar), torch.as_tensor(prob.Sigma)
    losses: list[float] = []
    t0 = time.perf_counter()
    for k in range(steps + 1):
        with torch.no_grad():
            E = B @ A - Ws
            ES = E @ Sig
            f = 0.5 * float((E * ES).sum()) / prob.f0
        losses.append(f)  # f(W_k)
        if k == steps or not (math.isfinite(f) and f < DIVERGED) or f <= FLOOR:
            break
        opt.zero_grad()
        G = ES / prob.f0
        B.grad, A.grad = G @ A.detach().T, B.detach().T @ G
        opt.step()
    if not (math.isfinite(losses[-1]) and losses[-1] < DIVERGED):
        losses[-1] = np.inf
    return _finish(losses, [s.fit_rank] * len(losses), steps, t0, optimizer_state_bytes(opt))


# ---------------------------------------------------------------------------
# problem (v): an MLP on scikit-learn's digits with a low-rank 256 x 256 hidden layer
# ---------------------------------------------------------------------------

HIDDEN = 256


@dataclass
class Digits:
    """1797 real 8 x 8 digits (``sklearn.datasets.load_digits``), pixels / 16, split 60/20/20 by
    a seeded permutation; float32 torch tensors."""

    train: tuple
    val: tuple
    test: tuple


def digits(seed: int) -> Digits:
    import torch
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    X = torch.as_tensor(X[perm] / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y[perm], dtype=torch.long)
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return Digits((X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:]))


def _dense_mlp(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    torch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    with torch.random.fork_rng():
        torch.manual_seed(torch_seed)
        return torch.nn.Sequential(
            torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN, bias=False), torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, 10),
        )  # fmt: skip


def _batches(n: int, batch: int, gen) -> list:
    import torch

    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch] for i in range(0, n, batch)]


def accuracy(model, data: tuple) -> float:
    import torch

    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def digits_start(data: Digits, start: str, rank: int, seed: int, pretrain_epochs: int = 20):
    """``(first, last, (U, s, V))``: the first and last layers and the hidden layer's rank-r
    start. "scratch": torch's default init elsewhere and a random rank-r point with the
    expected norm of torch's init (``rankopt.torch.LowRankLinear``'s own init); "compressed":
    a dense MLP trained ``pretrain_epochs`` epochs with AdamW (lr 1e-3, batch 64), its hidden
    layer truncated to rank r."""
    import torch

    import rankopt.torch as rt

    dense = _dense_mlp(seed)
    if start == "compressed":
        opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        X, y = data.train
        for _ in range(pretrain_epochs):
            for idx in _batches(len(y), 64, g):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(dense(X[idx]), y[idx]).backward()
                opt.step()
        U, s, Vh = torch.linalg.svd(dense[2].weight.detach())
        hidden = (U[:, :rank], s[:rank], Vh[:rank].T)
    else:
        layer = rt.LowRankLinear(HIDDEN, HIDDEN, rank, bias=False, seed=seed)
        hidden = layer.factors()
    return dense[0], dense[4], tuple(t.detach().clone() for t in hidden)


def digits_model(kind: str, start_parts: tuple, rank: int):
    """The MLP for a method: rankopt (``LowRankLinear`` hidden layer) or LoRA (a PEFT model of
    a zero hidden base with ``B = U sqrt(s)``, ``A = sqrt(s) V^T``; first and last layers
    trained as ``modules_to_save``)."""
    import copy

    import torch

    import rankopt.torch as rt

    first, last, (U, s, V) = start_parts
    first, last = copy.deepcopy(first), copy.deepcopy(last)
    if kind == "rule":
        hidden = rt.LowRankLinear(HIDDEN, HIDDEN, rank, bias=False, seed=0)
        with torch.no_grad():
            hidden.U.copy_(U)
            hidden.S.copy_(torch.diag(s))
            hidden.V.copy_(V)
        return torch.nn.Sequential(first, torch.nn.ReLU(), hidden, torch.nn.ReLU(), last)
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
    torch.nn.init.zeros_(base.weight)
    model = torch.nn.Sequential(first, torch.nn.ReLU(), base, torch.nn.ReLU(), last)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["2"], modules_to_save=["0", "4"])
    model = get_peft_model(model, cfg)
    lora = model.base_model.model[2]
    root = s.sqrt()
    with torch.no_grad():
        lora.lora_B["default"].weight.copy_(U * root)
        lora.lora_A["default"].weight.copy_((V * root).T)
    return model


def hidden_rank(model) -> int:
    """The hidden layer's rank (a LoRA layer's is fixed)."""
    if hasattr(model, "base_model"):
        return int(model.base_model.model[2].r["default"])
    return int(model[2].rank)


def train_digits(method: Method, data: Digits, start_parts: tuple, lr: float, epochs: int,
                 seed: int, rank: int = 8, batch: int = 64) -> dict:  # fmt: skip
    """Train the MLP with ``method`` (mini-batches of ``batch``, a seeded order); returns the
    validation/test accuracy, the training loss per epoch, the hidden layer's ranks and the
    median wall milliseconds per training step (forward + backward + optimizer step)."""
    import torch

    model = digits_model(method.kind, start_parts, rank)
    if method.kind == "rule":
        opt = method.torch(list(model.parameters()), lr)
    else:
        opt = method.make(model, lr)
    g = torch.Generator().manual_seed(seed + 1)
    X, y = data.train
    start_rank = hidden_rank(model)
    losses, ranks, times = [], [start_rank], []
    for _ in range(epochs):
        total = 0.0
        for idx in _batches(len(y), batch, g):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            total += float(loss.detach()) * len(idx)
            ranks.append(hidden_rank(model))
        losses.append(total / len(y))
        if not math.isfinite(losses[-1]):
            break
    ok = all(math.isfinite(v) for v in losses)
    return {
        "val_acc": accuracy(model, data.val) if ok else 0.0,
        "test_acc": accuracy(model, data.test) if ok else 0.0,
        "train_loss": losses,
        "start_rank": start_rank,
        "final_rank": ranks[-1],
        "max_rank": max(ranks),
        "ms_per_step": 1e3 * float(np.median(times)) if times else math.nan,
        "state_bytes": optimizer_state_bytes(opt),
    }


# ---------------------------------------------------------------------------
# timing (torch, one thread, interleaved)
# ---------------------------------------------------------------------------


def timing_setups(prob: Regression, data: Digits, start_parts: tuple) -> dict:
    """``name -> (make(method) -> (step, opt))`` for the two timed shapes: the (i) layer (60 x 50,
    rank 4, full batch through the module) and the (v) MLP (batch 64)."""
    import torch

    import rankopt.torch as rt

    s = prob.spec
    inp = torch.as_tensor(prob.L.T.copy())
    tgt = torch.as_tensor((prob.Wstar @ prob.L).T.copy())

    def regression_setup(method: Method, lr: float):
        if method.kind == "rule":
            model = rt.LowRankLinear(
                s.n,
                s.m,
                s.fit_rank,
                bias=False,
                base=torch.zeros(s.m, s.n, dtype=torch.float64),
                dtype=torch.float64,
                seed=0,
            )
            opt = method.torch(list(model.parameters()), lr)
        else:
            model = lora_model(s.m, s.n, s.fit_rank, seed=0)
            opt = method.make(model, lr)

        def step():
            opt.zero_grad()
            (0.5 * ((model(inp) - tgt) ** 2).sum() / prob.f0).backward()
            opt.step()

        return step, opt

    X, y = data.train

    def digits_setup(method: Method, lr: float):
        model = digits_model(method.kind, start_parts, 8)
        opt = (
            method.torch(list(model.parameters()), lr)
            if method.kind == "rule"
            else method.make(model, lr)
        )
        idx = torch.arange(64)

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()

        return step, opt

    return {"(i) layer": regression_setup, "(v) MLP": digits_setup}


def time_methods(methods: list[Method], setups: dict, rounds: int, steps: int, warmup: int,
                 lr_of: Callable[[Method], float], log: Callable[[str], None]) -> dict:  # fmt: skip
    """Median wall ms per training step of every method on every setup, interleaved
    (:func:`benchmarks.harness.time_interleaved`): each round times ``steps`` steps of every
    method in turn (after ``warmup`` steps). Also the optimizer state in bytes
    (:func:`benchmarks.harness.optimizer_state_bytes`)."""
    out: dict = {}
    for shape, setup in setups.items():
        made = {m.name: setup(m, lr_of(m)) for m in methods}
        timings = time_interleaved(
            {name: step for name, (step, _) in made.items()},
            rounds,
            calls=steps,
            warmup=warmup,
            on_round=lambda rnd, _, shape=shape: log(f"  timing {shape}: round {rnd + 1}/{rounds}"),
        )
        for m in methods:
            t = timings[m.name]
            out.setdefault(m.name, {})[shape] = {
                "ms_median": 1e3 * t.median,
                "ms_min": 1e3 * t.min,
                "ms_max": 1e3 * t.max,
                "state_bytes": optimizer_state_bytes(made[m.name][1]),
            }
    return out
