"""The probe: a few steps before an engine-based unroll that measure and check it.

Before a recomputing strategy unrolls N steps it runs, on batch 0 and with the RNG left as
it was:

1. a first-order step (warm-up; t₁, the cost of an ``advance``),
2. the engine's ``pullback`` of step 0, cold: A, the bytes autograd
   saves for a step with its second-order graph (saved-tensor hooks), and a real double
   backward, which fails here (``NoDoubleBackwardError``, naming the operation), before
   any work, if step 0 cannot be differentiated twice,
3. the same pullback again, warm: t₂, a step with its graph plus its pullback,
4. a first-order step again (t₁ = the faster of the two),
5. the inner loss's gradient without and with ``create_graph``, compared bitwise
   (``Probe.first_order_exact``: whether advances may run first order).

On CUDA it also uses the pinned host↔device bandwidth, measured once per process
(``effmaml.measure.host_link``). Cost: 4 step evaluations (``PROBE_EVALS``) and one
forward with two backward passes of the inner loss (Note [States bitwise naive's]), once
per ``MAML`` instance and signature (batch 0's and the model's shapes, dtypes and devices,
train/eval mode, autocast): the result is cached, so a meta-training loop pays it once.
Batch 0 is indexed once per call to read its signature (and reused by the probe's steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from .costs import Probe
from .engine import pullback
from .measure import clock, host_link
from .memory import nbytes, saved_bytes
from .module import FunctionalModel
from .problem import NO_RECORDS, InnerProblem, Runtime
from .replay import capture_rng, forked_rng, replay_rng
from .state import Consts, InnerState
from .step import inner_step, step_context

__all__ = ["PROBE_EVALS", "probe", "signature"]

PROBE_EVALS = 4  # step evaluations of a probe that runs (0 when cached)


def signature(problem: InnerProblem, batch0: Any) -> Hashable:
    """What the probe's results depend on besides the MAML instance: batch 0's structure
    (types, shapes, dtypes, devices), the model's parameters and buffers (shapes, dtypes,
    devices: a model cast or moved after a first ``adapt`` is probed again), its
    train/eval mode, the autocast state and whether a multi-step loss adds a query to each
    step."""
    msl = _structure(problem.query) if problem.step_weights else None
    model = problem.model
    tensors = tuple(_structure(t) for t in (*model.parameters(), *model.buffers()))
    return (_structure(batch0), tensors, model.training, problem.autocast, msl)


class _First(Sequence[Any]):
    """The batch source with batch 0 already fetched (the probe indexes the source once)."""

    def __init__(self, source: Sequence[Any], batch0: Any) -> None:
        self.source, self.batch0 = source, batch0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, t: Any) -> Any:
        return self.batch0 if t == 0 else self.source[t]


def _structure(batch: Any) -> Hashable:
    if isinstance(batch, Tensor):
        return ("T", tuple(batch.shape), batch.dtype, str(batch.device))
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, tuple(_structure(b) for b in batch))
    if isinstance(batch, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in sorted(batch.items(), key=str)))
    return type(batch).__name__


def probe(problem: InnerProblem, rt: Runtime, state0: InnerState, consts: Consts) -> Probe:
    """Measure P, A, t₁ and t₂ on batch 0 and check that double backward exists.


    Args:
        problem: the problem.
        rt: the call's runtime: counts the probe's evaluations; ``rt.probes`` caches results
            by ``signature`` (a hit returns them with ``evals=0`` and ``seconds=0`` and
            runs nothing).
        state0: the initial state.
        consts: the constants.

    Returns:
        The ``Probe``.
    """
    # Note [Why checkpoint probes one step]
    # Every pullback refuses an operation without double backward (Note [A missing double
    # backward inside a pullback]), but in backward, after the whole forward pass. Probing
    # step 0 in the forward pass finds one in step 0 before any work (a real pullback), and
    # measures A, the bytes autograd saves for one second-order step, and the step times
    # that the schedule's choice needs (Note [The time model]). RNG and buffers are left as they
    # were; the step evaluations are counted in step_evals.
    device = problem.device
    with forked_rng(problem.rng_devices):  # indexing a batch may draw from the RNG
        batch0 = problem.batches[0]
    key = signature(problem, batch0)
    if key in rt.probes:
        return dataclasses.replace(rt.probes[key], evals=0, seconds=0.0)
    problem = dataclasses.replace(problem, batches=_First(problem.batches, batch0))
    if problem.step_weights and not problem.step_weights[0]:
        # Note [A with a multi-step loss]
        # A is measured on step 0, and with a multi-step loss it holds the query's graph at
        # φ_1 too. That graph saves φ_1's parameters (a conv saves its weight), which are
        # the next step's input state: naive's next graph holds them anyway, and the
        # schedules count stored states separately. Counting them in A over-predicted naive
        # by 70% and the schedules by 10-25% on cpu-quick-msl, so A leaves them out.
        weights = (1.0, *problem.step_weights[1:])
        problem = dataclasses.replace(problem, step_weights=weights)
    start = clock(device)
    with forked_rng(problem.rng_devices):
        rng = capture_rng(problem.rng_devices)  # every probe step starts from it (dropout)
        with replay_rng(rng):
            t_fo1, fo_bytes = _first_order(problem, rt, state0, consts)
        need = [c.requires_grad for c in consts.flat()]
        ones = state0.map(lambda t, diff: torch.ones_like(t) if diff else t)
        cotangent = ones.spec().unflatten(ones.flat(True), differentiable_only=True)
        loss_grad = torch.ones(1, dtype=torch.float64, device=device)

        seen: dict[str, Any] = {}

        def inspect(state: InnerState) -> None:
            seen["graph_step"] = clock(device)  # the step with graph is done
            seen.setdefault("state", state.flat())  # the counted (first) pullback's

        def pull() -> tuple[float, float]:
            # an operation without double backward raises NoDoubleBackwardError here, named
            # (Note [A missing double backward inside a pullback])
            t0 = clock(device)
            pullback(
                problem,
                rt,
                NO_RECORDS,
                state0,
                rng,
                0,
                1,
                consts,
                need,
                cotangent,
                loss_grad,
                inspect,
            )
            return clock(device) - t0, seen["graph_step"] - t0

        # the first pullback runs cold and counts what the step saves (its gradients are
        # not used: saved-tensor hooks hand back detached aliases); the second is timed
        with saved_bytes() as count:
            pull()
        t_pull, t_graph = pull()
        t_fo2, _ = _first_order(problem, rt, state0, consts)
        with replay_rng(rng):
            same = _gradients_agree(problem, state0, consts)
    link = host_link(device) if device.type == "cuda" else (0.0, 0.0)
    result = Probe(
        state_bytes=state0.nbytes(),
        param_bytes=nbytes(state0.params.values()),
        step_graph_bytes=count.without(seen["state"]) if problem.step_weights else count.bytes,
        first_order_graph_bytes=fo_bytes,
        # Note [Timing the probe]: the first of each kind of work in a process runs cold
        # (allocations, kernel selection), 30-50% slower than in a loop; the faster of two
        # first-order steps, and the second pullback, are close to what the unroll pays
        # per step.
        advance_seconds=min(t_fo1, t_fo2),
        pullback_seconds=t_pull,
        graph_step_seconds=t_graph,
        first_order_exact=same,
        host_bandwidth=link[0],
        pin_bandwidth=link[1],
        seconds=clock(device) - start,
        evals=PROBE_EVALS,
    )
    rt.probes[key] = result
    return result


def _first_order(
    problem: InnerProblem, rt: Runtime, state0: InnerState, consts: Consts
) -> tuple[float, int]:
    """Time one first-order step (and count what its graph saves at its peak)."""
    t0 = clock(problem.device)
    s = state0.detached(requires_grad=True)
    with saved_bytes() as count:
        out, loss, _ = inner_step(
            problem, rt, NO_RECORDS, s, 0, consts.detached(), create_graph=False
        )
        # a first-order step frees its graph inside autograd.grad; what it keeps alive at
        # its peak is the forward's saved tensors
    del out, loss
    return clock(problem.device) - t0, count.bytes


def _gradients_agree(problem: InnerProblem, state0: InnerState, consts: Consts) -> bool:
    """Whether the inner loss's gradient at step 0 is bitwise the same computed without
    and with ``create_graph`` (one forward, two backward passes).
    """
    # Note [States bitwise naive's]
    # Some ops compute their first derivative by another formula when the graph is kept
    # (F.silu, mish, group_norm in PyTorch 2.14: 1e-16 apart in float64). Then a first-order
    # advance does not reproduce naive's step: a schedule's stored states differ from
    # naive's at rounding level, and an ill-conditioned unroll amplifies it (1e-8 relative
    # on EfficientNet-B2). Where the gradients differ, the advances keep each step's graph
    # until the step is done (exact_states), so the states are naive's. The gradients are
    # compared, not the states after the step: a 1-ulp difference in a gradient can vanish
    # in the update p - lr * g at one step and show at the next.
    params = {k: v.detach().requires_grad_(True) for k, v in state0.params.items()}
    buffers = {k: b.clone() for k, b in state0.buffers.items()}
    module = FunctionalModel(problem.model, {**consts.fixed, **params}, buffers, False)
    with step_context(problem, 0):
        loss = problem.loss_fn(module, problem.batch(0))
        wrt = list(params.values())
        plain = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        graph = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
    return all(
        (a is None) == (b is None) and (a is None or torch.equal(a, b.detach()))
        for a, b in zip(plain, graph)
    )
