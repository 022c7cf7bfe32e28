"""``python -m bench.fewshot_speed`` (``make fewshot-speed``): the workload most MAML users
run every day, every library side by side in one process.

Finn et al.'s Omniglot network (Conv-4, 64 filters, 1x28x28), 5-way 1-shot tasks with 15
query images per class, a meta-batch of tasks, second order. One meta-iteration is: for
each task, adapt on the support set (N steps), query loss, backward (the meta-gradient
accumulates over the tasks, as a user's loop does). Two families of libraries, each
compared within itself:

* **MAML** (inner SGD 0.4, N = 1, 5, 10): effmaml ``naive``, ``auto`` and ``checkpoint``
  (one front each, built once, as a user builds it), higher (``innerloop_ctx``), TorchOpt
  (``MetaSGD``), and a plain loop of ``torch.func.functional_call`` +
  ``torch.autograd.grad(create_graph=True)`` over the tasks: the floor a Python loop over
  tasks can reach. Reference: effmaml ``naive``.
* **iMAML** (the few-shot bench's settings: inner SGD 0.1 on the proximal objective,
  λ = 0.5, 5 conjugate-gradient steps, damping 0.1; N = 5 and 10): effmaml ``implicit`` and
  TorchOpt's implicit differentiation (``torchopt.diff.implicit.custom_root`` with
  ``solve_cg``, ridge λ·damping: the same linear system). Not at N = 1: one step does not
  reach the inner solution iMAML's gradient is taken at, the Hessian there is indefinite
  here and the conjugate gradient stops (measured: every task). Reference: effmaml
  ``implicit``.

Per library and N:

* **seconds per meta-iteration**: after one warm-up iteration each, ``rounds`` rounds in
  which every library runs one iteration, the order rotating from round to round; the
  median per library.
* **vs fastest peer**: the median over rounds of the library's time over the fastest
  peer's *in the same round*, with a distribution-free confidence interval
  (:mod:`bench.timing`): paired rounds cancel the machine's slow spells, which moved a
  ratio of two medians by ±10% between runs of the same code on this 2-core CPU. The even
  rounds choose the fastest peer (least median), the odd rounds give the ratio, so that
  the peer's luck in choosing it does not lean the ratio (Note [Choosing the fastest peer
  on other rounds than the ratio's]).
* **aten ops**: the operations one meta-iteration dispatches (:func:`bench.timing.count_ops`),
  a count no load on the machine changes: where two libraries dispatch the same work, a
  difference in seconds is the machine's, or Python's.
* **peak memory**: the resident-set growth (CPU) or allocated-memory peak (CUDA) of one
  more meta-iteration, measured after the timing (:class:`effmaml.measure.PeakMemory`).
* **agreement**: the meta-gradient's relative L2 distance from the family's reference on
  the same tasks (float32 here; ``tests/test_fewshot_speed.py`` holds every library to
  1e-12 of it in float64).

The images are random (the speed does not depend on what they show); the tasks are drawn
from a seeded generator, the same for every library. Writes
``results/fewshot-speed/runs.csv`` and ``summary.md``.


Modules: :mod:`.libraries` (the workload, one meta-iteration per library, the families),
:mod:`.run` (timing, counting, measuring), :mod:`.report` (summary.md), ``__main__`` (the
command).
"""

from .libraries import (
    LIBRARIES,
    PEERS,
    REFERENCE,
    Library,
    Speed,
    front,
    make_model,
    make_tasks,
    meta_gradient,
)
from .report import config_of, summary
from .run import run

__all__ = [
    "LIBRARIES",
    "PEERS",
    "REFERENCE",
    "Library",
    "Speed",
    "config_of",
    "front",
    "make_model",
    "make_tasks",
    "meta_gradient",
    "run",
    "summary",
]
