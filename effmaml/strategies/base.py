"""The strategy interface and the name -> strategy registry."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..costs import Prediction, Probe
from ..engine import Schedule
from ..memory import format_bytes
from ..notices import warn
from ..problem import NO_RECORDS, InnerProblem, Records, Runtime
from ..state import Consts, InnerState

__all__ = [
    "STRATEGIES",
    "Outcome",
    "Plan",
    "RunFacts",
    "SolveStats",
    "Strategy",
    "check_count",
    "fastest",
    "fits",
    "make_strategy",
    "multi_step_loss",
    "register_strategy",
    "warn_learned_hyper",
]


@dataclass
class SolveStats:
    """What ``implicit``'s conjugate-gradient solve did; filled in during backward.

    Attributes:
        lam: λ of the proximal inner problem.
        cg_steps: the most CG iterations allowed.
        hvp_batches_used: distinct batches in the training loss of the solve.
        hvp_batch_passes: forward/backward passes over a batch made by the solve so far.
        cg_residual: relative residual norm at the end (None before backward).
        cg_iterations: CG iterations run (None before backward).
    """

    lam: float
    cg_steps: int
    hvp_batches_used: int = 0
    hvp_batch_passes: int = 0
    cg_residual: float | None = None
    cg_iterations: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lam": self.lam,
            "cg_steps": self.cg_steps,
            "hvp_batch_passes": self.hvp_batch_passes,
            "hvp_batches_used": self.hvp_batches_used,
        }
        if self.cg_residual is not None:
            out.update(cg_residual=self.cg_residual, cg_iterations=self.cg_iterations)
        return out


@dataclass(frozen=True)
class RunFacts:
    """Facts about one ``adapt``: what ran and what the cost model predicted for it.

    What the run measures as it goes (evaluations, pinned host memory) is on the call's
    ``Runtime`` (``Adapted.step_evals``, ``Adapted.host_peak_bytes()``).

    Attributes:
        strategy: the strategy as run with its resolved options, e.g.
            ``"checkpoint(segment=5, pullback='segment')"``.
        options: the resolved options (``segment``, ``pullback``, ``slots`` ...).
        probe: what the probe measured (P, A, times; its own evaluations and seconds, 0 when
            cached), or None when none ran (``naive``, ``first_order``, ``implicit``).
        prediction: the cost model's prediction for this call, or None.
        schedule: the ``Schedule`` run, for engine-based strategies.
        chosen: what ``auto`` chose (its label), else ``""``.
        memory_budget: the budget ``auto``'s choice fits (bytes), else None.
        considered: every candidate ``auto`` weighed, with its prediction.
        solve: ``implicit``'s solve (``SolveStats``, completed in backward), else None.
        exact_states: whether the forward's advances kept each step's graph so that the
            stored states are bitwise naive's (Note [States bitwise naive's]); None where
            nothing advanced for a later pullback.
        outer: the outer tensors the steps read, one description each (shape, dtype, where
            first read; ``effmaml.outer``); empty under ``naive``, whose graph reaches
            them without being told.
        outer_bytes: their bytes: the gradient buffers the backward returns for them.
    """

    strategy: str
    options: Mapping[str, Any] = field(default_factory=dict)
    probe: Probe | None = None
    prediction: Prediction | None = None
    schedule: Schedule | None = None
    chosen: str = ""
    memory_budget: int | None = None
    considered: tuple[tuple[str, Prediction], ...] = ()
    solve: SolveStats | None = None
    exact_states: bool | None = None
    outer: tuple[str, ...] = ()
    outer_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The flat view ``Adapted.info`` shows."""
        out: dict[str, Any] = dict(self.options)
        if self.probe is not None:
            out.update(
                state_bytes=self.probe.state_bytes,
                step_graph_bytes=self.probe.step_graph_bytes,
                probe_evals=self.probe.evals,
                probe_seconds=self.probe.seconds,
            )
        if self.prediction is not None:
            out.update(
                step_evals_predicted=self.prediction.step_evals,
                predicted_peak_bytes=self.prediction.peak_bytes,
                predicted_host_bytes=self.prediction.host_bytes,
                predicted_seconds=self.prediction.seconds,
            )
        if self.schedule is not None:
            out["schedule"] = self.schedule
        if self.chosen:
            out.update(
                chosen=self.chosen,
                memory_budget=self.memory_budget,
                considered=list(self.considered),
            )
        if self.solve is not None:
            out.update(self.solve.as_dict())
        if self.exact_states is not None:
            out["exact_states"] = self.exact_states
        if self.outer:
            out.update(outer_tensors=len(self.outer), outer_bytes=self.outer_bytes)
        return out


