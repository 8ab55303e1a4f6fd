"""The accuracy study: what a user runs with ``python -m benchmarks.study`` (``make study``).

    python -m benchmarks.study                      # the plain m-sharpness study (plain.py)
    python -m benchmarks.study --grid NAME [--quick]  # a named grid of grids.yaml (grid.py, task.py)
    python -m benchmarks.study --grid cost [--quick]  # the accuracy-per-cost frontier (cost*.py)
    python -m benchmarks.study.plots RESULTS.json   # redraw a grid's table and figure

Modules: ``plain`` (the study on the full digits split), ``task`` (the grids' few-shot task and one
training run), ``grid`` (named grids: cells, seeds, paired differences), ``plots`` (the grids' tables
and figures), ``cli`` (the entry point).
"""

from .cli import main
from .plain import QUICK, RESULTS_DIR, SCHEMA, VARIANTS, StudyConfig, load_digits_split, run_study, train_one

__all__ = ["main", "SCHEMA", "RESULTS_DIR", "QUICK", "StudyConfig", "VARIANTS", "load_digits_split", "train_one", "run_study"]
