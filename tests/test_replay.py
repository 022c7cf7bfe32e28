"""What recomputation replays: autocast, and the same batch for the same index.

Batch sources are whatever a user has: a list, a ``torch.utils.data.Dataset`` of per-step
batches, a lazy class that is not a ``collections.abc.Sequence``; a source that returns
another batch when indexed again is caught in backward, not silently differentiated.
"""

import dataclasses
import random

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

import effmaml
from effmaml.replay import NondeterministicBatchError, capture_rng, replay_rng, rng_devices

from .helpers import (
    FULL_ROW,
    GRID,
    OUTER_KINDS,
    Opt,
    assert_results_match,
    assert_scaled_close,
    ce_loss,
    grad_scale,
    make_batch,
    make_model,
    run_effmaml,
)

STEPS = 7


def _tight_budget() -> int:
    """A budget below naive's predicted peak and above checkpoint's, so that ``auto``
    recomputes (for the plain and the momentum inner optimizer used below)."""
    naive, ckpt = [], []
    for inner in (effmaml.SGD(0.1), effmaml.SGD(0.1, momentum=0.5)):
        maml = effmaml.MAML(make_model(p_drop=0.2), ce_loss, inner)
        preds = maml.estimate(make_batch(0), STEPS)
        naive.append(preds["naive"].peak_bytes)
        ckpt += [p.peak_bytes for k, p in preds.items() if "pullback='segment'" in k]
    assert max(ckpt) < min(naive)
    return (max(ckpt) + min(naive)) // 2


RECOMPUTING = [
    ("checkpoint", {"segment": 3}),
    ("checkpoint", {"segment": 3, "pullback": "step"}),
    ("revolve", {"slots": 2}),
    ("offload", {"segment": 2}),
    ("auto", {"memory_budget": _tight_budget()}),
]
F32 = torch.float32


# -- autocast -----------------------------------------------------------------------------
def _amp_rows():
    """FULL_ROW and every grid row, each paired with one recomputing strategy.

    Except Adam with per-step BatchNorm: a per-step weight's slices have exactly zero inner
    gradients until their step, where Adam's derivative is (1-β₁)/ε (Note [Adam's eps outside
    a safe square root]), so float32 sums of such terms differ in their last ~1e-2 in any
    order, naive's included; the float64 specification (tests/test_exact.py) covers it.
    """
    rows = [FULL_ROW, *[o for o in GRID if not (o.optim == "adam" and o.bn == "per_step")]]
    return [(o, *RECOMPUTING[i % len(RECOMPUTING)]) for i, o in enumerate(rows)]


@pytest.mark.parametrize(
    "opt,strategy,kw", _amp_rows(), ids=lambda v: v.id() if isinstance(v, Opt) else str(v)
)
def test_exact_under_bfloat16_autocast(opt, strategy, kw, monkeypatch):
    """bf16 CPU autocast around adapt and the query loss, backward outside (the AMP pattern).

    With autocast's weight-cast cache off, every gradient equals naive's to float32 summation
    order: a few ulps per step, 8·N·ε₃₂ of the largest entry (a bias before BatchNorm, whose
    true gradient is 0, is all rounding: 2.5e-6 with per-step BatchNorm's slices; without
    replaying autocast the gradients move by ~1e-3); values bitwise.
    """
    _no_cast_cache(monkeypatch)
    ref = run_effmaml(opt, "naive", STEPS, dtype=F32, amp=torch.bfloat16)
    ours = run_effmaml(opt, strategy, STEPS, dtype=F32, amp=torch.bfloat16, **kw)
    summation = 8 * STEPS * torch.finfo(F32).eps
    assert_results_match(ours, ref, grad_rel=summation, exact_values=True)
    assert ours["losses"].dtype == torch.float32  # cross_entropy autocasts to float32


def test_bfloat16_autocast_with_the_cast_cache():
    """The default autocast (cast cache on): naive sums a fixed parameter's gradient in
    bfloat16 through the one cached cast it reuses at every step; a recomputation casts per
    step and sums in float32. Adapted parameters (never cached: they are not leaves) and all
    values still match exactly; fixed parameters to bfloat16 accumulation (~1e-2)."""
    opt = FULL_ROW  # head-only: the body is fixed
    ref = run_effmaml(opt, "naive", STEPS, dtype=F32, amp=torch.bfloat16)
    ours = run_effmaml(opt, "checkpoint", STEPS, dtype=F32, amp=torch.bfloat16, segment=3)
    names = [n for n, _ in ours["model"].named_parameters()]
    scale = grad_scale(ref["grads"])
    for i, (a, b) in enumerate(zip(ours["grads"], ref["grads"])):
        fixed = i < len(names) and names[i] not in ours["params"]
        rel = 2e-2 if fixed else 1e-6
        assert_scaled_close(a, b, rel, names[i] if i < len(names) else "lr", scale=scale)
    torch.testing.assert_close(ours["losses"], ref["losses"], rtol=0, atol=0)


