r"""Low-rank versions of the two 1-D layers fine-tuned models hold.

* :class:`LowRankConv1D`: transformers' ``Conv1D`` (GPT-2's attention and MLP projections), a
  linear layer whose weight is stored **transposed**, ``(in, out)`` (PEFT calls this layout
  ``fan_in_fan_out``): ``y = x W + b``. The point ``U S V^T`` is the ``out x in`` matrix of the
  map (``U``: out x r, ``V``: in x r, as for :class:`~rankopt.torch.LowRankLinear`), the frozen
  base keeps ``Conv1D``'s ``(in, out)`` layout (by reference, no copy) and runs with the same
  ``addmm`` as ``Conv1D``, so a new adapter computes exactly what ``Conv1D`` computes.
  ``dense_weight()`` returns the ``(in, out)`` weight ``Conv1D`` holds.
* :class:`LowRankConv1d`: ``torch.nn.Conv1d``, its kernel reshaped ``out x (in k)``. Runs as
  :class:`~rankopt.torch.LowRankConv2d` on a height-1 image (a ``1 x k`` convolution with the
  r filters ``V^T``, then a 1 x 1 convolution with ``U S``): O(B L r (in k + out)). The base
  runs with ``F.conv1d``. ``groups`` must be 1, padding numeric or ``"valid"``.

Both store the same tangent pieces in ``.grad`` as every rankopt layer (see
:mod:`rankopt.torch.layers`), so every rankopt optimizer trains them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._autograd import LowRankConv2dFn, LowRankLinearFn
from .layers import LowRankBase, check_base, positive_ints

__all__ = ["LowRankConv1D", "LowRankConv1d"]


class LowRankConv1D(LowRankBase):
    r"""transformers' ``Conv1D`` (weight ``(in, out)``, ``y = x W + b``) with a fixed-rank weight.

    Parameters
    ----------
    in_features, out_features : int
        ``Conv1D(nf=out_features, nx=in_features)``.
    rank : int
        ``1 <= rank <= min(in_features, out_features)``.
    bias : bool
        Add a trainable bias (initialized like ``nn.Linear``'s).
    base : torch.Tensor, optional
        Frozen ``(in_features, out_features)`` weight, ``Conv1D``'s layout: adapter mode
        ``W = W0 + (U S V^T)^T``. Kept by reference (no copy).
    dtype, device, seed
        As for :class:`~rankopt.torch.LowRankLinear`.

    Notes
    -----
    ``U`` (out x r), ``V`` (in x r): the factors of the ``out x in`` map, as in
    :class:`~rankopt.torch.LowRankLinear`; only the base and ``dense_weight()`` keep the
    transposed layout. Forward O(b r (in + out)) plus the base's ``addmm``.
    """

    _kind = "hf_conv1d"

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
        base = check_base(base, (self.in_features, self.out_features), "LowRankConv1D")
        self._init_factors(self.out_features, self.in_features, rank, base, dtype, device, seed)
        self._init_bias(self.out_features, self.in_features, bias, dtype, device)
        self._register_base(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowRankConv1D(in_features={self.in_features}, out_features="
                f"{self.out_features}) got an input of shape {tuple(x.shape)}: its last "
                f"dimension must be {self.in_features}"
            )
        with self._precision(x):
            out = LowRankLinearFn.apply(x, self.U, self.S, self.V, self.U.link.started)
        if self.base_weight is not None:  # base first (Conv1D's own addmm): exact zeros added
            size = (*x.shape[:-1], self.out_features)
            flat = x.reshape(-1, self.in_features)
            if self.bias is None:
                base = flat @ self.base_weight
            else:
                base = torch.addmm(self.bias, flat, self.base_weight)
            return base.view(size) + out
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dense_weight(self) -> torch.Tensor:
        """``W0 + (U S V^T)^T`` (or ``(U S V^T)^T``): the ``(in, out)`` weight of ``Conv1D``."""
        d = self.delta_weight().T
        if self.base_weight is None:
            return d
        return self.base_weight.detach() + d.to(self.base_weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, adapter={self.base_weight is not None}, "
            "fan_in_fan_out=True"
        )


def _single(v: Any, name: str) -> int:
    t = (v,) if isinstance(v, int) else tuple(v)
    if len(t) != 1 or not isinstance(t[0], int) or isinstance(t[0], bool) or t[0] < 0:
        raise ValueError(f"{name} must be an int >= 0 (or a 1-tuple), got {v!r}")
    return int(t[0])


class LowRankConv1d(LowRankBase):
    r"""``nn.Conv1d`` whose kernel, reshaped ``out x (in k)``, is ``U S V^T`` (+ frozen base).

    Parameters are those of ``nn.Conv1d`` (``groups=1``, zero padding given as a number or
    ``"valid"``) plus ``rank``, ``base`` (frozen kernel of shape ``(out, in, k)``), ``dtype``,
    ``device``, ``seed``. Inputs are ``(batch, in, length)`` or unbatched ``(in, length)``.
    """

    _kind = "conv1d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        rank: int,
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | str = 0,
        dilation: int | tuple[int] = 1,
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
        self.kernel_size = (_single(kernel_size, "kernel_size"),)
        self.stride = (_single(stride, "stride"),)
        self.dilation = (_single(dilation, "dilation"),)
        if padding == "valid":
            padding = 0
        if isinstance(padding, str):
            raise ValueError(
                f"padding={padding!r} is not supported by LowRankConv1d; give it as a number"
            )
        self.padding = (_single(padding, "padding"),)
        if min(self.kernel_size[0], self.stride[0], self.dilation[0]) < 1:
            raise ValueError("kernel_size, stride and dilation must be >= 1")
        n = self.in_channels * self.kernel_size[0]
        shape = (self.out_channels, self.in_channels, self.kernel_size[0])
        base = check_base(base, shape, "LowRankConv1d")
        self._init_factors(self.out_channels, n, rank, base, dtype, device, seed)
        self._init_bias(self.out_channels, n, bias, dtype, device)
        self._register_base(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 2
        if unbatched:
            x = x[None]
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"LowRankConv1d(in_channels={self.in_channels}, out_channels="
                f"{self.out_channels}) got an input of shape {tuple(x.shape)}: it needs "
                f"(batch, {self.in_channels}, length) or ({self.in_channels}, length)"
            )
        conf = ((1, self.kernel_size[0]), (1, self.stride[0]), (0, self.padding[0]),
                (1, self.dilation[0]))  # fmt: skip
        with self._precision(x):
            out = LowRankConv2dFn.apply(
                x[:, :, None, :], self.U, self.S, self.V, self.U.link.started, *conf
            )[:, :, 0, :]
        if self.base_weight is not None:  # base first: a new adapter adds exact zeros
            base = F.conv1d(
                x, self.base_weight, self.bias, self.stride, self.padding, self.dilation
            )
            out = base + out
        elif self.bias is not None:
            out = out + self.bias.to(out.dtype)[None, :, None]
        return out[0] if unbatched else out

    @property
    def _kernel_shape(self) -> tuple[int, ...]:  # dense_weight: (out, in, k)
        return (self.out_channels, self.in_channels, self.kernel_size[0])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, "
            f"adapter={self.base_weight is not None}"
        )
