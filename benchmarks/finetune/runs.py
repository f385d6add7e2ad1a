"""One training run of the finetune benchmark, and the :class:`Runner` that keeps every run.

A run trains one method at one learning rate and seed for ``--steps`` steps on a task's cached
hidden states (classification) or token ids (the GPT-2 task, :mod:`benchmarks.finetune.lm`),
then evaluates it on the validation and test splits. The :class:`Runner` writes
each finished run to ``<out>/runs/*.json`` and reads it back instead of training it again.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
import warnings
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.finetune.lm import CausalLM, lm_labels, pretrained_gpt2
from benchmarks.finetune.methods import Method
from benchmarks.finetune.models import BOTTOM, TopClassifier, cache_bottom
from benchmarks.finetune.tasks import TASKS, quick_task
from benchmarks.harness import bench_lock, optimizer_state_bytes


@torch.no_grad()
def evaluate(
    model: nn.Module, h: torch.Tensor, m: torch.Tensor, y: torch.Tensor, batch: int = 128
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on inputs ``h``, masks ``m``, labels ``y``
    (per example, or per token for the LM task; labels ``-100`` are not counted); both NaN
    when a logit is not finite."""
    correct = count = 0
    loss = 0.0
    for i in range(0, len(y), batch):
        logits, yb = model(h[i : i + batch], m[i : i + batch]), y[i : i + batch]
        if not torch.isfinite(logits).all():
            return float("nan"), float("nan")
        valid = yb != -100
        correct += int(((logits.argmax(1) == yb) & valid).sum())
        count += int(valid.sum())
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
    return correct / count, loss / count


def build_model(task: str, template: Any, data: dict) -> nn.Module:
    """A fresh model of ``task`` on a copy of ``template`` (top layers, or the GPT-2)."""
    if task in TASKS and TASKS[task].kind == "lm":
        return CausalLM(copy.deepcopy(template))
    return TopClassifier(copy.deepcopy(template), int(data["train"][2].max()) + 1)


def first_batch_loss(train: tuple, seed: int, batch: int) -> Callable[[nn.Module], torch.Tensor]:
    """``model -> loss`` on the first batch :func:`_train` draws with ``seed`` (the batch of
    the LOI start, as the paper's first gradient)."""
    h, m, y = train
    b = torch.as_tensor(np.random.default_rng(seed).choice(len(y), batch, replace=False))
    return lambda model: nn.functional.cross_entropy(model(h[b], m[b]), y[b])


def build_run(task: str, method: Method, lr: float, seed: int, data: dict, template: Any,
              batch: int) -> tuple:  # fmt: skip
    """``(model, optimizer)`` of one run: a fresh model of ``task`` (eval mode: no dropout)
    built by ``method``; a LOI method gets the loss of the run's first batch."""
    model = build_model(task, template, data).eval()
    kw = {"start_loss": first_batch_loss(data["train"], seed, batch)} if method.loi else {}
    return method.build(model, lr, seed, **kw)


def _train(model: nn.Module, opt: Any, train: tuple, seed: int, args: Namespace) -> tuple:
    """``args.steps`` steps on batches drawn by ``seed`` (the same for every method); returns
    the losses, the seconds per step and per optimizer step, and the run's status."""
    h, m, y = train
    rng = np.random.default_rng(seed)
    losses, t_step, t_opt, status = [], [], [], "ok"
    for _ in range(args.steps):
        b = torch.as_tensor(rng.choice(len(y), args.batch, replace=False))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(h[b], m[b]), y[b])
        loss.backward()
        t1 = time.perf_counter()
        try:
            opt.step()
        except ValueError as e:  # rankopt's finite check: non-finite gradients
            status = f"diverged: {str(e).split(';')[0]}"
            break
        t2 = time.perf_counter()
        losses.append(loss.item())
        t_step.append(t2 - t0)
        t_opt.append(t2 - t1)
        if not math.isfinite(losses[-1]):
            status = "diverged: non-finite loss"
            break
    first = losses[0] if losses else float("nan")
    if status == "ok" and len(losses) >= 10 and statistics.fmean(losses[-10:]) > 1.5 * first:
        status = "diverged: final loss above 1.5x the first"
    return losses, t_step, t_opt, status


