"""Experiments that reproduce the paper's findings on top of `cdsr.trainer`.

Each experiment (`table`, `alignment`, `scaling`) is a list of training runs (`RunSpec`)
executed by `runner.execute` (resumable, parallel, with progress lines) and then analysed
from the runs' `results.json` files into `summary.json`, PNG plots and `report.md`.
"""

from cdsr.experiments.runner import RunSpec, execute, load_results

__all__ = ["RunSpec", "execute", "load_results"]