@pytest.mark.parametrize("strategy,kw", [("checkpoint", {"segment": 2}), ("implicit", {})])
def test_autocast_state_is_recorded_when_adapt_starts(strategy, kw):
    """adapt under autocast, backward outside: a recomputed step (checkpoint) or a
    Hessian-vector product (implicit) runs in bfloat16 again."""
    seen = []

    def loss_fn(m, batch):
        out = m(batch[0])
        seen.append(out.dtype)
        return ce_loss(lambda x, o=out: o, batch)

    model = make_model(dtype=F32, bn=False)
    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.1), strategy, **kw)
    batches = [make_batch(t, dtype=F32) for t in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = maml.adapt(batches)
        loss = ce_loss(adapted, make_batch(9, dtype=F32))
    n_forward = len(seen)
    loss.backward()
    assert len(seen) > n_forward  # it did recompute
    assert set(seen) == {torch.bfloat16}


def _no_cast_cache(monkeypatch):
    real = torch.autocast

    class NoCache(real):
        def __init__(self, *args, **kw):
            kw["cache_enabled"] = False
            super().__init__(*args, **kw)

    monkeypatch.setattr(torch, "autocast", NoCache)


# -- batch sources ------------------------------------------------------------------------
class LazySource:
    """Not a Sequence: only __len__ and __getitem__ (a user's own lazy class)."""

    def __init__(self, steps, seed=200):
        self.steps, self.seed = steps, seed

    def __len__(self):
        return self.steps

    def __getitem__(self, t):
        return make_batch(self.seed + t)


def _grads(strategy, batches, **kw):
    torch.manual_seed(3)
    model = make_model(p_drop=0.2)
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1, momentum=0.5), strategy, **kw)
    adapted = maml.adapt(batches)
    return torch.autograd.grad(ce_loss(adapted, make_batch(99)), list(model.parameters()))


@pytest.mark.parametrize("strategy,kw", [("naive", {}), *RECOMPUTING])
def test_dataset_and_lazy_class_are_batch_sources(strategy, kw):
    listed = [make_batch(200 + t) for t in range(STEPS)]
    xs = torch.stack([x for x, _ in listed])
    ys = torch.stack([y for _, y in listed])
    ref = _grads("naive", listed)
    for source in (TensorDataset(xs, ys), LazySource(STEPS)):
        got = _grads(strategy, source, **kw)
        scale = grad_scale(ref)
        for a, b in zip(got, ref):
            assert_scaled_close(a, b, 1e-12, type(source).__name__, scale=scale)


def test_dataset_with_steps_must_match_its_length():
    ds = TensorDataset(torch.randn(3, 8, 5, dtype=torch.float64), torch.randint(0, 3, (3, 8)))
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1))
    assert len(maml.adapt(ds, steps=3).losses) == 3
    with pytest.raises(ValueError, match="source of 3 batches with steps=4"):
        maml.adapt(ds, steps=4)


class _Stream(IterableDataset):
    def __iter__(self):
        return (make_batch(t) for t in range(STEPS))


@pytest.mark.parametrize(
    "make",
    [
        lambda: iter([make_batch(t) for t in range(STEPS)]),
        lambda: (make_batch(t) for t in range(STEPS)),
        _Stream,
        lambda: torch.utils.data.DataLoader(TensorDataset(torch.randn(4, 5)), batch_size=2),
    ],
    ids=["iterator", "generator", "IterableDataset", "DataLoader"],
)
@pytest.mark.parametrize("steps", [None, STEPS])
def test_one_pass_sources_are_refused_with_the_reason(make, steps):
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "checkpoint")
    with pytest.raises(TypeError, match=r"one-pass source .*index.*list\(source\)"):
        maml.adapt(make(), steps=steps)


class Augmenting(LazySource):
    """Batch t plus noise from Python's `random` (outside torch's RNG): another batch each
    time it is indexed."""

    def __getitem__(self, t):
        x, y = super().__getitem__(t)
        return x + random.gauss(0, 0.3), y


class TorchAugmenting(LazySource):
    """Noise from torch's global RNG: replayed with the step, so the same batch again."""

    def __getitem__(self, t):
        x, y = super().__getitem__(t)
        return x + 0.3 * torch.randn_like(x), y


@pytest.mark.parametrize("strategy,kw", RECOMPUTING)
def test_a_source_that_changes_is_caught_in_backward(strategy, kw):
    random.seed(0)
    model = make_model()
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), strategy, **kw)
    adapted = maml.adapt(Augmenting(STEPS))
    loss = ce_loss(adapted, make_batch(99))
    with pytest.raises(NondeterministicBatchError, match=r"step \d+ .*same batch for the same"):
        loss.backward()


def test_naive_does_not_reindex_so_it_accepts_a_changing_source():
    random.seed(0)
    adapted = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1)).adapt(Augmenting(STEPS))
    ce_loss(adapted, make_batch(99)).backward()


