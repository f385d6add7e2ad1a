"""How far a 1e-13 change of the start moves every torch optimizer after three steps.

A continuous step moves the result by about as little as the input changed; a discontinuous
one (a step that depends on directions set by rounding) moves it by orders of magnitude more.
Two experiments, float64, one torch thread, each optimizer with the settings of the test suite:

* ``mixed``: a model of low-rank layers of mixed shapes and ranks, a 3 x 9 rank-2 convolution
  whose output is pooled over its channels (a rank-1 gradient), an adapter on a frozen base and
  ordinary parameters; 1e-13 is added to the core of one layer (``a.0``), the per-layer path
  (``stack_layers=False``) takes three steps from both starts. Reported: the largest change of
  any parameter (absolute, as the factors are stored) and the largest relative change of any
  weight ``U S V^T`` or ordinary parameter.
* ``summed``: a single ``LowRankLinear`` of shape m x n (out x in) and rank r whose outputs are
  summed (a rank-1 gradient): the relative change of ``U S V^T`` after three steps from a
  relative 1e-13 change of its singular values.

    python -m benchmarks.continuity            # about 20 s
    python -m benchmarks.continuity --quick    # smoke run: the mixed model only

Writes ``out/continuity.md`` (the tables) and ``out/continuity.png`` (the relative changes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import rankopt.torch as rt
from benchmarks.harness import machine_info, pin_threads, pyplot

D = torch.float64
DELTA = 1e-13
STEPS = 3

OPTIMIZERS = {
    "RAdamW": (rt.RAdamW, dict(lr=0.02, weight_decay=0.1)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=0.05, lr_decay=0.1)),
    "RSGD": (rt.RSGD, dict(lr=0.05, momentum=0.9)),
    "RHeavyBall": (rt.RHeavyBall, dict(lr=0.05, nesterov=True)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.02, rank_tol=1e-3)),
    "DLRAAdam (core)": (rt.DLRAAdam, dict(lr=0.02, rank_tol=1e-3, second_moment="core")),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.05, rank_tol=1e-3)),
    "ReferenceRAdamW": (rt.ReferenceRAdamW, dict(lr=0.01)),
    "ReferenceRAdaGrad": (rt.ReferenceRAdaGrad, dict(lr=0.05)),
    "RAdamWElementwise": (rt.RAdamWElementwise, dict(lr=0.01, cg_tol=1e-13, cg_maxiter=200)),
    "Riemannion": (rt.Riemannion, dict(lr=0.05, weight_decay=0.1)),
    "Riemannion (Newton-Schulz)": (rt.Riemannion, dict(lr=0.05, weight_decay=0.1, ns_steps=5)),
}
SHAPES = [(3, 8, 2), (4, 8, 3), (5, 7, 2), (6, 9, 2)]


class Mixed(nn.Module):
    """Low-rank layers of mixed shapes and ranks, a pooled convolution, an adapter, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.ModuleList(rt.LowRankLinear(10, 10, 2, dtype=D, seed=i) for i in range(3))
        self.b = nn.ModuleList(rt.LowRankLinear(10, 10, 3, dtype=D, seed=10 + i) for i in range(2))
        self.c = rt.LowRankLinear(10, 7, 2, dtype=D, seed=20)
        base = torch.randn(7, 10, dtype=D, generator=torch.Generator().manual_seed(21))
        self.d = rt.LowRankLinear(10, 7, 2, base=base, dtype=D, seed=21)
        self.conv = rt.LowRankConv2d(1, 3, 3, 2, padding=1, dtype=D, seed=22)
        self.head = nn.Linear(7, 7, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for m in [*self.a, *self.b]:
            h = torch.tanh(m(h))
        z = self.conv(x[:, None, None, :]).mean((1, 2))[:, :10]
        return self.head(self.c(h) + self.d(z))


def _batch(step: int, n: int = 10, m: int = 7, b: int = 24):
    g = torch.Generator().manual_seed(step)
    return torch.randn(b, n, dtype=D, generator=g), torch.randn(b, m, dtype=D, generator=g)


def _train(model: nn.Module, name: str, loss_of) -> nn.Module:
    cls, kw = OPTIMIZERS[name]
    opt = cls(model.parameters(), stack_layers=False, **kw)
    for i in range(STEPS):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    return model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: m.delta_weight() for n, m in model.named_modules() if hasattr(m, "delta_weight")}
    out.update(
        {n: p.detach() for n, p in model.named_parameters() if not rt.is_manifold_parameter(p)}
    )
    return out


