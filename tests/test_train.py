"""MetaTrainer: exact resume, atomic checkpoints, clear errors, and 2 gloo processes == 1."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import effmaml
from effmaml.tasks import SineTasks, mlp, mse_loss

from .dist.setup import make_mamlpp_trainer, make_trainer


def _trainer(tmp_path, strategy="naive", dropout=False, meta_batch=3, **kw):
    torch.manual_seed(0)
    model = mlp(width=16, dtype=torch.float64)
    if dropout:
        model = nn.Sequential(*list(model)[:2], nn.Dropout(0.2), *list(model)[2:])
    maml = effmaml.MAML(model, mse_loss, effmaml.SGD(0.01, momentum=0.5), strategy)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tasks = SineTasks(meta_batch, dtype=torch.float64)
    return effmaml.MetaTrainer(
        maml,
        opt,
        tasks,
        meta_batch=meta_batch,
        inner_steps=3,
        seed=5,
        checkpoint_dir=tmp_path,
        progress=False,
        **kw,
    )


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


@pytest.mark.parametrize("strategy", ["naive", "checkpoint"])
def test_resume_is_bitwise_identical(tmp_path, strategy):
    full = _trainer(tmp_path / "full", strategy, dropout=True)
    losses = full.train(6)
    # stop after 2 (checkpoint every 2, the process "dies" after iteration 3), resume
    part = _trainer(tmp_path / "part", strategy, dropout=True, checkpoint_every=2)
    part.train(3)
    # what the dead process did after its last checkpoint (iteration 3) is lost
    torch.manual_seed(999)  # the new process's global RNG differs
    resumed = _trainer(tmp_path / "part", strategy, dropout=True, checkpoint_every=2)
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 3  # the final save of the first call
    resumed.train(6, resume=True)
    for k, v in _params(full).items():
        assert torch.equal(v, _params(resumed)[k]), k
    with open(tmp_path / "part" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["meta_loss"]) for r in rows] == losses


def test_resume_drops_log_rows_after_the_checkpoint(tmp_path):
    t = _trainer(tmp_path, checkpoint_every=2)
    t.train(2)
    # a crash after logging iteration 3 but before checkpointing it
    t.step()
    t._log(1.0, 1.0)
    t2 = _trainer(tmp_path, checkpoint_every=2)
    t2.train(4, resume=True)
    with open(tmp_path / "log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_crash_while_writing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    t = _trainer(tmp_path)
    t.train(2)
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)

    def dying_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    t.step()
    with pytest.raises(OSError, match="disk full"):
        t.save()
    monkeypatch.undo()
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert again["iteration"] == good["iteration"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    t = _trainer(tmp_path / "new")
    with pytest.warns(UserWarning, match="starting from iteration 0"):
        t.train(1, resume=True)
    assert t.iteration == 1


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    _trainer(tmp_path).train(1)
    torch.manual_seed(0)
    other = effmaml.MAML(mlp(width=8, dtype=torch.float64), mse_loss, effmaml.SGD(0.01))
    t = effmaml.MetaTrainer(
        other,
        torch.optim.Adam(other.model.parameters()),
        SineTasks(3, dtype=torch.float64),
        meta_batch=3,
        inner_steps=3,
        seed=5,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"does not match the model .*shapes differ"):
        t.train(2, resume=True)
    t = _trainer(tmp_path, meta_batch=4)
    with pytest.raises(ValueError, match=r"another configuration \(meta_batch: checkpoint 3"):
        t.train(2, resume=True)


def test_bad_arguments():
    model = mlp(dtype=torch.float64)
    maml = effmaml.MAML(model, mse_loss, effmaml.SGD(0.01))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="meta_batch"):
        effmaml.MetaTrainer(maml, opt, SineTasks(2), meta_batch=0)
    t = effmaml.MetaTrainer(
        maml, opt, SineTasks(2, dtype=torch.float64), meta_batch=3, inner_steps=2, progress=False
    )
    with pytest.raises(ValueError, match="returned 2 tasks, expected meta_batch=3"):
        t.step()
    with pytest.raises(ValueError, match="smaller than the world size"):
        effmaml.distributed.rank_slice(1, 0, 2)


def test_rank_slices_cover_the_meta_batch():
    for n in range(2, 12):
        for w in range(1, min(n, 5) + 1):
            got = [i for r in range(w) for i in effmaml.distributed.rank_slice(n, r, w)]
            assert got == list(range(n))


def _torchrun(tmp_path, meta_batch, dropout=0.0):
    out = tmp_path / f"dist-{meta_batch}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", "tests/dist/worker.py", str(out), str(meta_batch), str(dropout)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize(
    "meta_batch,dropout",
    [(4, 0.0), (5, 0.2)],  # 5: an uneven split, 3 + 2 tasks; dropout: per-task RNG
)
def test_two_gloo_processes_equal_one(tmp_path, meta_batch, dropout):
    _assert_same_as_one_process(_torchrun(tmp_path, meta_batch, dropout), meta_batch, dropout)


def _assert_same_as_one_process(dist, meta_batch, dropout, recipe=""):
    torch.manual_seed(77)  # this process's RNG is not the workers': it must not matter
    single = make_mamlpp_trainer() if recipe else make_trainer(meta_batch, dropout=dropout)
    losses = single.train(3)
    ref = _params(single)
    rates = single.maml.inner.hyperparameters()
    ref.update({f"lr.{k}": v.detach() for k, v in rates.items()})
    assert set(ref) == set(dist["params"])
    if recipe:  # the learned rates moved, and moved alike on every rank
        assert rates and all(not torch.equal(v, torch.full_like(v, 0.01)) for v in rates.values())
    scale = max(v.abs().max().item() for v in ref.values())
    for k, v in ref.items():
        # the same sums in another order: float64 rounding only
        torch.testing.assert_close(dist["params"][k], v, rtol=1e-12, atol=1e-12 * scale)
        # every rank holds the same parameters
        assert torch.equal(dist["all"][0][k], dist["all"][1][k])
    torch.testing.assert_close(
        torch.tensor(dist["losses"]), torch.tensor(losses), rtol=1e-12, atol=0
    )


def test_example_script_runs_and_resumes(tmp_path):
    sys.path.insert(0, os.getcwd())
    from examples.meta_train_sine import main

    args = ["--iterations", "3", "--meta-batch", "2", "--inner-steps", "2", "--every", "2"]
    args += ["--dir", str(tmp_path), "--device", "cpu"]
    first = main(args)
    assert len(first) == 3
    more = main([*args[:1], "5", *args[2:], "--resume"])
    assert len(more) == 2  # iterations 4 and 5 only


def test_task_randomness_depends_on_the_task_not_the_process(tmp_path):
    """Each task's dropout stream is a function of (seed, iteration, task index)."""
    a = _trainer(tmp_path / "a", dropout=True)
    torch.manual_seed(1)
    a.train(2)
    b = _trainer(tmp_path / "b", dropout=True)
    torch.manual_seed(2)  # another global RNG state: the same run
    b.train(2)
    for k, v in _params(a).items():
        assert torch.equal(v, _params(b)[k]), k
    before = torch.get_rng_state()
    b.step()
    assert torch.equal(torch.get_rng_state(), before)  # tasks leave the global RNG alone
    assert len({effmaml.train.task_seed(1, i, j) for i in range(20) for j in range(20)}) == 400