def train_run(
    task_name: str, method: Method, lr: float, seed: int, data: dict, template: Any, args: Namespace
) -> dict:
    """One run: a fresh classifier on ``template`` (the top layers), built by ``method``,
    trained and evaluated; the record written to ``runs/`` (losses, accuracies, median ms per
    step and per optimizer step after 3 warm-up steps, optimizer state bytes, trainable
    parameters)."""
    torch.manual_seed(seed)
    model, opt = build_run(task_name, method, lr, seed, data, template, args.batch)
    model.eval()  # no dropout: a deterministic comparison
    losses, t_step, t_opt, status = _train(model, opt, data["train"], seed, args)
    if status != "ok":
        warnings.warn(f"{task_name}/{method.label} lr={lr:g} seed={seed}: {status}", stacklevel=2)
    warm = 3 if len(t_step) > 6 else 0
    val_acc, val_loss = evaluate(model, *data["val"])
    test_acc, test_loss = evaluate(model, *data["test"])
    return dict(
        task=task_name, lr=lr, seed=seed, status=status, steps=len(losses), losses=losses,
        val_acc=val_acc, val_loss=val_loss, test_acc=test_acc, test_loss=test_loss,
        ms_step=1e3 * statistics.median(t_step[warm:]) if t_step else float("nan"),
        ms_opt=1e3 * statistics.median(t_opt[warm:]) if t_opt else float("nan"),
        opt_state_bytes=optimizer_state_bytes(opt),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        load=os.getloadavg()[0],
    )  # fmt: skip


class Runner:
    """Runs (or reads back) one run per (task, method, lr, seed); one JSON file per run."""

    def __init__(self, args: Namespace, tok_enc: tuple) -> None:
        self.args, self.tok_enc = args, tok_enc
        self.dir = Path(args.out) / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data: dict = {}
        self.lm: tuple | None = None  # the GPT-2 task's (vocab, pretrained model), built once
        self.done = self.new = 0
        self.t0 = time.perf_counter()

    def task_data(self, name: str) -> dict:
        """``split -> (hidden states, masks, labels)`` of a task, cached bottom layers."""
        if name not in self.data:
            task = TASKS[name] if not self.args.quick else quick_task(TASKS[name])
            tok, enc = self.tok_enc
            parts = task.load(self.args.data_seed)
            out = {}
            for split, rows in parts.items():
                texts = [t for t, _ in rows]
                if task.kind == "lm":
                    ids, m = self.lm_base()[0].encode(texts, task.max_len)
                    out[split] = (ids, m, lm_labels(ids, m))
                else:
                    h, m = cache_bottom(tok, enc, texts, task.max_len)
                    out[split] = (h, m, torch.tensor([c for _, c in rows]))
            self.data[name] = out
        return self.data[name]

    def lm_base(self) -> tuple:
        """The GPT-2 task's vocabulary and pretrained GPT-2 (:func:`pretrained_gpt2`)."""
        if self.lm is None:
            self.lm = pretrained_gpt2(self.tok_enc[0], Path(self.args.out), self.args.quick)
        return self.lm

    def template(self, task: str = "tweets") -> Any:
        """What every run of ``task`` copies: the encoder's top (trained) layers, or the
        pretrained GPT-2."""
        if TASKS.get(task) is not None and TASKS[task].kind == "lm":
            return self.lm_base()[1]
        return self.tok_enc[1].encoder.layer[BOTTOM:]

    def run(
        self, task: str, key: str, method: Method, lr: float, seed: int, data_task: str
    ) -> dict:
        """The record of one run: read back from ``runs/`` or trained now (and written)."""
        a = self.args
        path = self.dir / f"{task}__{key}__{lr:g}__s{seed}__b{BOTTOM}t{a.steps}x{a.batch}.json"
        if path.exists():
            self.done += 1
            return json.loads(path.read_text())
        data = self.task_data(data_task)
        t0 = time.perf_counter()
        lock = a.lock if a.lock_runs else None
        with bench_lock(lock), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            res = train_run(task, method, lr, seed, data, self.template(task), a)
        res.update(method=key, label=method.label, wall_s=time.perf_counter() - t0)
        path.write_text(json.dumps(res))
        self.new += 1
        print(f"  {task:8s} {key:17s} lr={lr:<7g} seed={seed}  val {res['val_acc']:.3f}  "
              f"test {res['test_acc']:.3f}  {res['ms_step']:.0f} ms/step  {res['status']}  "
              f"({res['wall_s']:.0f} s; {self.new} new, {self.done} read back; "
              f"{time.perf_counter() - self.t0:.0f} s)", flush=True)  # fmt: skip
        return res
