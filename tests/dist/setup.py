"""The run shared by the distributed test and its single-process reference."""

import torch
from torch import nn

import effmaml
from effmaml.tasks import SineTasks, mlp, mse_loss


def make_trainer(meta_batch, strategy="checkpoint", dropout=0.0, **kw):
    torch.manual_seed(0)
    model = mlp(width=16, dtype=torch.float64)
    if dropout:  # randomness inside every task: its stream must not depend on the rank
        model = nn.Sequential(*list(model)[:2], nn.Dropout(dropout), *list(model)[2:])
    maml = effmaml.MAML(model, mse_loss, effmaml.SGD(0.01), strategy)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tasks = SineTasks(meta_batch, dtype=torch.float64)
    return effmaml.MetaTrainer(
        maml, opt, tasks, meta_batch=meta_batch, inner_steps=3, seed=1, progress=False, **kw
    )


def make_mamlpp_trainer(checkpoint_dir=None, steps=3, **kw):
    """The MAML++ recipe on sine: per-step learned rates, the multi-step loss annealed,
    derivative-order annealing for 2 iterations, cosine annealing of the outer rate."""
    torch.manual_seed(0)
    model = mlp(width=16, dtype=torch.float64)
    model = nn.Sequential(*list(model)[:2], nn.Dropout(0.1), *list(model)[2:])
    lr = {n: torch.full((steps,), 0.01, dtype=torch.float64, requires_grad=True)
          for n, _ in model.named_parameters()}  # fmt: skip
    maml = effmaml.MAML(model, mse_loss, effmaml.SGD(lr, per_step=True), "checkpoint")
    opt = torch.optim.Adam([*model.parameters(), *lr.values()], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    return effmaml.MetaTrainer(
        maml,
        opt,
        SineTasks(4, dtype=torch.float64),
        meta_batch=4,
        inner_steps=steps,
        seed=1,
        progress=False,
        checkpoint_dir=checkpoint_dir,
        scheduler=sched,
        first_order_iterations=2,
        step_weights=lambda i: effmaml.msl_weights(steps, i / 4),
        **kw,
    )