def test_task_seed_is_a_pinned_value():
    """The seed is a function of (seed, iteration, index) alone, through blake2b: not
    Python's hash() (which PYTHONHASHSEED changes per process), so every process, platform
    and release computes these same values, and a checkpoint resumes the same tasks."""
    got = [effmaml.train.task_seed(1, i, 3) for i in range(4)]
    assert got == [
        5711507424065775809,
        1003711594343537202,
        8384462955522581546,
        776542139620741855,
    ]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    full = _trainer(tmp_path / "full", dropout=True)
    full.train(5)
    part = _trainer(tmp_path / "part", dropout=True, checkpoint_every=1)
    part.train(3)  # checkpoint.pt at 3, checkpoint.prev.pt at 2
    ckpt = tmp_path / "part" / "checkpoint.pt"
    prev = tmp_path / "part" / "checkpoint.prev.pt"
    assert torch.load(prev, weights_only=True)["iteration"] == 2
    _truncate(ckpt)
    resumed = _trainer(tmp_path / "part", dropout=True, checkpoint_every=1)
    with pytest.warns(UserWarning, match=r"could not load .*checkpoint\.pt.*checkpoint\.prev\.pt"):
        resumed.train(5, resume=True)
    for k, v in _params(full).items():
        assert torch.equal(v, _params(resumed)[k]), k


def test_crash_between_the_renames_resumes_from_the_previous(tmp_path):
    t = _trainer(tmp_path, checkpoint_every=1)
    t.train(2)
    (tmp_path / "checkpoint.pt").unlink()  # what a crash between the two renames leaves
    again = _trainer(tmp_path, checkpoint_every=1)
    with pytest.warns(UserWarning, match="previous checkpoint"):
        again.train(3, resume=True)
    assert again.iteration == 3


