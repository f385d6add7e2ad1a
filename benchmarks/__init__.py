"""rankopt's benchmarks: one module per benchmark, run from the repository's root as

    python -m benchmarks.NAME            # the full benchmark
    python -m benchmarks.NAME --quick    # the smoke run CI makes (tests/ run every one)

Benchmarks (each prints machine information, the thread counts and a table, and writes the
table and a PNG, see its docstring): ``completion``, ``continuity``, ``finetune`` (a package),
``manifold_ops``, ``movielens``, ``optimizer_step``, ``optimizers``, ``sampling_kernels``,
``threads``, ``which_solver``. ``gpu_check.sh`` runs the GPU part in one go.

Every benchmark takes its thread pinning, its timing loop (interleaved rounds, medians), the
benchmark lock, the machine header and its optimizer-state measure from :mod:`benchmarks.harness`
(whose docstring defines the optimizer state). Modules whose names start with ``_`` hold what a
benchmark shares with others or with ``paper_figures`` (problems, methods, baselines).
"""
