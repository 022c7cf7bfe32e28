"""Meta-train Finn et al.'s sine regressor with MAML, on one process or many.

    python examples/meta_train_sine.py --iterations 2000 --dir runs/sine
    torchrun --nproc-per-node 4 examples/meta_train_sine.py --iterations 2000 --dir runs/sine
    # interrupted? the same command with --resume continues exactly where it stopped

Every process runs this script; each adapts on its share of the meta-batch, one all-reduce
averages the meta-gradients, rank 0 writes runs/sine/log.csv and checkpoint.pt.
"""

import argparse

import torch

import effmaml
from effmaml.tasks import SineTasks, mlp, mse_loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--meta-batch", type=int, default=16)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--strategy", default="naive")
    ap.add_argument("--dir", default="runs/sine")
    ap.add_argument("--every", type=int, default=100, help="checkpoint every this many")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    rank, world = effmaml.distributed.init_from_env(a.device)
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = mlp().to(device)
    maml = effmaml.MAML(model, mse_loss, effmaml.SGD(0.01), a.strategy)
    tasks = SineTasks(a.meta_batch)

    def sample(g):  # CPU generator, tensors moved to this rank's device
        return [
            (tuple(t.to(device) for t in s), tuple(t.to(device) for t in q)) for s, q in tasks(g)
        ]

    trainer = effmaml.MetaTrainer(
        maml,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        sample,
        meta_batch=a.meta_batch,
        inner_steps=a.inner_steps,
        checkpoint_dir=a.dir,
        checkpoint_every=a.every,
        config={"outer_lr": 1e-3, "inner_lr": 0.01},
    )
    losses = trainer.train(a.iterations, resume=a.resume)
    if rank == 0 and losses:
        print(f"{world} process(es): meta-loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
