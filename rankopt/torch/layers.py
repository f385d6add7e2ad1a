r"""Low-rank ``torch.nn`` layers whose weight is a point of the fixed-rank manifold.

A layer stores its weight ``W = U S V^T`` (``U``: out x r and ``V``: in x r with orthonormal
columns, ``S``: r x r, kept diagonal ``diag(s)`` by the rankopt optimizers), optionally on top of
a frozen dense ``base`` (adapter mode: ``W = W0 + U S V^T``). The forward never forms ``W``:
``x -> ((x V) S^T) U^T`` costs O(b r (m + n)) for b rows instead of O(b m n).

What the backward leaves in ``.grad``
-------------------------------------
With ``G = dL/dW = sum_batch g^T x`` (m x n, never formed), the backward stores the tangent
projection ``P_X(G)`` of the Euclidean gradient (Vandereycken 2013):

* ``S.grad  = M  = U^T G V``           (r x r, this is the true gradient of ``S``),
* ``U.grad  = Up = G V - U M``          (m x r),
* ``V.grad  = Vp = G^T U - V M^T``      (n x r),

computed from activations as ``G V = g^T (x V)``, ``G^T U = x^T (g U)``,
``M = (g U)^T (x V)``: O(b r (m + n) + (m + n) r^2). These are *not* the Euclidean gradients of
the factors. Stored this way, everything torch does with gradients keeps its meaning:

* gradient accumulation and DDP's all-reduce sum/average them, and the projection is linear
  (``U``, ``V`` do not change between steps), so the result is the projection of the summed
  gradient;
* ``clip_grad_norm_`` sees ``||M||^2 + ||Up||^2 + ||Vp||^2 = ||P_X(G)||_F^2``, the norm of the
  Riemannian gradient, and scaling all of them scales the tangent vector;
* GradScaler's unscale and inf check act on them like on any gradient.

The three factors are :class:`ManifoldParameter` objects (a ``torch.nn.Parameter`` subclass)
sharing one :class:`ManifoldLink`, which is how the rankopt optimizers group them into one
manifold point, and how a manifold parameter handed to a plain ``torch.optim`` optimizer is
detected (see :func:`rankopt.torch.optim.allow_plain_optimizers`).

Adapter start
-------------
``X = 0`` is not a rank-r matrix. A new adapter has ``S = 0`` (so the layer computes exactly
``x W0^T + b``) and random orthonormal ``U``, ``V``; until the optimizer's first step the
backward stores the raw sketches ``G V``, ``G^T U``, ``U^T G V`` instead of the projection (still
linear in ``G``: accumulation and DDP stay exact). The optimizer then forms the generalized
Nystrom approximation ``G_hat = (G V) (U^T G V)^+ (U^T G)`` (Nakatsukasa 2020; exact when
``rank G <= r``), takes the top-r singular subspaces ``U0``, ``V0`` of ``G_hat`` and applies its
own update rule once at the degenerate point ``X0 = U0 0 V0^T`` with the tangent vector
``U0^T G_hat V0`` (see :mod:`rankopt.torch.optim`). For RSGD this gives
``X1 = H_r(-lr G_hat) = H_r(-lr G)`` whenever ``rank G <= r``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._backend import as_rng
from ._autograd import LowRankConv2dFn, LowRankLinearFn

__all__ = [
    "ManifoldLink",
    "ManifoldParameter",
    "is_manifold_parameter",
    "LowRankLinear",
    "LowRankConv2d",
]


class ManifoldLink:
    """Shared by the ``U``, ``S``, ``V`` parameters of one low-rank layer.

    Attributes
    ----------
    started : bool
        False for an adapter that has not taken its first step (its ``.grad`` then holds sketches).
    kind : str
        ``"linear"`` or ``"conv2d"``.
    """

    def __init__(self, kind: str, started: bool = True) -> None:
        self.kind = kind
        self.started = bool(started)

    def __repr__(self) -> str:
        return f"ManifoldLink(kind={self.kind!r}, started={self.started})"


class _TaggedMeta(type(nn.Parameter)):
    """Counts a tensor tagged by :meth:`LowRankBase.__setattr__` (FSDP2) as a factor."""

    def __instancecheck__(cls, obj: Any) -> bool:
        link = getattr(obj, "link", None) if isinstance(obj, torch.Tensor) else None
        return isinstance(link, ManifoldLink) or super().__instancecheck__(obj)


class ManifoldParameter(nn.Parameter, metaclass=_TaggedMeta):
    """A factor (``role`` "U", "S" or "V") of a low-rank layer's fixed-rank weight.

    Behaves like ``nn.Parameter``; the extra attributes survive ``copy.deepcopy`` (the three
    factors of a copied layer share a new link) and pickling of whole modules.
    """

    role: str
    link: ManifoldLink

    def __new__(cls, data: torch.Tensor, role: str, link: ManifoldLink, requires_grad: bool = True):
        if role not in ("U", "S", "V"):
            raise ValueError(f"role must be 'U', 'S' or 'V', got {role!r}")
        p = super().__new__(cls, data, requires_grad)
        p.role = role
        p.link = link
        return p

    def __deepcopy__(self, memo: dict) -> ManifoldParameter:
        if id(self) in memo:
            return memo[id(self)]
        data = self.data.clone(memory_format=torch.preserve_format)
        res = type(self)(data, self.role, copy.deepcopy(self.link, memo), self.requires_grad)
        memo[id(self)] = res
        return res

    def __reduce_ex__(self, proto: int):
        return (_rebuild_manifold_parameter, (self.data, self.role, self.link, self.requires_grad))

    def __repr__(self) -> str:
        return f"ManifoldParameter(role={self.role!r}, shape={tuple(self.shape)}, {self.link!r})"


def _rebuild_manifold_parameter(data, role, link, requires_grad):
    return ManifoldParameter(data, role, link, requires_grad)


def is_manifold_parameter(p: Any) -> bool:
    """True for the ``U``, ``S``, ``V`` factors of a rankopt low-rank layer."""
    return isinstance(p, ManifoldParameter)


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------


def resize_parameter_(p: torch.Tensor, new: torch.Tensor) -> None:
    """Give the parameter ``p`` the data ``new`` of another shape (same object, ``grad`` reset).

    ``p.data = new`` alone keeps autograd's cached gradient accumulator of ``p`` when a graph
    still references it (e.g. the previous ``loss`` is alive), and that accumulator checks
    gradients against the old shape. torch drops the cached accumulator when the dtype
    changes, so the data is set once in another dtype and then in its own.
    """
    other = torch.float32 if new.dtype == torch.float64 else torch.float64
    new = new.contiguous()  # every factor row-major, whoever wrote it (same kernels, same rounding)
    p.data = new.to(other)
    p.data = new
    p.grad = None


def _seed_rng(seed: Any) -> np.random.Generator:
    """A NumPy Generator: from ``seed``, or (``None``) from torch's default generator.

    ``seed=None`` follows ``torch.nn`` conventions (``torch.manual_seed`` makes model
    construction reproducible) without touching NumPy's global state.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return as_rng(seed)


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> torch.Tensor:
    """Haar-random ``rows x cols`` orthonormal columns (float64): QR of a Gaussian matrix with
    the signs of ``diag(R)`` fixed. The QR runs in torch (its thread setting), not NumPy: a
    multi-threaded OpenBLAS spinning on a loaded machine made a 1536 x 32 QR take ~1 s."""
    q, rr = torch.linalg.qr(torch.from_numpy(rng.standard_normal((rows, cols))))
    return (q * torch.sign(torch.diagonal(rr))[None, :]).contiguous()


