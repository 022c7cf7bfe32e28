"""The front: ``MAML(model, loss_fn, inner, strategy=...).adapt(batches) -> Adapted``."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import perstep, watch
from .adapted import Adapted
from .costs import Prediction, Probe
from .inner import InnerOptimizer
from .memory import parse_bytes
from .probe import probe
from .problem import InnerProblem, LossFn, Runtime, Settings
from .sources import (
    OnePass,
    RepeatedBatch,
    as_source,
    check_buffers,
    warn_uncollected_batchnorm,
)
from .state import Consts, InnerState
from .step import check_loss_fn
from .strategies import Auto, Plan, Strategy, make_strategy
from .substitutes import needs_substitutes

__all__ = ["MAML", "RepeatedBatch"]

ParamSelector = Iterable[str] | Callable[[str], bool] | None


class MAML:
    """Model-agnostic meta-learning with a choice of how to differentiate the inner loop.

    Args:
        model: the module to meta-learn. It is never mutated by ``adapt``.
        loss_fn: ``loss_fn(m, batch) -> scalar tensor``: ``m`` is the model at the step's
            inner parameters (``effmaml.module.FunctionalModel``: ``m(x)``, ``m.embed(x)``,
            ``m.fc.weight`` ...), ``batch`` the step's batch. Reading the model itself
            (``model(x)``) instead of ``m`` is refused at the first step
            (``effmaml.outer.CapturedModelError``).
        inner: the differentiable inner optimizer (``effmaml.SGD``, ``effmaml.Adam``).
        strategy: a name in ``effmaml.STRATEGIES`` (``"naive"``, ``"first_order"``,
            ``"checkpoint"``, ...) or a ``Strategy`` instance. Default ``"naive"``.
        params: which parameters adapt: names, or a predicate on the name. Default: every
            parameter that requires grad. The others stay fixed in the inner loop and still
            receive meta-gradients (ANIL-style).
        clip_grad_grad_norm: in backward, rescale the gradient w.r.t. the parameters produced
            by each inner step (the last one included) to global norm ≤ this value. Default
            None (no clipping).
        update_running_stats: whether train-mode BatchNorm updates running statistics in the
            inner loop (batch statistics normalise either way). Default True.
        prox_lambda: λ of the proximal term (λ/2)‖φ − θ₀‖² added to every inner loss
            (iMAML's objective). Default 0.0.
        check_finite: raise as soon as an inner loss is not finite (costs one host sync per
            step on CUDA). Default True.
        memory_budget: the memory one meta-gradient (adapt + query backward) may use above
            what is in use when ``adapt`` starts: bytes, or a string like ``"6GiB"``. Device
            memory on CUDA, resident memory on a CPU. ``strategy="auto"`` picks the fastest
            exact schedule that fits; ``checkpoint``/``offload`` (``segment=None``) and
            ``revolve`` (``slots=None``) pick their option; a strategy that cannot fit
            raises ``MemoryError`` before unrolling. Predictions come from
            ``estimate``'s model.
        math_attention: run the inner steps' scaled-dot-product attention with PyTorch's math
            kernel, whose backward can be differentiated again (fused CUDA kernels' cannot;
            Note [Attention kernels and double backward]). Default None: on for every
            strategy that differentiates twice, off for ``first_order``.
        substitute_ops: run the inner steps' operations that have no double backward
            (``F.hardsigmoid``: MobileNetV3) as twice-differentiable stand-ins with the same
            values (``effmaml.substitutes``). Default None: on for every strategy that
            differentiates twice when the model holds a module that calls one
            (``nn.Hardsigmoid``), off otherwise.
        exact_states: make a recomputing strategy's first-order advances compute each
            step's gradient as a step with graph does, so that its stored states, adapted
            parameters, buffers and inner losses are bitwise naive's also on models whose
            ops compute their first derivative differently when the graph is kept (SiLU,
            Mish, GroupNorm); costs each advance the time of a step with graph. Default
            None: the probe compares step 0 computed both ways and turns it on only where
            they differ (Note [States bitwise naive's]); ``Adapted.info["exact_states"]``
            says what ran.
        host_memory_budget: the pinned host memory ``offload`` may hold (bytes or a string);
            ``offload`` over it raises ``MemoryError`` before unrolling, ``auto`` skips it.
            Default: half of what the OS reports available when ``adapt`` starts.
        **strategy_options: options of the named strategy (``segment=``, ``pullback=``).

    Raises:
        ValueError: unknown strategy, no parameter selected, bad per-parameter lr.
        TypeError: an option the strategy does not take; a ``loss_fn`` whose signature
            cannot take ``(m, batch)``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner: InnerOptimizer,
        strategy: str | Strategy = "naive",
        *,
        params: ParamSelector = None,
        clip_grad_grad_norm: float | None = None,
        update_running_stats: bool = True,
        prox_lambda: float = 0.0,
        check_finite: bool = True,
        memory_budget: int | float | str | None = None,
        host_memory_budget: int | float | str | None = None,
        math_attention: bool | None = None,
        substitute_ops: bool | None = None,
        exact_states: bool | None = None,
        **strategy_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        check_loss_fn(loss_fn)
        if not isinstance(inner, InnerOptimizer):
            raise TypeError(
                f"inner must be an effmaml inner optimizer such as effmaml.SGD(lr=0.01) "
                f"(got {type(inner).__name__}); torch.optim optimizers are not differentiable"
            )
        if not all(hasattr(inner, a) for a in ("lr", "per_step", "steps")):
            name = type(inner).__name__
            raise TypeError(
                f"inner optimizer {name} was not initialised as an InnerOptimizer: its "
                f"__init__ must call super().__init__(lr) (the base rate step() may scale "
                f"by, a float, tensor or per-parameter dict; 1.0 if the rule has none), "
                f"which sets lr, per_step and steps"
            )
        if clip_grad_grad_norm is not None and not clip_grad_grad_norm > 0:
            raise ValueError(f"clip_grad_grad_norm must be > 0 or None (got {clip_grad_grad_norm})")
        if prox_lambda < 0:
            raise ValueError(f"prox_lambda must be >= 0 (got {prox_lambda})")
        self.model = model
        self.loss_fn = loss_fn
        self.inner = inner
        self.strategy = make_strategy(strategy, **strategy_options)
        self._probes: dict[Hashable, Probe] = {}  # probe results by batch signature
        self._given = {"math_attention": math_attention, "substitute_ops": substitute_ops}
        self.settings = Settings(
            prox=float(prox_lambda),
            clip=clip_grad_grad_norm,
            update_running_stats=bool(update_running_stats),
            check_finite=bool(check_finite),
            memory_budget=None if memory_budget is None else parse_bytes(memory_budget),
            host_memory_budget=(
                None if host_memory_budget is None else parse_bytes(host_memory_budget)
            ),
            exact_states=None if exact_states is None else bool(exact_states),
            **self._ops(self.strategy),
        )
        self.adapted_names = self._select(params)
        inner.check_params({n: dict(model.named_parameters())[n] for n in self.adapted_names})

    def _ops(self, strategy: Strategy) -> dict[str, bool]:
        """The kernel and stand-in switches for ``strategy`` (given, or its defaults)."""
        attention, substitutes = self._given["math_attention"], self._given["substitute_ops"]
        second = strategy.second_order
        return {
            "math_attention": second if attention is None else bool(attention),
            "substitute_ops": (
                second and bool(needs_substitutes(self.model))
                if substitutes is None
                else bool(substitutes)
            ),
        }

    @property
    def memory_budget(self) -> int | None:
        """The resolved memory budget in bytes (``settings.memory_budget``), or None."""
        return self.settings.memory_budget

    @property
    def substitute_ops(self) -> bool:
        """Whether the inner steps run under the stand-ins (``settings.substitute_ops``)."""
        return self.settings.substitute_ops

    @property
    def math_attention(self) -> bool:
        """Whether attention runs the math kernel (``settings.math_attention``)."""
        return self.settings.math_attention

    def with_strategy(self, strategy: str | Strategy, **strategy_options: Any) -> MAML:
        """The same front (model, loss, inner optimizer, every setting) with another
        strategy, e.g. ``first_order`` for MAML++'s derivative-order annealing. Its own
        probe cache; the kernel and stand-in defaults follow the new strategy."""
        new = copy.copy(self)
        new.strategy = make_strategy(strategy, **strategy_options)
        new._probes = {}
        new.settings = dataclasses.replace(self.settings, **self._ops(new.strategy))
        return new

    def _select(self, params: ParamSelector) -> tuple[str, ...]:
        named = dict(self.model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        elif callable(params):
            names = [n for n in named if params(n)]
        else:
            if isinstance(params, str):
                params = [params]
            names = list(params)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(
                    f"params names {unknown} are not parameters of the model; known names "
                    f"start with {list(named)[:5]}"
                )
        if not names:
            raise ValueError(
                "no trainable parameters selected to adapt: the model has no parameter that "
                "requires grad, or `params=` matched none; check model.named_parameters()"
            )
        frozen = [n for n in names if not named[n].requires_grad]
        if frozen:
            raise ValueError(
                f"selected parameters {frozen} do not require grad; set requires_grad=True or "
                f"leave them out of `params=`"
            )
        bad = [n for n in names if not named[n].is_floating_point()]
        if bad:
            raise ValueError(f"parameters {bad} are not floating point and cannot adapt")
        return tuple(n for n in named if n in set(names))

    @property
    def device(self) -> torch.device:
        """The device of the model's first adapted parameter; batches are moved there."""
        return dict(self.model.named_parameters())[self.adapted_names[0]].device

    def adapt(
        self,
        batches: Sequence[Any] | Any,
        steps: int | None = None,
        *,
        query: Any = None,
        step_weights: Sequence[float] | Tensor | None = None,
        start: Adapted | None = None,
        callback: watch.Callback | None = None,
    ) -> Adapted:
        """Run the inner loop and return the adapted model.

        Args:
            batches: the batch source, one batch per inner step: anything with ``__len__``
                and ``__getitem__`` (a list, a ``torch.utils.data.Dataset`` whose item t is
                step t's batch, a lazy class that builds batch t on demand). Recomputing
                strategies index it again in backward and need the same batch for the same
                index; a source that breaks this is caught there
                (``effmaml.replay.NondeterministicBatchError``). One-pass sources
                (iterators, generators, a ``DataLoader``, ``IterableDataset``) are read as
                they come under ``naive`` and ``first_order`` (their length, or ``steps``,
                batches) and refused by the others (they cannot be indexed again). With
                ``steps``, a single batch reused at every step.
            steps: the number of inner steps when ``batches`` is a single batch. A tensor,
                tuple or dict is always one batch; a list (or other source) given with
                ``steps`` must hold exactly ``steps`` batches; from a one-pass source, the
                first ``steps`` are drawn.
            query: a query batch for the multi-step loss (MAML++'s "MSL"): the loss
                ``loss_fn(model at φ_{t+1}, query)`` after every inner step t, weighted by
                ``step_weights``, is ``Adapted.query_loss``. Recomputing strategies evaluate
                it as their pullbacks pass each state (Note [The multi-step loss under
                recomputation]): memory is the single-loss schedule's plus one query
                forward/backward per step whose graph is alive (k for
                ``pullback="segment"``, 1 for the others).
            step_weights: w_0..w_{N-1} (zeros skip steps); default with a query: the last
                step only, ``(0, ..., 0, 1)``. ``effmaml.msl_weights`` gives MAML++'s
                annealing from uniform to the last step.
            start: an adapted model of this front to continue from: its parameters,
                inner-optimizer state and buffers are the initial state, and step indices
                go on from where it stopped (Adam's bias correction, per-step rates and
                BatchNorm slices), so ``adapt(b2, start=adapt(b1))`` is ``adapt(b1 + b2)``:
                the same values, and a meta-gradient that flows back through both into
                the model (exact strategies). Not under ``implicit``. Default None: from
                the model.
            callback: ``callback(t, loss)``, called once per inner step in order with the
                step's index in this adapt and its inner loss (a detached 0-d tensor, before
                the step's update; ``loss.item()`` syncs a device): logging, or a stopping
                rule: returning True stops after step t, and the unroll is then exactly
                ``adapt`` over the first t + 1 batches, under every strategy.
                ``naive`` and ``first_order`` call it in their loop; the other strategies
                (whose schedule depends on N), and any with a multi-step loss (whose
                default weight is on the last step run), first find N in a first-order
                pass that calls it (``effmaml.watch``: up to N more first-order step
                evaluations), then adapt on that many batches (``step_weights``, if given,
                cut to them).

        Returns:
            The ``Adapted`` model; ``loss_fn(adapted, query).backward()`` puts the
            meta-gradient in ``.grad`` of the model's parameters.

        Raises:
            TypeError: a source that cannot be indexed by step under a strategy that
                re-reads it (says what to pass); a ``loss_fn`` that cannot take
                ``(m, batch)``; a ``start`` that is not an adapted model.
            ValueError: empty source, ``steps < 1``, a length that disagrees with
                ``steps``, ``step_weights`` without a query or of another length than N, or
                per-step rates or per-step BatchNorm for another number of steps; a
                ``start`` from another model or inner optimizer.
            effmaml.outer.CapturedModelError: ``loss_fn`` reads the model it captured
                instead of ``m`` (raised at the first step, before any other work).
            FloatingPointError: a non-finite inner loss (names the step).
            MemoryError: the strategy cannot meet ``memory_budget`` (raised before
                unrolling; says the smallest budget that would do).
        """
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(t, loss) (got {callback!r})")
        problem, state0, consts = self.problem(batches, steps, start=start)
        planned = _with_query(problem, query, step_weights)
        rt = self.runtime()
        if callback is not None and (query is not None or not self.strategy.streams):
            if isinstance(problem.batches, OnePass):  # only a streaming strategy takes one
                raise TypeError(
                    "a callback with a multi-step loss needs N before the unroll, found by a "
                    "first pass over the batches, which a one-pass source cannot give twice; "
                    "pass an indexable source (a list, a Dataset of per-step batches)"
                )
            # the planned problem's queries draw the RNG as the run's do before the stop
            n = watch.scan(planned, rt, state0, consts, callback)
            problem = watch.first(problem, n)
            planned = _with_query(problem, query, _first_weights(step_weights, n))
        else:
            rt.callback = callback
        problem = planned
        pr = probe(problem, rt, state0, consts) if self.strategy.wants_probe(problem) else None
        out = self.strategy.plan(problem, pr).execute(rt, state0, consts)
        return Adapted.from_outcome(
            self.model, out, consts.fixed, rt, self.strategy, problem.first_step
        )

    def measure(self, batch: Any, query: Any = None) -> Probe:
        """What the probe measures on ``batch``: P (one inner state's bytes), A (one step's
        second-order graph; with a multi-step loss's ``query``, the query's graph too), t₁
        and t₂ (``Probe``). Cached: a later ``adapt`` or ``estimate``
        with batches like it does not probe again (the result is returned with ``evals=0``
        and ``seconds=0`` then, as such a call would see it)."""
        problem, state0, consts = self.problem(batch, 1, check_steps=False)  # probes step 0
        problem = _with_query(problem, query, None)
        pr = probe(problem, self.runtime(), state0, consts)
        return dataclasses.replace(pr, evals=0, seconds=0.0)

    def estimate(
        self,
        batch: Any,
        steps: int,
        strategy: str | Strategy | None = None,
        *,
        memory_budget: int | float | str | None = None,
        host_memory_budget: int | float | str | None = None,
        query: Any = None,
        step_weights: Sequence[float] | Tensor | None = None,
        **options: Any,
    ) -> dict[str, Prediction]:
        """Predict peak memory, step evaluations and seconds, from the probe alone.

        The probe (``effmaml.probe.probe``) runs on ``batch``: P (the state's bytes), A
        (the bytes autograd saves for a second-order step), t₁ and t₂ (a first-order step;
        a step with graph and its pullback); each strategy's formulas
        (``effmaml.costs``) turn them into a prediction. Nothing else runs; the model is
        not changed. The probe's result is cached here, so a following ``adapt`` with
        batches like ``batch`` does not probe again: the predictions are for that ``adapt``
        (without the probe's evaluations and time).

        Args:
            batch: one batch like those ``adapt`` will get.
            steps: N.
            strategy: a name or instance to predict for alone (with ``options``); default:
                every candidate ``auto`` weighs, read from the registry
                (``Strategy.auto_candidates`` of each exact strategy on this device).
            memory_budget, host_memory_budget: predict under budgets other than this
                front's (what ``auto`` would choose under 3 GiB: ``estimate(batch, n,
                "auto", memory_budget="3GiB")``).
            query, step_weights: predict an ``adapt`` with the multi-step loss.
            **options: the strategy's options (``segment=``, ``slots=``).

        Returns:
            label -> ``Prediction`` (labels like
            ``"checkpoint(segment=7, pullback='step')"``): each strategy's ``plan``
            (``adapt`` executes the same plan); one over the budget is predicted all the
            same (its default plan: ``adapt`` is what refuses it).
        """
        problem, state0, consts = self.problem(batch, steps)
        problem = _with_query(problem, query, step_weights)
        budgets = {"memory_budget": memory_budget, "host_memory_budget": host_memory_budget}
        given = {k: parse_bytes(v) for k, v in budgets.items() if v is not None}
        if given:
            problem = problem.with_settings(**given)
        # as a following adapt with batches like it sees the probe: cached, at no cost
        pr = dataclasses.replace(
            probe(problem, self.runtime(), state0, consts), evals=0, seconds=0.0
        )
        if strategy is not None:
            # over the budget, predicted all the same: adapt is what refuses to run it
            p = make_strategy(strategy, **options).plan_or_default(problem, pr)
            return {p.label: _predicted(p)}
        if options:
            raise TypeError(
                f"estimate got strategy options {sorted(options)} without a strategy; name "
                f"the strategy they belong to, e.g. estimate(batch, n, 'revolve', slots=4)"
            )
        plans = [st.plan_or_default(problem, pr) for st in Auto.candidates(problem)]
        return {p.label: _predicted(p) for p in plans}

    def problem(
        self,
        batches: Sequence[Any] | Any,
        steps: int | None = None,
        check_steps: bool = True,
        start: Adapted | None = None,
    ) -> tuple[InnerProblem, InnerState, Consts]:
        """The inner problem ``adapt`` would run, its initial state and constants.

        For tools built on the engine (``estimate``); arguments as for
        ``adapt``. ``check_steps=False``: do not hold the number of steps against
        per-step rates (the probe's one-step problem).
        """
        seq = as_source(batches, steps, one_pass=self.strategy.streams)
        first = 0 if start is None else self._check_start(start)
        if check_steps:
            if first:
                self._check_continued(first + len(seq))
            else:
                self.inner.check_steps(len(seq))
            perstep.check_steps(self.model, first + len(seq))
        problem = InnerProblem(
            model=self.model,
            loss_fn=self.loss_fn,
            inner=self.inner,
            batches=seq,
            device=self.device,
            settings=self.settings,
            first_step=first,
        )
        named: dict[str, Tensor] = dict(self.model.named_parameters())
        theta = {n: named[n] for n in self.adapted_names}
        fixed = {n: p for n, p in named.items() if n not in theta}
        check_buffers(self.model)
        if start is not None:  # the adapted model's state, its graph included
            state0 = InnerState(dict(start.params), dict(start.inner_state), dict(start.buffers))
        else:
            warn_uncollected_batchnorm(self.model)
            with torch.no_grad():  # the initial optimizer state: no graph
                opt0 = self.inner.init_state(theta)
                buffers0 = {n: b.detach().clone() for n, b in self.model.named_buffers()}
            state0 = InnerState(dict(theta), opt0, buffers0)
        consts = Consts(
            fixed, self.inner.hyperparameters(), dict(theta) if self.settings.prox else {}
        )
        return problem, state0, consts

    def _check_start(self, start: Adapted) -> int:
        """Where an adapt continued from ``start`` begins; raise if it cannot continue it."""
        if not isinstance(start, Adapted):
            raise TypeError(
                f"start= takes an adapted model that maml.adapt returned (got "
                f"{type(start).__name__})"
            )
        if start._fm.model is not self.model or set(start.params) != set(self.adapted_names):
            raise ValueError(
                "start= must be adapted from this front's model with the same adapted "
                "parameters (maml.adapt(b2, start=maml.adapt(b1)))"
            )
        with torch.no_grad():
            want = set(self.inner.init({n: start.params[n] for n in self.adapted_names}))
        if set(start.inner_state) != want:
            held = sorted(start.inner_state)[:3]
            raise ValueError(
                f"start= holds the state of another inner optimizer ({held}...); continue "
                f"with the inner optimizer it was adapted with, {self.inner!r} expects "
                f"{sorted(want)[:3]}..."
            )
        return start.end_step

    def _check_continued(self, total: int) -> None:
        """Raise if per-step rates have fewer than ``total`` steps (a continued adapt)."""
        if self.inner.steps is not None and total > self.inner.steps:
            raise ValueError(
                f"the per-step learning rates have {self.inner.steps} steps but the inner "
                f"loop continued from start= would run to step {total}: each step has its own "
                f"rate; continue for at most {self.inner.steps} steps in all"
            )

    def runtime(self) -> Runtime:
        """A fresh runtime for one call, sharing this front's probe cache; it refuses the
        model's adapted parameters read by ``loss_fn`` outside ``m`` (Note [The captured
        model])."""
        named = dict(self.model.named_parameters())
        captured = {id(named[n]): ("parameter", n) for n in self.adapted_names}
        return Runtime(probes=self._probes, captured=captured)

    def __repr__(self) -> str:
        return (
            f"MAML({type(self.model).__name__}, inner={self.inner!r}, "
            f"strategy={self.strategy!r}, adapted={len(self.adapted_names)} params)"
        )


def _first_weights(
    weights: Sequence[float] | Tensor | None, n: int
) -> Sequence[float] | Tensor | None:
    """The multi-step loss's weights of the first ``n`` steps (a callback stopped there)."""
    if weights is None:
        return None
    w = weights.tolist() if isinstance(weights, Tensor) else list(weights)
    if len(w) > n and not any(w[:n]):
        raise ValueError(
            f"the callback stopped the inner loop after step {n - 1}, and step_weights gives "
            f"the query losses of the steps run weight 0 (the multi-step loss would be "
            f"empty); leave step_weights out (the last step run then weighs 1), or weigh "
            f"earlier steps too"
        )
    return w[:n]


def _with_query(
    problem: InnerProblem, query: Any, weights: Sequence[float] | Tensor | None
) -> InnerProblem:
    """The problem with a multi-step loss, after checking its weights."""
    if query is None:
        if weights is not None:
            raise ValueError(
                "step_weights given without a query batch: pass adapt(..., query=batch, "
                "step_weights=w) for the multi-step loss"
            )
        return problem
    n = problem.steps
    if weights is None:
        w = (0.0,) * (n - 1) + (1.0,)
    else:
        if isinstance(weights, Tensor):
            if weights.requires_grad:
                raise ValueError("step_weights are constants; pass them detached")
            weights = weights.tolist()
        w = tuple(float(x) for x in weights)
        if len(w) != n:
            raise ValueError(
                f"step_weights has {len(w)} entries but adapt runs {n} inner steps; give one "
                f"weight per step (w[t] weighs the query loss after step t, w[N-1] the final "
                f"one), e.g. effmaml.msl_weights({n}, progress)"
            )
        if not all(math.isfinite(x) for x in w) or not any(w):
            raise ValueError(f"step_weights must be finite and not all zero (got {list(w)})")
    return dataclasses.replace(problem, query=query, step_weights=w)


def _predicted(plan: Plan) -> Prediction:
    if plan.prediction is None:
        raise NotImplementedError(
            f"strategy {plan.label} has no memory model: its plans() make no prediction"
        )
    return plan.prediction
