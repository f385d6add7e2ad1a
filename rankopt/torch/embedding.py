"""Low-rank embedding table: ``E = U S V^T`` (num_embeddings x embedding_dim), optionally
``E0 + U S V^T`` with a frozen pretrained table (adapter mode).

Looking up ``b`` tokens costs O(b r (dim + r)) and never forms the table; the backward stores
the same tangent pieces as :class:`~rankopt.torch.LowRankLinear` (see
:mod:`rankopt.torch.layers`), with ``G V`` built by ``index_add`` (O(b r + num r)).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._autograd import LowRankEmbeddingFn
from .layers import LowRankBase, check_base, positive_ints

__all__ = ["LowRankEmbedding"]


class LowRankEmbedding(LowRankBase):
    r"""Embedding whose table is a fixed-rank matrix ``U S V^T`` (+ frozen ``base``).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    rank : int
        ``1 <= rank <= min(num_embeddings, embedding_dim)``.
    padding_idx : int, optional
        As in ``nn.Embedding``: that row receives no gradient.
    base : torch.Tensor, optional
        Frozen table (num_embeddings x embedding_dim): adapter mode.
    dtype, device, seed
        As for :class:`~rankopt.torch.LowRankLinear`. A standalone table starts at a random
        point with the expected Frobenius norm of ``nn.Embedding``'s N(0, 1) init.
    """

    _kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        base: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        seed: Any = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = positive_ints(
            num_embeddings=num_embeddings, embedding_dim=embedding_dim
        )
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(
                    f"padding_idx={padding_idx} is out of range for {num_embeddings} rows"
                )
            padding_idx = padding_idx % self.num_embeddings
        self.padding_idx = padding_idx
        shape = (self.num_embeddings, self.embedding_dim)
        base = check_base(base, shape, "LowRankEmbedding")
        m, n = shape
        self._init_factors(m, n, rank, base, dtype, device, seed, frob2=float(m * n))
        del self._rng_for_bias
        self.register_parameter("bias", None)
        self._register_base(base)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"LowRankEmbedding takes integer indices, got dtype {idx.dtype}")
        with self._precision(idx):
            out = LowRankEmbeddingFn.apply(
                idx, self.U, self.S, self.V, self.U.link.started, self.padding_idx
            )
        if self.base_weight is not None:  # base first: a new adapter adds exact zeros
            base = F.embedding(idx, self.base_weight, self.padding_idx)
            return base + out.to(base.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, "
            f"padding_idx={self.padding_idx}, adapter={self.base_weight is not None}"
        )
