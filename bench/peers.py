"""The peer libraries effmaml is compared with, one adapter each.

An adapter runs one task's second-order MAML the peer's documented way, plain SGD in the
inner loop: N steps on ``batches`` (batch t at step t), then ``loss_fn`` on the query, whose
``backward()`` accumulates the meta-gradient in the model's ``.grad``. The sweep
(``bench.workload``) and fewshot-speed (``bench.fewshot_speed.libraries``) both call these,
so a peer runs the same code in every comparison. Each is imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PEER_STATUS", "Higher", "TorchOpt", "torch_maml"]

LossFn = Callable[[Any, Any], Tensor]


class Higher:
    """higher's ``innerloop_ctx`` over ``torch.optim.SGD``, second order
    (``track_higher_grads``), the model's own parameters as θ (``copy_initial_weights=False``).

    Args:
        model: the model (its ``.grad`` receives the meta-gradient).
        lr: the inner learning rate.
    """

    def __init__(self, model: nn.Module, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)

    def __call__(self, loss_fn: LossFn, batches: Sequence[Any], query: Any) -> None:
        import higher

        with higher.innerloop_ctx(
            self.model, self.opt, copy_initial_weights=False, track_higher_grads=True
        ) as (fmodel, diffopt):
            for t in range(len(batches)):
                diffopt.step(loss_fn(fmodel, batches[t]))
            loss_fn(fmodel, query).backward()


class TorchOpt:
    """TorchOpt's MAML: ``torchopt.MetaSGD`` steps the module's parameters in place,
    differentiably; the state is saved before and restored after (its documented pattern).

    BatchNorm's running statistics are restored by value as well: the module's forward
    updates them in place, and ``recover_state_dict`` puts back references to the same,
    updated, tensors. Without it the model would leave a meta-gradient changed, which no
    other library's leaves it (a copy of the buffers per task).

    Args:
        model: the model (its ``.grad`` receives the meta-gradient).
        lr: the inner learning rate.
    """

    def __init__(self, model: nn.Module, lr: float) -> None:
        import torchopt

        self.model = model
        self.inner = torchopt.MetaSGD(model, lr=lr)

    def __call__(self, loss_fn: LossFn, batches: Sequence[Any], query: Any) -> None:
        import torchopt

        model = self.model
        buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        state = torchopt.extract_state_dict(model, by="reference")
        for t in range(len(batches)):
            self.inner.step(loss_fn(model, batches[t]))
        loss_fn(model, query).backward()
        torchopt.recover_state_dict(model, state)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])


def torch_maml(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    batches: Sequence[Any],
    query: Any,
    checkpoint_steps: int | None = None,
    max_grad_grad_norm: float | None = None,
) -> int:
    """torch_maml's ``NaiveMAML``, or with ``checkpoint_steps`` its
    ``GradientCheckpointMAML`` (which takes ``max_grad_grad_norm``); returns the inner-loss
    evaluations it made (its recomputation included)."""
    import torch_maml as tm

    evals = [0]

    def counted(m: Any, batch: Any) -> Tensor:
        evals[0] += 1
        return loss_fn(m, batch)

    opt = tm.IngraphGradientDescent(learning_rate=lr)
    kwargs = {}
    if checkpoint_steps is not None:
        maml = tm.GradientCheckpointMAML(
            model, counted, optimizer=opt, checkpoint_steps=checkpoint_steps
        )
        if max_grad_grad_norm is not None:
            kwargs["max_grad_grad_norm"] = max_grad_grad_norm
    else:
        maml = tm.NaiveMAML(model, counted, optimizer=opt)
    updated, _, _ = maml(list(batches), **kwargs)
    loss_fn(updated, query).backward()
    return evals[0]


# Every peer the bench knows, and what became of it here (the summaries print the line of
# each peer a preset ran, and learn2learn's, which none can run).
PEER_STATUS = {
    "torch_maml": "torch_maml 1.0 (NaiveMAML, GradientCheckpointMAML)",
    "higher": "higher 0.2.1 (innerloop_ctx, second order)",
    "torchopt": (
        "TorchOpt 0.7.3 (MetaSGD; its C++ extension does not load against torch 2.14, "
        "`undefined symbol` at torchopt._C, and its pure-Python path runs)"
    ),
    "learn2learn": (
        "learn2learn 0.2.0: not run, it does not install on Python >= 3.11 (its sdist "
        "ships generated C files that include longintrepr.h, which CPython 3.11 moved: "
        "`fatal error: longintrepr.h: No such file or directory`)"
    ),
}
