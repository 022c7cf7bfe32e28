"""The meta-training loop: sample tasks, adapt, average meta-gradients, step; resume exactly.

>>> trainer = MetaTrainer(maml, torch.optim.Adam(model.parameters(), 1e-3), sample_tasks,
...                       meta_batch=8, inner_steps=5, checkpoint_dir="runs/sine")
>>> trainer.train(3000, resume=True)   # continues from runs/sine/checkpoint.pt if present

Under ``torchrun`` (see ``effmaml.distributed``) every rank runs the same script: each
adapts on its share of the meta-batch, the meta-gradients are summed with one all-reduce,
and all ranks take the same outer step. Rank 0 alone writes the log and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import checkpoints
from .checkpoints import CHECKPOINT_NAME, PREVIOUS_NAME
from .curriculum import Curriculum
from .distributed import all_reduce_sum, rank_slice, world
from .maml import MAML
from .preemption import STOP_SIGNALS, Preemption
from .replay import forked_rng
from .runlog import LOG_COLUMNS, RunLog
from .sources import is_one_batch
from .tasks import task_seed

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_COLUMNS",
    "PREVIOUS_NAME",
    "MetaTrainer",
    "task_rng",
    "task_seed",
]


Task = tuple[Any, Any]


class MetaTrainer:
    """Outer loop of MAML: one outer step per meta-batch of tasks.

    Each iteration calls ``sample_tasks(generator)`` for ``meta_batch`` tasks
    ``(support, query)``; adapts on each support set with ``maml`` (any strategy), computes
    ``query_loss_fn(adapted, query)`` and backpropagates it; the meta-gradient is the mean
    over the meta-batch; ``outer_optimizer`` takes one step. Every trainable parameter gets
    a gradient tensor each iteration (zeros where no task reached it), in one process or
    many alike.

    Randomness inside a task (dropout, augmentation drawn from torch's RNG) comes from a
    stream seeded by ``(seed, iteration, task index)`` alone (``task_rng``), so the same
    run on 1 or P processes, or resumed from a checkpoint, draws the same numbers for every
    task whichever rank runs it; the global RNG outside the tasks is left as it was.

    Memory: one task's adapt + backward at a time (whatever the strategy keeps), plus the
    summed gradients. Compute: ``meta_batch / world_size`` adaptations per process.

    Args:
        maml: the ``effmaml.MAML`` to train (its model is the one updated).
        outer_optimizer: a ``torch.optim`` optimizer over the model's parameters.
        sample_tasks: ``sample_tasks(generator) -> [(support, query), ...]`` with exactly
            ``meta_batch`` tasks, drawing all its randomness from ``generator`` (a
            ``torch.Generator`` owned and checkpointed by the trainer). ``support`` is what
            ``maml.adapt`` takes: a sequence of batches, or one batch with ``inner_steps``.
        meta_batch: tasks per outer step.
        inner_steps: passed to ``adapt(support, steps=inner_steps)``; None when each
            support is a sequence of batches, one per step.
        seed: seeds the task generator.
        query_loss_fn: ``(adapted, query) -> scalar``; default ``maml.loss_fn``.
        checkpoint_dir: where ``checkpoint.pt`` and ``log.csv`` go; None: neither.
        checkpoint_every: also checkpoint every this many iterations (0: only at the end).
        progress: show a progress bar (rank 0).
        scheduler: a ``torch.optim.lr_scheduler`` on ``outer_optimizer`` (MAML++'s cosine
            annealing, "CA"), stepped after every outer step and saved in checkpoints.
        first_order_iterations: derivative-order annealing (MAML++'s "DA"): the first this
            many iterations adapt with ``first_order``, the rest with ``maml``'s own
            strategy; the log's ``order`` column says which ran. Learned inner rates get no
            meta-gradient in those iterations (first order has none for them; the warning
            saying so is silenced there). Default 0.
        step_weights: the multi-step loss (MAML++'s "MSL"): weights for every step, or a
            function ``iteration -> weights`` (e.g. ``lambda i: effmaml.msl_weights(N,
            i / anneal)``); each task's loss is then ``adapt(support, query=query,
            step_weights=w).query_loss``. Default None: the query loss after the last step.
        stop_signals: signals on which ``train`` finishes the current iteration,
            writes a checkpoint and exits (SIGTERM, SIGUSR1: what SLURM and cloud
            pre-emption send); ``()`` leaves the process's handlers alone.
        config: extra plain values that define the run (learning rates, data set ...);
            stored in the checkpoint and checked on resume.
        group: the process group (default: the default group when torch.distributed is
            initialised, else a single process).

    Raises:
        ValueError: ``meta_batch < 1``, fewer tasks than processes, ``checkpoint_every < 0``.
    """

    def __init__(
        self,
        maml: MAML,
        outer_optimizer: torch.optim.Optimizer,
        sample_tasks: Callable[[torch.Generator], Sequence[Task]],
        *,
        meta_batch: int,
        inner_steps: int | None = None,
        seed: int = 0,
        query_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        progress: bool = True,
        config: dict[str, Any] | None = None,
        group: dist.ProcessGroup | None = None,
        scheduler: Any = None,
        first_order_iterations: int = 0,
        step_weights: Sequence[float] | Callable[[int], Sequence[float]] | None = None,
        stop_signals: Sequence[int] = STOP_SIGNALS,
    ) -> None:
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            raise ValueError(f"meta_batch must be an int >= 1 (got {meta_batch!r})")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (got {checkpoint_every})")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir= to know where to write")
        if scheduler is not None and getattr(scheduler, "optimizer", None) is not outer_optimizer:
            raise ValueError("scheduler must schedule outer_optimizer (built on it)")
        if step_weights is not None and query_loss_fn is not None:
            raise ValueError(
                "step_weights evaluates the query with maml.loss_fn at every step; give "
                "query_loss_fn or step_weights, not both"
            )
        self.maml = maml
        self.model = maml.model
        self.optimizer = outer_optimizer
        self.sample_tasks = sample_tasks
        self.meta_batch = meta_batch
        self.inner_steps = inner_steps
        self.query_loss_fn = query_loss_fn or maml.loss_fn
        self.group = group
        self.rank, self.world_size = world(group)
        self.share = rank_slice(meta_batch, self.rank, self.world_size)
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log = RunLog(self.dir, writer=self.rank == 0)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.scheduler = scheduler
        self.curriculum = Curriculum(maml, first_order_iterations, step_weights)
        self.stop_signals = tuple(stop_signals)
        self.config = {
            "meta_batch": meta_batch,
            "inner_steps": inner_steps,
            "seed": seed,
            "strategy": repr(maml.strategy),
            "inner": repr(maml.inner),
            "world_size": self.world_size,
            "first_order_iterations": first_order_iterations,
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            **(config or {}),
        }
        # the outer parameters: the model's, and learned inner rates (LSLR), averaged over
        # the meta-batch and all-reduced alike, and checkpointed
        self._hyper = {k: v for k, v in maml.inner.hyperparameters().items() if v.requires_grad}
        self._params: list[Tensor] = [p for p in self.model.parameters() if p.requires_grad]
        self._params += list(self._hyper.values())
        self.preemption = Preemption(self.stop_signals, self._params[0].device, group)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> float:
        """One outer step; returns the meta-loss (mean query loss over the meta-batch)."""
        tasks = list(self.sample_tasks(self.generator))
        if len(tasks) != self.meta_batch:
            raise ValueError(
                f"sample_tasks returned {len(tasks)} tasks, expected meta_batch="
                f"{self.meta_batch}; make it return exactly meta_batch (support, query) pairs "
                f"(with an effmaml.EpisodeSampler, give it the same meta_batch as MetaTrainer)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        for h in self._hyper.values():
            h.grad = None
        p0 = self._params[0]
        loss_sum = torch.zeros((), dtype=p0.dtype, device=p0.device)
        maml = self.maml_at(self.iteration)
        weights = self.weights_at(self.iteration)
        with warnings.catch_warnings():
            if maml is not self.maml:  # derivative-order annealing: expected, said above
                warnings.filterwarnings("ignore", message="strategy='first_order' gives no")
            self._tasks(maml, weights, tasks, loss_sum)
        grads: list[Tensor] = []
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        stats = loss_sum.reshape(1)
        all_reduce_sum([*grads, stats], self.group)
        for g in grads:
            g.div_(self.meta_batch)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        return stats.item() / self.meta_batch

    def _tasks(
        self, maml: MAML, weights: list[float] | None, tasks: list[Task], loss_sum: Tensor
    ) -> None:
        """This rank's share of the meta-batch: adapt, query loss, backward (summed)."""
        device = self._params[0].device
        for i in self.share:
            support, query = tasks[i]
            if self.inner_steps is None and is_one_batch(support):
                raise TypeError(
                    f"task {i}'s support set is one batch ({type(support).__name__}) and "
                    f"MetaTrainer has no inner_steps: pass MetaTrainer(..., inner_steps=N) to "
                    f"take N inner steps on it, or make sample_tasks return a batch source "
                    f"(a list of N batches, one per step) as each task's support"
                )
            with task_rng(task_seed(self.seed, self.iteration, i), device):
                if weights is None:
                    adapted = maml.adapt(support, steps=self.inner_steps)
                    loss = self.query_loss_fn(adapted, query)
                else:
                    adapted = maml.adapt(
                        support, steps=self.inner_steps, query=query, step_weights=weights
                    )
                    assert adapted.query_loss is not None
                    loss = adapted.query_loss
                loss.backward()
            loss_sum += loss.detach().to(loss_sum.dtype)
            del adapted, loss

    def maml_at(self, iteration: int) -> MAML:
        """The front iteration ``iteration`` adapts with (``Curriculum``)."""
        return self.curriculum.maml_at(iteration)

    def weights_at(self, iteration: int) -> list[float] | None:
        """The multi-step loss's weights at ``iteration`` (``Curriculum``)."""
        return self.curriculum.weights_at(iteration)

    def train(self, iterations: int, resume: bool = False) -> list[float]:
        """Run outer steps until ``iterations`` have been done in total.

        Args:
            iterations: the total number of outer steps of the run (not of this call).
            resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists (the run
                then ends identical to one never interrupted); start afresh if not.

        Returns:
            The meta-losses of the iterations run by this call.
        """
        if resume:
            self.load_latest()
        self._sync_parameters()
        self.log.open(resume, self.iteration)
        losses: list[float] = []
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=iterations, initial=self.iteration, desc="meta-train", unit="it")
        try:
            with self.preemption.catching():
                while self.iteration < iterations:
                    t0 = time.perf_counter()
                    loss = self.step()
                    dt = time.perf_counter() - t0
                    losses.append(loss)
                    self._log(loss, dt)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(meta_loss=f"{loss:.4g}")
                    every = self.checkpoint_every
                    if self.preemption.stopping() and self.iteration < iterations:
                        self._preempted(iterations)
                    if every and self.iteration % every == 0 and self.iteration < iterations:
                        self.save()
        finally:
            if bar is not None:
                bar.close()
        if self.dir is not None:
            self.save()
        return losses

    def _sync_parameters(self) -> None:
        """Start every rank from rank 0's parameters (and learned inner rates)."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for p in [*self.model.parameters(), *self._hyper.values()]:
                dist.broadcast(p.data, src=0, group=self.group)

    # -- pre-emption -----------------------------------------------------------------------
    def _preempted(self, iterations: int) -> None:
        """Checkpoint, say so in the log, and leave the process (exit status 0)."""
        self.save()
        name = self.preemption.name()
        where = self.dir / CHECKPOINT_NAME if self.dir is not None else "nowhere (no dir)"
        line = (
            f"effmaml: {name} received; stopped after iteration {self.iteration} of "
            f"{iterations}, checkpoint written to {where}; resume with "
            f"train({iterations}, resume=True)"
        )
        if self.rank == 0:
            print(line, file=sys.stderr, flush=True)
        self.log.event(line)
        raise SystemExit(0)

    # -- log -------------------------------------------------------------------------------
    def _log(self, loss: float, seconds: float) -> None:
        first = self.maml_at(self.iteration - 1) is not self.maml
        self.log.write(
            {
                "iteration": self.iteration,
                "meta_loss": repr(loss),
                "seconds": f"{seconds:.4f}",
                "tasks_per_s": f"{self.meta_batch / seconds:.3f}",
                "order": "first" if first else "second",
                "outer_lr": repr(self.optimizer.param_groups[0]["lr"]),
            }
        )

    # -- checkpoints -----------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (this rank's RNG only; ``save`` gathers all)."""
        return {
            "format": checkpoints.FORMAT,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "inner": {k: v.detach().clone() for k, v in self._hyper.items()},
            "generator": self.generator.get_state(),
            "rng": [self._rng_state()],
            "config": self.config,
        }

    def save(self) -> Path | None:
        """Write ``checkpoint.pt`` atomically (rank 0): a temporary file, fsync, rename.

        A crash while writing leaves the previous checkpoint intact. Every rank must call
        it (the ranks' RNG states are gathered).
        """
        if self.dir is None:
            return None
        state = self.state_dict()
        if self.world_size > 1:
            rngs: list[Any] = [None] * self.world_size
            dist.all_gather_object(rngs, self._rng_state(), group=self.group)
            state["rng"] = rngs
        if self.rank != 0:
            return None
        return checkpoints.write(self.dir, state)

    def load_latest(self) -> bool:
        """Load the newest loadable checkpoint in ``checkpoint_dir``; return whether one was.

        Tries ``checkpoint.pt``, then ``checkpoint.prev.pt`` (the one before it) with a
        warning naming both when the newest is missing or cannot be read (truncated, not a
        checkpoint). Without either file, warns and starts from iteration 0.

        Raises:
            RuntimeError: checkpoint files exist but none can be loaded (says what to do).
            ValueError: a loadable checkpoint from another model or configuration.
        """
        if self.dir is None:
            raise ValueError("resume=True needs checkpoint_dir= to find the checkpoint")
        found = checkpoints.read_latest(self.dir, speak=self.rank == 0)
        if found is None:
            return False
        state, path = found
        self.load_state_dict(state, source=str(path))
        return True

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Restore a ``state_dict``, after checking it matches this model and run.

        Raises:
            ValueError: wrong format, parameter names/shapes that differ from the model's,
                a different run configuration, or a different number of processes.
        """
        if not isinstance(state, dict) or state.get("format") != checkpoints.FORMAT:
            raise ValueError(f"{source} is not an effmaml MetaTrainer checkpoint")
        checkpoints.check_model_state(self.model.state_dict(), state["model"], source)
        diff = {
            k: (state["config"].get(k), self.config.get(k))
            for k in sorted(set(state["config"]) | set(self.config))
            if state["config"].get(k) != self.config.get(k)
        }
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{source} was written by a run with another configuration ({lines}); resume "
                f"with the same settings, or start a new run in another checkpoint_dir"
            )
        self.model.load_state_dict(state["model"])
        inner = state.get("inner", {})
        if set(inner) != set(self._hyper):
            raise ValueError(
                f"{source} holds learned inner rates {sorted(inner)} but this run learns "
                f"{sorted(self._hyper)}; build the inner optimizer as the run that wrote it"
            )
        with torch.no_grad():
            for k, v in self._hyper.items():
                v.copy_(inner[k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration = int(state["iteration"])


@contextlib.contextmanager
def task_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global RNG (CPU, and ``device``'s if CUDA) seeded by
    ``seed``; restore it afterwards.
    """
    # Note [Task randomness belongs to the task]
    # Under torchrun each rank adapts its own share of the meta-batch. If tasks drew dropout
    # masks from the process's RNG, task 3 would draw from where rank 1's stream happens to
    # be, not from where it would be in one process: 2 processes vs 1 differed by 63% with
    # dropout 0.2. Seeding each task's stream from (seed, iteration, index) makes it a
    # property of the task. Recomputing strategies replay it exactly (they capture and
    # restore the RNG around each step).
    with forked_rng([device]):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