def test_no_loadable_checkpoint_is_a_clear_error(tmp_path):
    t = _trainer(tmp_path, checkpoint_every=1)
    t.train(2)
    _truncate(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* can be loaded.*resume=False"):
        _trainer(tmp_path).train(3, resume=True)


# -- the MAML++ recipe in the outer loop --------------------------------------------------------
def _state(trainer):
    out = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    out.update({f"lr.{k}": v.detach().clone() for k, v in trainer._hyper.items()})
    return out


def test_mamlpp_recipe_resumes_bitwise(tmp_path):
    """Per-step learned rates, the annealed multi-step loss, derivative-order annealing and
    cosine annealing, interrupted after 3 of 6 iterations and resumed: identical to a run
    never interrupted; the log says which order ran and the outer rate."""
    full = make_mamlpp_trainer(tmp_path / "full")
    full.train(6)
    part = make_mamlpp_trainer(tmp_path / "part")
    part.train(3)
    again = make_mamlpp_trainer(tmp_path / "part")
    again.train(6, resume=True)
    ref, got = _state(full), _state(again)
    assert ref.keys() == got.keys() and any(k.startswith("lr.") for k in ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert again.scheduler.state_dict() == full.scheduler.state_dict()
    with open(tmp_path / "part" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["order"] for r in rows] == ["first", "first", "second", "second", "second", "second"]
    lrs = [float(r["outer_lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-2  # cosine: falling every step


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_and_resumes_bitwise(tmp_path, sig):
    """A real signal to a training process (what SLURM and cloud pre-emption send): it
    finishes its iteration, writes a checkpoint, logs a line and exits 0; resuming then
    gives what an uninterrupted run gives."""
    import signal
    import time

    ckpt = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "tests/dist/preempt.py", str(ckpt)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = ckpt / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"{sig} received; stopped after iteration" in err
    assert sig in (ckpt / "events.log").read_text()
    done = torch.load(ckpt / "checkpoint.pt", weights_only=True)["iteration"]
    assert done >= 3
    resumed = make_mamlpp_trainer(ckpt)
    resumed.train(done + 2, resume=True)
    ref = make_mamlpp_trainer(tmp_path / "ref")
    ref.train(done + 2)
    for k, v in _state(ref).items():
        assert torch.equal(_state(resumed)[k], v), k


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_by_c10d_rendezvous_equal_one_process(tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice, meeting at a c10d rendezvous on
    127.0.0.1 (two "nodes" on this machine), trains what one process trains: the MAML++
    recipe with dropout, so the learned per-step rates must be averaged over the nodes
    (each node's share of the meta-batch gives them another gradient) and the
    derivative-order switch and the outer scheduler must happen alike on both."""
    out = tmp_path / "nodes.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "effmaml-test"]
        cmd += ["tests/dist/worker.py", str(out), "4", "0.1", "mamlpp"]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    _assert_same_as_one_process(torch.load(out, weights_only=True), 4, 0.1, recipe="mamlpp")


def test_the_stop_flag_lives_on_the_gradients_device_and_needs_no_collective_unwatched(
    monkeypatch,
):
    """Under NCCL (torchrun on GPUs) an all-reduce of a CPU tensor raises: the stop flag is
    built on the parameters' device, and with no stop handler installed no rank can be
    stopped, so no collective runs at all (two ranks mocked)."""
    import signal

    from effmaml import preemption

    calls = []
    monkeypatch.setattr(preemption, "world", lambda group=None: (0, 2))
    monkeypatch.setattr(preemption, "all_reduce_sum", lambda ts, group=None: calls.append(ts))
    meta = preemption.Preemption([signal.SIGUSR1], torch.device("meta"))
    assert meta.flag().device.type == "meta"
    cpu = preemption.Preemption([signal.SIGUSR1], torch.device("cpu"))
    before = signal.getsignal(signal.SIGUSR1)
    assert not cpu.stopping() and calls == []  # no handler installed: no collective
    with cpu.catching():
        assert cpu.watching and not cpu.stopping()
        assert len(calls) == 1 and calls[0][0].device.type == "cpu"
        signal.raise_signal(signal.SIGUSR1)
        assert cpu.stopping() and cpu.name() == "SIGUSR1"
    assert not cpu.watching and signal.getsignal(signal.SIGUSR1) is before
    off = preemption.Preemption([], torch.device("cpu"))
    with off.catching():
        assert not off.stopping()
    assert len(calls) == 2


def test_the_run_log_on_its_own(tmp_path):
    """Rank 0 writes a header and a row per step; a resume keeps the rows up to the
    checkpoint's iteration and drops the later ones (written before a crash); other ranks
    and a run without a directory write nothing."""
    import csv

    from effmaml.runlog import LOG_COLUMNS, RunLog

    log = RunLog(tmp_path)
    log.open(resume=False, iteration=0)
    for i in range(1, 5):
        log.write({c: i if c == "iteration" else "x" for c in LOG_COLUMNS})
    log.event("a note")
    RunLog(tmp_path).open(resume=True, iteration=2)
    with open(tmp_path / "log.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2]
    assert (tmp_path / "events.log").read_text() == "a note\n"
    other = tmp_path / "other"
    RunLog(other, writer=False).open(resume=False, iteration=0)
    RunLog(None).write({})
    assert not other.exists()


def test_the_curriculum_on_its_own():
    """Derivative-order annealing and the multi-step loss's weights, by iteration alone."""
    from effmaml.curriculum import Curriculum

    maml = effmaml.MAML(mlp(width=8), mse_loss, effmaml.SGD(0.01), "checkpoint")
    c = Curriculum(maml, first_order_iterations=2, step_weights=lambda i: [i, 1])
    assert [c.maml_at(i).strategy.name for i in range(4)] == ["first_order"] * 2 + [
        "checkpoint"
    ] * 2
    assert c.maml_at(3) is maml and c.maml_at(0) is c.maml_at(1)
    assert c.weights_at(5) == [5.0, 1.0]
    assert Curriculum(maml).weights_at(0) is None and Curriculum(maml).maml_at(0) is maml
    with pytest.raises(ValueError, match="first_order_iterations must be >= 0"):
        Curriculum(maml, first_order_iterations=-1)
