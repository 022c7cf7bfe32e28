"""Run by tests/test_train.py under torchrun: meta-train a few steps, save rank 0's params.

usage: python -m torch.distributed.run --nproc-per-node P tests/dist/worker.py OUT META_BATCH DROPOUT [RECIPE]

RECIPE ``mamlpp``: the MAML++ recipe of tests/dist/setup.py (learned per-step rates, the
multi-step loss, derivative-order annealing, cosine annealing; meta-batch 4, dropout 0.1),
whose learned rates are saved beside the parameters.
"""

import os
import sys

import torch

import effmaml
from effmaml.distributed import init_from_env
from tests.dist.setup import make_mamlpp_trainer, make_trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, meta_batch, dropout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    recipe = sys.argv[4] if len(sys.argv) > 4 else ""
    rank, world_size = init_from_env("cpu")
    torch.manual_seed(1000 + rank)  # each process's own RNG differs, as in a real launch
    trainer = make_mamlpp_trainer() if recipe == "mamlpp" else make_trainer(meta_batch, dropout=dropout)
    losses = trainer.train(3)
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    params.update({f"lr.{k}": v.detach().clone() for k, v in trainer.maml.inner.hyperparameters().items()})
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, params)
    if rank == 0:
        torch.save({"params": params, "losses": losses, "all": gathered}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    assert effmaml.distributed.world() == (0, 1)
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an
    # active exception"); everything is written, so leave without it
    sys.stdout.flush()
    os._exit(0)
