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
