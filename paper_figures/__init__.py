"""The figures that show the theory (see README.md here): ``python -m paper_figures``."""
