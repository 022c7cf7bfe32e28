"""Run by tests/test_train.py: meta-train until a stop signal arrives (SIGTERM, SIGUSR1).

usage: python tests/dist/preempt.py CHECKPOINT_DIR
"""

import sys

import torch

from tests.dist.setup import make_mamlpp_trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = make_mamlpp_trainer(sys.argv[1])
    trainer.train(100_000)  # far more than it gets to: the signal ends it
    sys.exit(3)  # not reached when the signal is handled
