"""CSV -> plots, summary.md, targets, the claims table and the README block.

Reads ``runs.csv`` only, so ``make report`` rebuilds everything from the committed CSVs.
One module per job: :mod:`.summary` (derived columns, plots, summary.md), :mod:`.targets`
(what each preset is checked against), :mod:`.claims` (the seed's claims), :mod:`.readme`
(the README's results block).
"""

from .claims import claims
from .readme import update_readme
from .summary import (
    derive_columns,
    headline,
    pivot,
    styles,
    summary_table,
    sweep_dirs,
    tradeoff_plot,
    write_report,
)
from .targets import TARGETS, targets

__all__ = [
    "TARGETS",
    "claims",
    "derive_columns",
    "headline",
    "pivot",
    "styles",
    "summary_table",
    "sweep_dirs",
    "targets",
    "tradeoff_plot",
    "update_readme",
    "write_report",
]
