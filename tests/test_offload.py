"""The pinned host memory offload accounts: per store, released with what holds it."""

import gc

import pytest
import torch

import effmaml
from effmaml.offload import PinnedLedger, pinned_held, pinned_high_water
from effmaml.step import current_step

from .helpers import ce_loss, make_batch, make_model


class _Handle:
    """Stands for a stored state's handle (anything that can be weakly referenced)."""


def test_a_charge_ends_when_released_or_when_its_handle_is_freed():
    base_held, base_high = pinned_held(), pinned_high_water()
    ledger = PinnedLedger()
    kept, dropped = _Handle(), _Handle()
    release = ledger.charge(kept, 100)
    ledger.charge(dropped, 50)
    assert (ledger.held, ledger.peak) == (150, 150)
    assert pinned_held() == base_held + 150
    del dropped  # a state never brought back (adapt without backward)
    assert (ledger.held, pinned_held()) == (100, base_held + 100)
    release()  # brought back by get
    release()  # once only
    del kept
    assert (ledger.held, ledger.peak) == (0, 150)
    assert pinned_held() == base_held
    assert pinned_high_water() == max(base_high, base_held + 150)


def test_a_store_dropped_mid_run_does_not_inflate_the_high_water_mark():
    """The old process-global counter kept the bytes of states never brought back, and
    each later store added to them: the high-water mark offload's time prediction reads
    grew with every adapt without backward."""
    base = pinned_high_water()

    def forward_that_fails() -> None:
        ledger = PinnedLedger()
        handles = [_Handle() for _ in range(3)]
        for h in handles:
            ledger.charge(h, 1000)
        raise RuntimeError("the loss was not finite")

    for _ in range(5):
        with pytest.raises(RuntimeError):
            forward_that_fails()
        gc.collect()
    assert pinned_high_water() == max(base, pinned_held() + 3000)


@pytest.mark.gpu
def test_offload_without_backward_or_after_an_exception_holds_no_pinned_memory():
    model = make_model(p_drop=0.0).cuda()
    batches = [tuple(t.cuda() for t in make_batch(s)) for s in range(6)]
    maml = effmaml.MAML(model, ce_loss, effmaml.SGD(0.1), "offload", segment=2)
    held = pinned_held()
    adapted = maml.adapt(batches)
    assert pinned_held() > held
    del adapted  # no backward
    gc.collect()
    assert pinned_held() == held

    def loss(module, batch):
        out = ce_loss(module, batch)
        return out / 0 if current_step() == 4 else out  # not finite at step 4

    with pytest.raises(FloatingPointError):
        effmaml.MAML(model, loss, effmaml.SGD(0.1), "offload", segment=2).adapt(batches)
    gc.collect()
    assert pinned_held() == held
    torch.cuda.synchronize()