class LowRankBase(nn.Module):
    """Shared machinery: factors ``U`` (m x r), ``S`` (r x r), ``V`` (n x r), optional base."""

    _kind = "base"

    def __setattr__(self, name: str, value: Any) -> None:
        """Tag a tensor replacing a factor (FSDP2's parameters) with its ``role`` and ``link``."""
        old = self.__dict__.get("_parameters", {}).get(name)
        if isinstance(old, ManifoldParameter) and isinstance(value, torch.Tensor):
            value.role, value.link = old.role, old.link
        super().__setattr__(name, value)

    def _init_factors(
        self,
        m: int,
        n: int,
        rank: int,
        base: torch.Tensor | None,
        dtype,
        device,
        seed: Any,
        frob2: float | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise ValueError(f"rank must be an integer, got {rank!r}")
        if not 1 <= rank <= min(m, n):
            raise ValueError(
                f"rank={rank} must satisfy 1 <= rank <= min(out, in) = min({m}, {n}) = {min(m, n)}"
            )
        dtype = _factor_dtype(dtype, base)
        if base is not None and device is None:
            device = base.device
        rng = _seed_rng(seed)
        U = _orthonormal(rng, m, rank).to(dtype=dtype, device=device)
        V = _orthonormal(rng, n, rank).to(dtype=dtype, device=device)
        started = base is None
        # Standalone layer: the expected ||W||_F^2 of torch's default init (m/3 for nn.Linear and
        # nn.Conv2d, m n for nn.Embedding), spread evenly over the r singular values.
        # Adapter: S = 0, the layer computes exactly its base.
        frob2 = m / 3.0 if frob2 is None else frob2
        sval = math.sqrt(frob2 / rank) if started else 0.0
        S = torch.eye(rank, dtype=dtype, device=device) * sval
        link = ManifoldLink(self._kind, started=started)
        self.U = ManifoldParameter(U, "U", link)
        self.S = ManifoldParameter(S, "S", link)
        self.V = ManifoldParameter(V, "V", link)
        # the adapter flag as a tensor (checkpoints: safetensors / save_pretrained / Trainer);
        # the optimizers read link.started, the buffer mirrors it when a state dict is taken
        self.register_buffer("adapter_started", torch.tensor(started, device=device))
        self._rng_for_bias = rng

    def _init_bias(self, m: int, fan_in: int, bias: bool, dtype, device) -> None:
        if bias:
            bound = 1.0 / math.sqrt(fan_in)
            b = self._rng_for_bias.uniform(-bound, bound, m)
            self.bias = nn.Parameter(torch.as_tensor(b, dtype=self.U.dtype, device=self.U.device))
        else:
            self.register_parameter("bias", None)
        del self._rng_for_bias

    # -- public API ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Current rank r (rank-adaptive optimizers change it by resizing ``U``, ``S``, ``V``)."""
        return int(self.S.shape[0])

    @property
    def started(self) -> bool:
        """False for an adapter before its first optimizer step (it still contributes 0)."""
        return self.U.link.started

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, s, V)`` (detached) with ``W - W0 = U diag(s) V^T``; ``s = 0`` before an adapter starts."""
        return self.U.detach(), self.S.detach().diagonal().clone(), self.V.detach()

    def delta_weight(self) -> torch.Tensor:
        """The dense low-rank part ``U S V^T`` (m x n), e.g. to merge; O(m n r)."""
        return (self.U.detach() @ self.S.detach()) @ self.V.detach().T

    #: shape of the dense weight when it is not the m x n matrix itself (conv kernels)
    _kernel_shape: tuple[int, ...] | None = None

    def _register_base(self, base: torch.Tensor | None) -> None:
        """Keep the frozen base weight (adapter mode) as a non-trainable parameter, or None."""
        if base is not None:
            self.base_weight = nn.Parameter(base.detach(), requires_grad=False)
        else:
            self.register_parameter("base_weight", None)

    def dense_weight(self) -> torch.Tensor:
        """``W0 + U S V^T`` (or ``U S V^T``) as a dense tensor of the layer's weight shape."""
        d = self.delta_weight()
        if self._kernel_shape is not None:
            d = d.reshape(self._kernel_shape)
        return (
            d
            if self.base_weight is None
            else self.base_weight.detach() + d.to(self.base_weight.dtype)
        )

    def set_factors(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> None:
        """Overwrite the point ``U diag(s) V^T`` (any rank; checked). Marks an adapter as started.

        Raises ``ValueError`` unless ``U`` (m x r) and ``V`` (n x r) have orthonormal columns
        (``||U^T U - I||_F <= sqrt(eps)`` of their dtype, :data:`ORTHONORMAL_TOL`), ``s`` has
        ``1 <= r <= min(m, n)`` finite entries ``>= 0`` and nothing is NaN or inf.
        """
        m, n = self.U.shape[0], self.V.shape[0]
        if s.dim() != 1 or tuple(U.shape) != (m, s.shape[0]) or tuple(V.shape) != (n, s.shape[0]):
            raise ValueError(
                f"factors must have shapes ({m}, r), (r,), ({n}, r); got U{tuple(U.shape)}, "
                f"s{tuple(s.shape)}, V{tuple(V.shape)}"
            )
        check_factors(U, s, V)
        with torch.no_grad():
            for p, new in ((self.U, U), (self.S, torch.diag(s)), (self.V, V)):
                new = new.to(dtype=p.dtype, device=p.device)
                if p.shape == new.shape:
                    p.copy_(new)
                else:
                    resize_parameter_(p, new.clone())
        self.U.link.started = True

    # -- checkpoints: the adapter flag travels as a bool tensor --------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.adapter_started.fill_(self.U.link.started)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        # checkpoints of rankopt <= 0.1 kept the flag as extra state {'started': bool}
        old = state_dict.pop(prefix + "_extra_state", None)
        if isinstance(old, dict) and prefix + "adapter_started" not in state_dict:
            state_dict[prefix + "adapter_started"] = torch.tensor(bool(old.get("started", True)))
        # a rank-adaptive optimizer may have changed the rank: take the saved factor shapes
        keys = [prefix + k for k in ("U", "S", "V")]
        if all(k in state_dict for k in keys):
            r = state_dict[keys[1]].shape[0]
            if r != self.rank and tuple(state_dict[keys[0]].shape) == (self.U.shape[0], r):
                for p, k in zip((self.U, self.S, self.V), keys, strict=True):
                    resize_parameter_(
                        p, torch.empty(state_dict[k].shape, dtype=p.dtype, device=p.device)
                    )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
        if prefix + "adapter_started" in state_dict:
            self.U.link.started = bool(self.adapter_started)

    # -- forward helpers ---------------------------------------------------------------------
    def _precision(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """Where the factors' products run: the factors' dtype, or the input's half dtype.

        float16/bfloat16 inputs with float32 factors (adapters on a half-precision model) run
        under ``torch.autocast`` in the input's dtype, like an ``nn.Linear`` of that dtype; the
        factors and their tangent-space gradients stay float32. Half-precision factors cannot
        be trained (see :func:`_factor_dtype`); they are accepted for inference only.
        """
        fd = self.U.dtype
        if fd in HALF_DTYPES and torch.is_grad_enabled() and self.U.requires_grad:
            raise ValueError(
                f"this low-rank layer's factors are {fd} (model.half() / .to({fd})?): half-"
                "precision factors cannot be trained (U, V lose orthonormality, the manifold "
                "math overflows). Keep the factors float32 (e.g. convert the model after "
                ".half(): apply_low_rank keeps adapters in float32) and use torch.autocast; "
                "half factors work under torch.no_grad() for inference."
            )
        if not x.is_floating_point() or x.dtype == fd or torch.is_autocast_enabled(x.device.type):
            return contextlib.nullcontext()
        if x.dtype in HALF_DTYPES:
            return torch.autocast(x.device.type, dtype=x.dtype)
        raise ValueError(
            f"input dtype {x.dtype} does not match this low-rank layer's factors ({fd}); cast "
            f"the input or the layer (layer.to({x.dtype}))"
        )


#: float dtypes whose factors cannot be trained (kept float32 by conversion, see _factor_dtype)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _factor_dtype(dtype: torch.dtype | None, base: torch.Tensor | None) -> torch.dtype:
    """The factors' dtype: ``dtype``, else the base's (float32 for a half base), else torch's.

    Policy: factors are float32 or float64. Half-precision factors lose
    orthonormality at the first write-back (``||U^T U - I||`` ~ 1e-3) and overflow in the
    manifold step, so an explicit ``dtype=torch.float16/bfloat16`` is refused, and adapters
    on a half-precision base are *upcast* to float32 factors (as PEFT's
    ``autocast_adapter_dtype``); their forward runs in the input's dtype.
    """
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float64):
            hint = (
                " (half-precision factors cannot be trained: keep them float32 and use "
                "torch.autocast; a half-precision base is fine)"
                if dtype in HALF_DTYPES
                else ""
            )
            raise ValueError(
                f"dtype of the factors must be torch.float32 or torch.float64, got {dtype}{hint}"
            )
        return dtype
    if base is not None and base.is_floating_point():
        return torch.float32 if base.dtype in HALF_DTYPES else base.dtype
    default = torch.get_default_dtype()
    return torch.float32 if default in HALF_DTYPES else default


#: ``||Q^T Q - I||_F`` allowed for ``set_factors``: sqrt of the machine epsilon of Q's dtype
#: (3.5e-4 for float32, 1.5e-8 for float64): a factor computed in that precision passes.
ORTHONORMAL_TOL = {torch.float32: 3.5e-4, torch.float64: 1.5e-8}


def check_factors(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> None:
    """``ValueError`` unless ``(U, s, V)`` is a valid point: finite, ``s >= 0``, ``1 <= r <=
    min(m, n)``, ``U``, ``V`` with orthonormal columns (:data:`ORTHONORMAL_TOL`). O((m + n) r^2)."""
    r = int(s.shape[0])
    if not 1 <= r <= min(U.shape[0], V.shape[0]):
        raise ValueError(
            f"rank r={r} must satisfy 1 <= r <= min(m, n) = {min(U.shape[0], V.shape[0])}"
        )
    for name, t in (("U", U), ("s", s), ("V", V)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    if bool((s < 0).any()):
        raise ValueError(
            f"s must hold singular values >= 0, got min(s) = {float(s.min()):.3g} (move the "
            "sign into U or V)"
        )
    for name, Q in (("U", U), ("V", V)):
        tol = ORTHONORMAL_TOL.get(Q.dtype, ORTHONORMAL_TOL[torch.float32])
        Qd = Q.detach().double()
        err = float(
            torch.linalg.matrix_norm(Qd.T @ Qd - torch.eye(r, dtype=torch.float64, device=Q.device))
        )
        if not err <= tol:
            raise ValueError(
                f"{name} must have orthonormal columns: ||{name}^T {name} - I||_F = {err:.3g} > "
                f"{tol:.1e}; pass the factors of a thin SVD (W = U diag(s) V^T)"
            )


def positive_ints(**sizes: Any) -> tuple[int, ...]:
    """The given sizes as ints; ``ValueError`` naming the first that is not a positive integer."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return tuple(int(v) for v in sizes.values())


def check_base(base: Any, shape: tuple[int, ...], what: str) -> torch.Tensor | None:
    if base is None:
        return None
    if not isinstance(base, torch.Tensor):
        raise ValueError(
            f"base must be a torch.Tensor (the frozen dense weight), got {type(base).__name__}"
        )
    if tuple(base.shape) != shape:
        raise ValueError(f"base has shape {tuple(base.shape)}, but this {what} needs {shape}")
    if not base.is_floating_point():
        raise ValueError(f"base must be a floating-point tensor, got dtype {base.dtype}")
    return base


class LowRankLinear(LowRankBase):
    r"""Linear layer with weight ``U S V^T`` (or ``W0 + U S V^T`` with a frozen ``base`` W0).

    Parameters
    ----------
    in_features, out_features : int
    rank : int
        ``1 <= rank <= min(in_features, out_features)``.
    bias : bool
        Add a trainable bias (initialized like ``nn.Linear``'s).
    base : torch.Tensor, optional
        Frozen dense weight (out_features x in_features): adapter mode. The tensor is kept
        by reference (no copy) as a non-trainable parameter ``base_weight``.
    dtype, device : optional
        Of the factors (default: those of ``base``, else torch's default dtype, CPU).
    seed : int or numpy.random.Generator, optional
        Random orthonormal ``U``, ``V``. ``None`` draws a seed from torch's default generator.

    Notes
    -----
    Standalone layers start at a random point with ``s_i = sqrt(out / (3 r))`` (the expected
    Frobenius norm of ``nn.Linear``'s default init). Adapters start with ``S = 0`` (see the
    module docstring). Forward O(b r (m + n)); backward O(b r (m + n) + (m + n) r^2).
    """

    _kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        base: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        seed: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = positive_ints(
            in_features=in_features, out_features=out_features
        )
        base = check_base(base, (self.out_features, self.in_features), "LowRankLinear")
        self._init_factors(self.out_features, self.in_features, rank, base, dtype, device, seed)
        self._init_bias(self.out_features, self.in_features, bias, dtype, device)
        self._register_base(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowRankLinear(in_features={self.in_features}, out_features="
                f"{self.out_features}) got an input of shape {tuple(x.shape)}: its last "
                f"dimension must be {self.in_features}"
            )
        with self._precision(x):
            out = LowRankLinearFn.apply(x, self.U, self.S, self.V, self.U.link.started)
        if self.base_weight is not None:  # base first: a new adapter adds exact zeros
            return F.linear(x, self.base_weight, self.bias) + out
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, adapter={self.base_weight is not None}"
        )


def _pair(v: Any, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int) and a >= 0 for a in t):
        raise ValueError(f"{name} must be an int or a pair of ints >= 0, got {v!r}")
    return t  # type: ignore[return-value]


class LowRankConv2d(LowRankBase):
    r"""2-D convolution whose kernel, reshaped ``out x (in kh kw)``, is ``U S V^T`` (+ base).

    Forward: a kh x kw convolution with the r filters ``V^T`` (stride, padding, dilation), then
    a 1 x 1 convolution with ``U S``: O(B H W r (in kh kw + out)) instead of O(B H W out in kh kw).
    The backward returns the same manifold pieces as :class:`LowRankLinear`, with
    ``G^T U`` obtained as the weight gradient of the first convolution (``conv2d_weight``),
    never unfolding the input. ``groups`` must be 1 and padding numeric (or "valid").

    Parameters are those of ``nn.Conv2d`` plus ``rank``, ``base`` (frozen kernel of shape
    ``(out, in, kh, kw)``), ``seed``.
    """

    _kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        base: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        seed: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = positive_ints(
            in_channels=in_channels, out_channels=out_channels
        )
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if padding == "valid":
            padding = 0
        if isinstance(padding, str):
            raise ValueError(
                f"padding={padding!r} is not supported by LowRankConv2d; give it as numbers"
            )
        self.padding = _pair(padding, "padding")
        kh, kw = self.kernel_size
        n = self.in_channels * kh * kw
        base = check_base(base, (self.out_channels, self.in_channels, kh, kw), "LowRankConv2d")
        self._init_factors(self.out_channels, n, rank, base, dtype, device, seed)
        self._init_bias(self.out_channels, n, bias, dtype, device)
        self._register_base(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"LowRankConv2d(in_channels={self.in_channels}, out_channels="
                f"{self.out_channels}) got an input of shape {tuple(x.shape)}: it needs "
                f"(batch, {self.in_channels}, height, width)"
            )
        with self._precision(x):
            out = LowRankConv2dFn.apply(
                x, self.U, self.S, self.V, self.U.link.started,
                self.kernel_size, self.stride, self.padding, self.dilation,
            )  # fmt: skip
        if self.base_weight is not None:  # base first: a new adapter adds exact zeros
            base = F.conv2d(
                x, self.base_weight, self.bias, self.stride, self.padding, self.dilation
            )
            return base + out
        return out if self.bias is None else out + self.bias.to(out.dtype)[None, :, None, None]

    @property
    def _kernel_shape(self) -> tuple[int, ...]:  # dense_weight: (out, in, kh, kw)
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, "
            f"adapter={self.base_weight is not None}"
        )