@dataclass
class Outcome:
    """What a strategy returns: the final state, the inner losses and facts about the run.

    Attributes:
        state: φ_N, the optimizer state and buffers after N steps.
        losses: the N inner losses, differentiable under exact strategies.
        facts: what ran and what was predicted (``RunFacts``).
        queries: with a multi-step loss, the N query losses L_query(φ_{t+1}) (0 where the
            weight is 0); else empty.
        query_loss: with a multi-step loss, Σ_t w_t · L_query(φ_{t+1}), differentiable
            w.r.t. the initial parameters (the meta-objective); else None.
        records: what the execution recorded about its steps (the outer tensors they
            read, the witness of a recomputing run), which its backward uses.
    """

    state: InnerState
    losses: list[Tensor]
    facts: RunFacts
    queries: list[Tensor] = field(default_factory=list)
    query_loss: Tensor | None = None
    records: Records = NO_RECORDS


@dataclass(frozen=True)
class Plan:
    """One strategy's decision for one ``adapt``, made before any inner step runs (frozen).

    ``Strategy.plan(problem, probe)`` makes it; ``execute`` runs it. Everything a layer
    below reads is resolved here, once: the settings (``exact_states`` from the probe,
    ``auto``'s default budget, ``implicit``'s λ), the schedule and its store, the
    prediction and the label. ``MAML.estimate`` is ``plan`` without ``execute``.

    Attributes:
        strategy: the strategy that executes it (under ``auto``, the one chosen).
        problem: the problem with every setting resolved.
        label: the strategy as it will run, e.g. ``"checkpoint(segment=7, pullback='step')"``
            (``"auto -> ..."`` under ``auto``).
        options: the resolved options (``segment``, ``pullback``, ``slots`` ...).
        probe: what the probe measured, or None where none ran.
        prediction: the cost model's prediction, or None (no probe, or no memory model).
        schedule: the engine ``Schedule`` (recomputing strategies), else None.
        chosen: under ``auto``, the label of the plan it chose, else ``""``.
        memory_budget: under ``auto``, the budget the choice fits (bytes), else None.
        considered: under ``auto``, every candidate's plan under the budget (its default
            where none fits, over the budget), as ``(label, prediction)``.
    """

    strategy: Strategy
    problem: InnerProblem
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    probe: Probe | None = None
    prediction: Prediction | None = None
    schedule: Schedule | None = None
    chosen: str = ""
    memory_budget: int | None = None
    considered: tuple[tuple[str, Prediction], ...] = ()

    def execute(self, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        """Run the plan (``Strategy.execute``): the outcome, differentiable w.r.t.
        ``state0.params`` and ``consts`` under exact strategies."""
        return self.strategy.execute(self, rt, state0, consts)

    def facts(self, **run: Any) -> RunFacts:
        """``RunFacts`` from the plan and what the run found (``run``: ``solve``,
        ``exact_states``, ``outer``, ``outer_bytes``, or a ``strategy``/``options`` of a
        drawn window)."""
        planned: dict[str, Any] = {
            "strategy": self.label,
            "options": self.options,
            "probe": self.probe,
            "prediction": self.prediction,
            "schedule": self.schedule,
            "chosen": self.chosen,
            "memory_budget": self.memory_budget,
            "considered": self.considered,
        }
        return RunFacts(**{**planned, **run})


def fits(plan: Plan, budget: int | None, host: int | None = None) -> bool:
    """Whether ``plan``'s predicted peak fits ``budget`` and its pinned host memory ``host``
    (None: no limit; a plan without a prediction fits)."""
    p = plan.prediction
    if p is None:
        return True
    return (budget is None or p.peak_bytes <= budget) and (host is None or p.host_bytes <= host)


def fastest(plans: Sequence[Plan], budget: int | None, host: int | None = None) -> Plan | None:
    """The plan with the least predicted time among those that fit (``fits``); ties go to
    fewer step evaluations, then the smaller peak, then the earlier plan. None if none
    fits. The one rule of "the fastest that fits": a strategy's own options and ``auto``'s
    choice among strategies both use it."""
    keyed = [
        ((p.prediction.seconds, p.prediction.step_evals, p.prediction.peak_bytes, i), p)
        for i, p in enumerate(plans)
        if p.prediction is not None and fits(p, budget, host)
    ]
    return min(keyed, key=lambda kp: kp[0])[1] if keyed else None


def multi_step_loss(problem: InnerProblem, queries: list[Tensor]) -> Tensor | None:
    """Σ_t w_t · queries[t] for the problem's step weights (None without a multi-step loss)."""
    if not problem.step_weights:
        return None
    terms = [w * q for w, q in zip(problem.step_weights, queries) if w]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class Strategy:
    """How to differentiate through the inner loop: ``plan`` decides, before any inner step
    runs, and ``execute`` runs the plan. Subclasses implement ``execute`` (and ``plans``
    for a memory model).

    Attributes:
        name: registry name.
        exact: whether the meta-gradient equals naive's (up to float rounding).
        second_order: whether it needs the double backward of the inner step (every
            strategy but ``first_order``).
        streams: whether it runs each inner step once, in order, and reads each batch once
            (``naive``, ``first_order``): it takes one-pass sources (iterators, a
            ``DataLoader``), and calls ``adapt``'s callback in its own loop
            (``Runtime.watch``), stopping there when told. The others need N before they
            run: ``effmaml.watch`` finds it first.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    # whether it differentiates through an inner step's gradient (double backward)
    second_order: ClassVar[bool] = True
    streams: ClassVar[bool] = False

    def wants_probe(self, problem: InnerProblem) -> bool:
        """Whether ``plan`` needs the probe's measurements (P, A, t₁, t₂) for ``problem``:
        to hold a ``memory_budget`` against the prediction. Strategies that choose a
        schedule from them (``Scheduled``, ``auto``) always do."""
        return problem.settings.memory_budget is not None

    def plans(self, problem: InnerProblem, probe: Probe | None) -> list[Plan]:
        """Every plan this strategy would consider for ``problem``, the default first, each
        with its prediction (None without a probe). The default: one plan, without a
        memory model."""
        return [Plan(self, problem, self.name, self.options(), probe)]

    def plan(self, problem: InnerProblem, probe: Probe | None) -> Plan:
        """The plan ``adapt`` executes: the default of ``plans``, held against the memory
        budget (``Scheduled`` and ``auto`` choose the fastest that fits instead). Nothing
        runs but the cost model.

        Args:
            problem: the problem (its ``steps``, ``device`` and budgets matter).
            probe: what the probe measured on step 0, or None where ``wants_probe`` said
                none is needed.

        Returns:
            The plan.

        Raises:
            MemoryError: the predicted peak is over ``memory_budget`` (says by how much,
                and which strategies fit in less).
        """
        plan = self.plans(problem, probe)[0]
        budget = problem.settings.memory_budget
        if fits(plan, budget):
            return plan
        assert probe is not None and plan.prediction is not None and budget is not None
        raise MemoryError(
            f"strategy {self.name!r} ({plan.label}) is predicted to peak at "
            f"{format_bytes(plan.prediction.peak_bytes)} for N={problem.steps} steps, over "
            f"memory_budget={format_bytes(budget)} (state P={format_bytes(probe.state_bytes)},"
            f" one step's graph A={format_bytes(probe.step_graph_bytes)}); use "
            f"strategy='auto' (the fastest exact schedule that fits), 'checkpoint' or "
            f"'revolve', or raise the budget"
        )

    def plan_or_default(self, problem: InnerProblem, probe: Probe | None) -> Plan:
        """``plan``, or where nothing fits the budget the default plan, whose prediction
        says by how much it is over: what ``MAML.estimate`` and ``auto``'s ``considered``
        show for a strategy that ``adapt`` would refuse."""
        try:
            return self.plan(problem, probe)
        except MemoryError:
            return self.plans(problem, probe)[0]

    def execute(self, plan: Plan, rt: Runtime, state0: InnerState, consts: Consts) -> Outcome:
        """Run ``plan.problem.steps`` inner steps from ``state0`` as ``plan`` says.

        Args:
            plan: this strategy's plan (``plan.problem`` is the resolved problem).
            rt: the call's runtime (counts, the probe cache, the callback).
            state0: the initial state; ``state0.params`` are the model's own parameters.
            consts: non-adapted parameters, tensor hyper-parameters and θ₀.

        Returns:
            The outcome, differentiable w.r.t. ``state0.params`` and ``consts``.

        Raises:
            NotImplementedError: a subclass that does not implement it (one written for
                the earlier ``run(problem, rt, state0, consts)`` is told how to port it).
        """
        name = type(self).__name__
        old = " (it defines run(problem, rt, state0, consts), the protocol before Plan)"
        raise NotImplementedError(
            f"strategy {name} implements no execute(plan, rt, state0, consts)"
            f"{old if hasattr(self, 'run') else ''}: implement execute, reading the problem "
            f"from plan.problem and reporting with plan.facts(); see docs/extending.md"
        )

    def options(self) -> dict[str, Any]:
        """The strategy's options, for reports."""
        return {}

    @classmethod
    def auto_candidates(cls, device: torch.device) -> list[Strategy]:
        """The configurations of this strategy that ``auto`` weighs on ``device``.

        ``auto`` asks every registered exact strategy (in registration order, which breaks
        ties); the default is none. A candidate with a free option (``segment=None``,
        ``slots=None``) lets ``auto`` search that option under the budget.
        """
        return []

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add ``cls`` to ``STRATEGIES`` under ``cls.name``.

    The registry is the one list of strategies: ``MAML(strategy=name)`` builds from it,
    ``auto`` weighs ``Strategy.auto_candidates`` of each exact one, the bench labels
    its runs with it, and a test checks that the package front exports every class in it.

    Args:
        cls: a ``Strategy`` subclass with a unique ``name``.

    Returns:
        ``cls``.

    Raises:
        ValueError: no ``name``, or another class registered under it.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"a strategy named {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(strategy: str | Strategy, **options: Any) -> Strategy:
    """Build a strategy from its registry name and options (or pass an instance through).

    Args:
        strategy: a name in ``STRATEGIES`` or a ``Strategy`` (returned as is, and
            then ``options`` must be empty).
        **options: the strategy's constructor arguments.

    Returns:
        The strategy.

    Raises:
        ValueError: unknown name (lists the known ones).
        TypeError: an option the strategy does not take.
    """
    if isinstance(strategy, Strategy):
        if options:
            raise TypeError(
                f"strategy options {sorted(options)} given with a strategy instance; set them "
                f"on the instance, or pass strategy={strategy.name!r} by name"
            )
        return strategy
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(str(strategy), list(STRATEGIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown strategy {strategy!r}; {hint}known strategies: "
            f"{', '.join(sorted(STRATEGIES))}"
        )
    cls = STRATEGIES[strategy]
    try:
        return cls(**options)
    except TypeError as err:
        # an option the class's signature lacks, or a value its own check refused
        # (``window=2.5``): only the first is "does not take"
        try:
            inspect.signature(cls).bind(**options)
        except TypeError:
            raise TypeError(
                f"strategy {strategy!r} does not take options {sorted(options)}: {err}"
            ) from err
        raise TypeError(f"strategy {strategy!r}: {err}") from err


def check_count(name: str, value: Any, hint: str = "", allow_none: bool = True) -> None:
    """Validate an option that counts something (segment, slots, CG steps): an int >= 1.

    Raises:
        TypeError: not an int (bools refused).
        ValueError: below 1; ``hint`` says what to do instead.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind} (got {value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (got {value}){hint}")


def warn_learned_hyper(consts: Consts, strategy: str, why: str) -> None:
    """Warn that learned inner hyper-parameters get no meta-gradient under ``strategy``."""
    learned = [k for k, v in consts.hyper.items() if v.requires_grad]
    if learned:
        warn(
            f"strategy={strategy!r} gives no meta-gradient to the learned inner "
            f"hyper-parameters {learned}{why}; use an exact strategy ('naive', 'checkpoint') "
            f"to learn them"
        )