@pytest.mark.parametrize("strategy,kw", RECOMPUTING[:3])
def test_torch_rng_augmentation_replays_exactly(strategy, kw):
    torch.manual_seed(5)
    ref = _grads("naive", TorchAugmenting(STEPS))
    torch.manual_seed(5)
    got = _grads(strategy, TorchAugmenting(STEPS), **kw)
    for a, b in zip(got, ref):
        assert_scaled_close(a, b, 1e-12, strategy, scale=grad_scale(ref))


class _NoisyLoss:
    """A loss whose recomputation differs by ``rel`` (as nondeterministic kernels would)."""

    def __init__(self, rel):
        self.rel, self.noisy = rel, False

    def __call__(self, m, batch):
        loss = ce_loss(m, batch)
        return loss * (1 + self.rel) if self.noisy else loss


@pytest.mark.parametrize("dtype,rel,caught", [(F32, 2e-6, False), (F32, 1e-2, True)])
def test_loss_check_tolerates_kernel_noise_not_a_different_loss(dtype, rel, caught):
    """float32: a recomputed loss 2e-6 away (GPU atomics leave less) passes; 1e-2 fails."""
    loss_fn = _NoisyLoss(rel)
    model = make_model(dtype=dtype)
    maml = effmaml.MAML(model, loss_fn, effmaml.SGD(0.1), "checkpoint", segment=2)
    adapted = maml.adapt([make_batch(t, dtype=dtype) for t in range(STEPS)])
    loss = ce_loss(adapted, make_batch(99, dtype=dtype))
    loss_fn.noisy = True  # from now on: the recomputation
    if caught:
        with pytest.raises(NondeterministicBatchError, match="inner loss at step"):
            loss.backward()
    else:
        loss.backward()


def test_error_names_step_and_values():
    random.seed(1)
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1), "checkpoint", segment=4)
    adapted = maml.adapt(Augmenting(STEPS))
    with pytest.raises(NondeterministicBatchError) as info:
        ce_loss(adapted, make_batch(99)).backward()
    msg = str(info.value)
    # the last segment (steps 4..6) is pulled back first: step 4 is the first recomputed
    assert "batch of step 4 is not" in msg and " then, " in msg and "numpy, random" in msg


@pytest.mark.parametrize("outer", OUTER_KINDS[1:])
def test_outer_tensors_exact_under_bfloat16_autocast(outer, monkeypatch):
    """Learned data, weights, a closure temperature and a second network under bf16 CPU
    autocast: their stand-ins are cast as the tensors themselves are (Note [Outer tensors
    under recomputation]); gradients to float32 summation order, values bitwise."""
    _no_cast_cache(monkeypatch)
    opt = Opt(optim="adam", bn="update", dropout=True, outer=outer, msl=True)
    ref = run_effmaml(opt, "naive", STEPS, dtype=F32, amp=torch.bfloat16)
    ours = run_effmaml(opt, "checkpoint", STEPS, dtype=F32, amp=torch.bfloat16, segment=3)
    assert_results_match(ours, ref, grad_rel=8 * STEPS * torch.finfo(F32).eps, exact_values=True)


# -- the RNG of every device ----------------------------------------------------------------
def test_the_devices_whose_rng_is_kept_are_every_one_but_the_cpu_once():
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    got = rng_devices([torch.device("cpu"), cuda0, torch.device("meta"), cuda1, cuda0])
    assert got == (cuda0, cuda1)
    problem, _, _ = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(0.1)).problem(make_batch(0), 2)
    assert problem.rng_devices == ()  # a CPU model: the CPU generator alone
    # where the batches go counts as much as where the model is
    assert dataclasses.replace(problem, device=cuda1).rng_devices == (cuda1,)


class _Generators:
    """Stands for torch.cuda's generator functions over two devices (no GPU needed)."""

    def __init__(self, devices):
        self.states = {d: torch.tensor([i]) for i, d in enumerate(devices)}

    def get_rng_state(self, device):
        return self.states[device].clone()

    def set_rng_state(self, state, device):
        self.states[device] = state.clone()


def test_a_replay_restores_the_generator_of_every_device(monkeypatch):
    """Dropout on a second device replays too (torch.utils.checkpoint saves every device's
    generator that its inputs are on; the RNG state held the CPU's and one device's)."""
    import effmaml.replay as replay

    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    gens = _Generators([cuda0, cuda1])
    monkeypatch.setattr(replay, "_generator_module", lambda device: gens)
    before = capture_rng([cuda0, cuda1])
    assert [d for d, _ in before.devices] == [cuda0, cuda1]
    gens.states = {cuda0: torch.tensor([10]), cuda1: torch.tensor([11])}  # the steps draw
    cpu = torch.get_rng_state()
    with replay_rng(before):  # a recomputation starts where the step did, on both devices
        assert gens.states == {cuda0: torch.tensor([0]), cuda1: torch.tensor([1])}
        gens.states[cuda1] = torch.tensor([99])
        torch.rand(3)
    # and the user's RNG is left where it was
    assert gens.states == {cuda0: torch.tensor([10]), cuda1: torch.tensor([11])}
    assert torch.equal(torch.get_rng_state(), cpu)
