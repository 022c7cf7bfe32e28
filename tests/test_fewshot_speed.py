"""make fewshot-speed at toy size: every library computes the same meta-gradient (float64),
and the table carries each library's time, peak and its ratio to the fastest peer."""

import torch

from bench.fewshot_speed import LIBRARIES, PEERS, Speed, run, summary

TOY = Speed(meta_batch=2, width=4, image=16, steps=(1, 3), rounds=2, dtype="float64")


def test_every_library_gives_effmaml_naives_meta_gradient_in_float64():
    df = run(TOY, torch.device("cpu"))
    assert set(df.library) == set(LIBRARIES) and set(df.steps) == {1, 3}
    # the same sums, some in another order: float64 rounding only
    assert (df.grad_rel_l2 < 1e-12).all(), df[["library", "steps", "grad_rel_l2"]]
    assert (df.s_per_iteration > 0).all() and (df.s_min <= df.s_max).all()
    fastest = df[df.library.isin(PEERS)].groupby("steps").vs_fastest_peer.min()
    assert (fastest == 1.0).all()
    text = summary(df, TOY, 1.0)
    assert "effmaml naive" in text and "N=3 vs fastest peer" in text
