"""Few-shot learning the way the field runs it (``make fewshot``), and what long inner
horizons buy (``make fewshot-horizon``).

Modules: :mod:`.problems` (the problems, the horizon experiment, the shared data, model and
tasks), :mod:`.methods` (training and adapting each method, for a number of outer steps
or under a CPU budget, :mod:`.budget`), :mod:`.protonet` (Prototypical Networks),
:mod:`.evaluation` (held-out episodes, confidence intervals), :mod:`.data` (the image data
as labelled datasets with class splits; episodes from ``effmaml.episodes``), :mod:`.run`
(the jobs), :mod:`.report` (CSV, summary, plots), ``__main__`` (the command).
A new method is a name in :data:`METHODS`, a branch in :func:`.methods.train_method` (how it
trains) and in :func:`.methods.tuner` / :func:`.methods.own_steps` (how it adapts at test).
"""

from .evaluation import evaluate
from .methods import train_method
from .problems import HORIZON, METHODS, PROBLEMS, Horizon, Problem
from .report import write, write_horizon
from .run import run

__all__ = [
    "HORIZON",
    "METHODS",
    "PROBLEMS",
    "Horizon",
    "Problem",
    "evaluate",
    "run",
    "train_method",
    "write",
    "write_horizon",
]