def _mixed_loss(model: nn.Module, step: int) -> torch.Tensor:
    x, t = _batch(step)
    return 0.5 * ((model(x) - t) ** 2).sum(1).mean()


def mixed_row(name: str) -> tuple[float, str, float]:
    """(largest absolute change of a stored parameter, its name, largest relative weight change)."""
    a, b = Mixed(), Mixed()
    with torch.no_grad():
        b.a[0].S.add_(DELTA * torch.eye(2, dtype=D))
    _train(a, name, _mixed_loss), _train(b, name, _mixed_loss)
    params = {n: p.detach() for n, p in b.named_parameters()}
    abs_change = [
        (float((p - params[n]).abs().max()) if p.shape == params[n].shape else float("inf"), n)
        for n, p in ((n, p.detach()) for n, p in a.named_parameters())
    ]
    wa, wb = _weights(a), _weights(b)
    rel = max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa)
    top = max(abs_change)
    return top[0], top[1], rel


def summed_row(name: str, shape: tuple[int, int, int]) -> float:
    """Relative change of ``U S V^T`` of one layer with summed outputs (a rank-1 gradient)."""
    m, n, r = shape

    def make(scale: float) -> nn.Module:
        layer = rt.LowRankLinear(n, m, r, bias=False, dtype=D, seed=3)
        with torch.no_grad():
            layer.S.mul_(1.0 + scale * torch.linspace(0.5, 1.5, r, dtype=D).diag())
        return layer

    def loss(layer: nn.Module, step: int) -> torch.Tensor:
        x, t = _batch(100 + step, n=n, m=1, b=6)
        return 0.5 * ((layer(x).sum(1) - t[:, 0]) ** 2).mean()

    a, b = _train(make(0.0), name, loss), _train(make(DELTA), name, loss)
    if a.rank != b.rank:
        return float("inf")
    return float((a.delta_weight() - b.delta_weight()).norm() / a.delta_weight().norm())


def _figure(rows: dict, path: Path, quick: bool) -> None:
    plt = pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    keys = [k for k in next(iter(rows.values()))]
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        vals = [max(rows[nm][key], 1e-17) for nm in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=key)
    ax.axhline(DELTA, color="k", lw=0.8, ls="--", label="the change of the start (1e-13)")
    ax.axhline(1e-8, color="r", lw=0.8, ls=":", label="required bound (1e-8)")
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("relative change after 3 steps")
    title = "A 1e-13 change of the start, three steps later (float64)"
    ax.set_title(title + (" [smoke run: --quick]" if quick else ""))
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the mixed model only (smoke run)")
    ap.add_argument("--out", default="out", help="folder for continuity.md and continuity.png")
    args = ap.parse_args(argv)
    threads = pin_threads(1, torch=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [machine_info(), "", threads, ""]
    lines += ["| optimizer | mixed: largest parameter change | (parameter) | mixed: relative weight change |"
              + "".join(f" summed {m}x{n} r{r} |" for m, n, r in ([] if args.quick else SHAPES)),
              "|---|---|---|---|" + "---|" * (0 if args.quick else len(SHAPES))]  # fmt: skip
    rows = {}
    for name in OPTIMIZERS:
        top, where, rel = mixed_row(name)
        rows[name] = {"mixed model": rel}
        cells = [f"{top:.1e}", where, f"{rel:.1e}"]
        for shape in [] if args.quick else SHAPES:
            rows[name][f"summed {shape[0]}x{shape[1]} r{shape[2]}"] = summed_row(name, shape)
            cells.append(f"{rows[name][f'summed {shape[0]}x{shape[1]} r{shape[2]}']:.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    (out / "continuity.md").write_text("\n".join(lines) + "\n")
    _figure(rows, out / "continuity.png", args.quick)
    print("\n".join(lines[:4]))
    print(f"wrote {out / 'continuity.md'} and {out / 'continuity.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
