"""Benchmark presets (frozen dataclasses) and the strategies they sweep."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_RUNS",
    "PRESETS",
    "REFERENCE",
    "RUNS",
    "STAND_IN",
    "Preset",
    "RunSpec",
    "base_preset",
]

# the meta-gradient every run is compared with, and the one that stands in where naive
# does not fit (itself compared with naive at the largest N where both ran)
REFERENCE, STAND_IN = "naive", "checkpoint_auto_segment"


@dataclass(frozen=True)
class RunSpec:
    """One swept configuration: a label, an effmaml strategy (or a peer) and its options."""

    label: str
    strategy: str
    options: tuple[tuple[str, object], ...] = ()
    peer: str = ""  # "", "torch_maml", "higher", "torchopt"
    needs_no_clip: bool = False  # higher has no grad-of-grad clipping
    no_amp: bool = False  # run in float32 even when the preset runs under autocast

    def opts(self) -> dict:
        return dict(self.options)


RUNS: dict[str, RunSpec] = {
    r.label: r
    for r in [
        RunSpec("naive", "naive"),
        RunSpec(
            "checkpoint_auto_segment", "checkpoint", (("segment", None), ("pullback", "segment"))
        ),
        RunSpec("checkpoint_auto_step", "checkpoint", (("segment", None), ("pullback", "step"))),
        RunSpec("checkpoint_k5", "checkpoint", (("segment", 5), ("pullback", "segment"))),
        RunSpec("revolve_s2", "revolve", (("slots", 2),)),
        RunSpec("revolve_s4", "revolve", (("slots", 4),)),
        RunSpec("revolve_s8", "revolve", (("slots", 8),)),
        RunSpec("offload", "offload", (("segment", None), ("pullback", "step"))),
        RunSpec("first_order", "first_order"),
        # iMAML (λ=1, 5 CG steps as in the paper); its Hessian from the last 4 distinct batches
        RunSpec("implicit", "implicit", (("lam", 1.0), ("cg_steps", 5), ("hvp_batches", 4))),
        RunSpec("torch_maml_naive", "naive", peer="torch_maml"),
        RunSpec("torch_maml_checkpoint", "checkpoint", (("segment", 5),), peer="torch_maml"),
        # the equal-segment memory comparison with torch_maml (docs/strategies.md), run by
        # name: python -m bench --preset cpu-small --steps 40 --strategies
        # checkpoint_k6,torch_maml_checkpoint_k6
        RunSpec("checkpoint_k6", "checkpoint", (("segment", 6), ("pullback", "segment"))),
        RunSpec("torch_maml_checkpoint_k6", "checkpoint", (("segment", 6),), peer="torch_maml"),
        RunSpec("higher", "naive", peer="higher", needs_no_clip=True),
        # TorchOpt's MetaSGD: naive second-order MAML, no grad-of-grad clipping
        RunSpec("torchopt", "naive", peer="torchopt", needs_no_clip=True),
        # the fastest exact schedule predicted to fit a budget (cpu-small at N=40: 400 MiB
        # is ~half of torch_maml_checkpoint's peak, 800 MiB about all of it, 3 GiB fits naive)
        RunSpec("auto_400MiB", "auto", (("memory_budget", "400MiB"),)),
        RunSpec("auto_800MiB", "auto", (("memory_budget", "800MiB"),)),
        RunSpec("auto_3GiB", "auto", (("memory_budget", "3GiB"),)),
        RunSpec("auto_2GiB", "auto", (("memory_budget", "2GiB"),)),
        RunSpec("auto_6GiB", "auto", (("memory_budget", "6GiB"),)),
        RunSpec("auto_20GiB", "auto", (("memory_budget", "20GiB"),)),
        # gpt2-small: one inner state is 1.4 GiB (Adam) and one step's graph ~8.5 GiB at
        # 8 x 256 tokens, so the memory floor is ~20 GiB; 40 GiB leaves auto a choice
        RunSpec("auto_40GiB", "auto", (("memory_budget", "40GiB"),)),
        # under a preset's autocast: naive in float32, what AMP's meta-gradient is compared to
        RunSpec("naive_fp32", "naive", no_amp=True),
        # naive run twice: the noise floor of agreement on nondeterministic GPU kernels
        RunSpec("naive_rerun", "naive"),
    ]
}
DEFAULT_RUNS = tuple(
    label
    for label in RUNS
    if label not in ("naive_rerun", "naive_fp32")
    and not label.startswith("auto_")
    and not label.endswith("_k6")
)


# gpt2-small at N = 50 and 100, where naive would need tens of GiB: the schedules that fit
_GPT2_SMALL_LONG = (
    "checkpoint_auto_segment",
    "checkpoint_auto_step",
    "revolve_s8",
    "offload",
    "auto_40GiB",
)


def gpt2_sizes(
    layers: int, width: int, heads: int, vocab: int, seq: int
) -> tuple[tuple[str, object], ...]:
    """The ``model_options`` of a GPT-2 preset (bench.models.gpt2's arguments)."""
    return (
        ("n_layer", layers),
        ("n_embd", width),
        ("n_head", heads),
        ("vocab", vocab),
        ("seq", seq),
    )


@dataclass(frozen=True)
class Preset:
    """A benchmark set-up: model, data, inner optimizer, the steps and strategies swept."""

    name: str
    image: int
    batch: int
    steps: tuple[int, ...]
    clip: float | None
    lr: float = 0.01
    classes: int = 10
    dtype: str = "float32"
    repeats: int = 2
    timeout_s: int = 900
    runs: tuple[str, ...] = DEFAULT_RUNS
    # label -> the largest N it runs at (to fit the machine's time); larger N: "skipped"
    caps: tuple[tuple[str, int], ...] = ()
    # above this N, only the memory child runs (one meta-gradient), no timing child
    time_max_steps: int | None = None
    # N -> the labels run at that N, where they differ from ``runs``
    runs_at: tuple[tuple[int, tuple[str, ...]], ...] = ()
    # CPU: memory children run this many at a time (their peaks are per process; keep 1
    # where two peaks would not fit the machine's memory)
    memory_workers: int = 1
    # one meta-gradient per cell, measured for memory and timed at once after a 2-step
    # warm-up (on CUDA, where measuring memory costs nothing); repeats is then 1
    single_run: bool = False
    # autocast dtype for adapt + query loss ("bfloat16", "float16"), "" for none
    amp: str = ""
    # which targets the report checks on this preset's CSV (bench.report.TARGETS)
    targets: tuple[str, ...] = ("memory_model", "time_model")
    # the model, by its name in bench.models.MODELS, and its builder's options (sizes)
    model: str = "resnet18"
    model_options: tuple[tuple[str, object], ...] = ()
    # the inner optimizer: "sgd" or "adam", learning rate ``lr``
    inner: str = "sgd"
    # the multi-step loss (MAML++'s MSL): the query loss after every inner step, weighted
    # uniformly, is the meta-objective (adapt(..., query=, step_weights=)); else the final
    msl: bool = False

    def describe(self) -> str:
        """``"resnet18, 16x3x224x224, float32, clip 100.0"`` (for titles and tables)."""
        amp = f", autocast {self.amp}" if self.amp else ""
        clip = f", clip {self.clip}" if self.clip is not None else ""
        o = dict(self.model_options)
        if "seq" in o:
            shape = (
                f" ({o.get('n_layer')} layers, {o.get('n_embd')} wide), "
                f"{self.batch}x{o['seq']} tokens"
            )
        else:
            shape = f", {self.batch}x3x{self.image}x{self.image}"
        return f"{self.model}{shape}, {self.dtype}, {self.inner} {self.lr}{amp}{clip}"

    def variant(self, batch: int | None = None, amp: str = "") -> Preset:
        """This preset at another batch size and/or under autocast, named after both
        (``gpt2-small-b1``, ``cpu-small-amp-bfloat16``: its results folder)."""
        p = self
        if batch:
            p = dataclasses.replace(p, name=f"{p.name}-b{batch}", batch=batch)
        if amp:
            p = dataclasses.replace(p, name=f"{p.name}-amp-{amp}", amp=amp)
        return p

    def cap(self, label: str) -> int | None:
        return dict(self.caps).get(label)

    def labels_at(self, steps: int) -> tuple[str, ...]:
        """The runs at N=``steps``."""
        return dict(self.runs_at).get(steps, self.runs)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # The seed notebook's set-up: ResNet18, 16x3x224x224, SGD 0.01, clip 1e2, on a GPU
        # lent for minutes, every cell timed: at N=100 every strategy (naive, its peers,
        # auto under 2/3/6/20 GiB); at N=500 the schedules that fit a few GiB and
        # torch_maml's k=5 (the seed notebook's); at N=1000 the memory floor. One
        # meta-gradient per cell (about 8 minutes of device time by the H200's figures).
        Preset(
            "resnet18-224",
            image=224,
            batch=16,
            steps=(100, 500, 1000),
            clip=100.0,
            repeats=1,
            timeout_s=300,
            runs=(
                "naive",
                "first_order",
                "checkpoint_auto_segment",
                "checkpoint_auto_step",
                "checkpoint_k5",
                "revolve_s4",
                "revolve_s8",
                "offload",
                "implicit",
                "torch_maml_naive",
                "torch_maml_checkpoint",
                "higher",
                "auto_2GiB",
                "auto_3GiB",
                "auto_6GiB",
                "auto_20GiB",
            ),
            runs_at=(
                (
                    500,
                    (
                        "checkpoint_auto_segment",
                        "checkpoint_auto_step",
                        "offload",
                        "revolve_s8",
                        "auto_3GiB",
                        "torch_maml_checkpoint",
                    ),
                ),
                (1000, ("offload", "revolve_s8")),
            ),
            single_run=True,
            targets=("memory_floor", "auto_vs_named", "memory_model", "time_model"),
        ),
        # `make bench` on a machine without a GPU: ResNet18 at 40x40 (64x64 took 13 minutes
        # here, 48x48 9.5), N=10, 20, 40, the strategies a newcomer compares, the peers up to
        # N=20; N=40 for memory and agreement only (its timings were 40% of the sweep's
        # time), so that setup + sweep stay under 12 minutes on 2 cores.
        Preset(
            "cpu-quick",
            image=40,
            batch=8,
            steps=(10, 20, 40),
            clip=None,
            repeats=1,
            time_max_steps=20,
            memory_workers=2,
            caps=(("torch_maml_checkpoint", 20), ("higher", 20), ("torchopt", 20)),
            runs=(
                "naive",
                "first_order",
                "checkpoint_auto_segment",
                "revolve_s4",
                "auto_800MiB",
                "torch_maml_checkpoint",
                "higher",
                "torchopt",
            ),
            targets=("auto_vs_named", "memory_model", "time_model"),
        ),
        # The multi-step loss on cpu-quick's model: the query after every step, uniform
        # weights. naive keeps every step's and every query's graph; the schedules keep
        # one segment's (or one step's) with its queries, evaluated as the pullbacks pass.
        Preset(
            "cpu-quick-msl",
            image=40,
            batch=8,
            steps=(5, 20, 100),
            clip=None,
            repeats=1,
            msl=True,
            time_max_steps=20,
            runs=(
                "naive",
                "checkpoint_auto_segment",
                "checkpoint_auto_step",
                "revolve_s4",
                "auto_800MiB",
            ),
            targets=("memory_model", "time_model"),
        ),
        # Same model and code path, scaled to 2 CPU cores (75 minutes measured here): peers and the
        # slowest schedule stop early, and N = 160 is measured for memory only.
        Preset(
            "cpu-small",
            image=64,
            batch=8,
            steps=(5, 10, 20, 40, 80, 160),
            clip=None,
            repeats=1,
            caps=(
                ("torch_maml_naive", 40),
                ("higher", 40),
                ("torch_maml_checkpoint", 80),
                ("checkpoint_k5", 80),
                ("revolve_s2", 80),
            ),
            time_max_steps=80,
            targets=("half_memory_n40", "revolve_flat", "memory_model", "time_model"),
        ),
        # auto against every named exact strategy at N=40 under three budgets, side by
        # side in one run (cpu-small's model and data): is auto as fast as the fastest
        # named schedule that fits, and how close is the time model?
        Preset(
            "cpu-small-budget",
            image=64,
            batch=8,
            steps=(40,),
            clip=None,
            repeats=1,
            runs=(
                "naive",
                "first_order",
                "checkpoint_auto_segment",
                "checkpoint_auto_step",
                "checkpoint_k5",
                "revolve_s2",
                "revolve_s4",
                "revolve_s8",
                "torch_maml_checkpoint",
                "auto_400MiB",
                "auto_800MiB",
                "auto_3GiB",
            ),
            targets=("auto_vs_named", "memory_model", "time_model"),
        ),
        # A language model on one GPU: GPT-2 small (124M, 12 layers, 768 wide), 8 x 256
        # tokens, Adam inner lr 1e-4: naive where it fits, the memory-saving schedules to
        # N=100, auto under 40 GiB.
        Preset(
            "gpt2-small",
            image=0,
            batch=8,
            steps=(1, 10, 50, 100),
            clip=None,
            lr=1e-4,
            inner="adam",
            model="gpt2",
            model_options=gpt2_sizes(12, 768, 12, vocab=50257, seq=256),
            repeats=1,
            timeout_s=300,
            runs=(
                "naive",
                "first_order",
                "checkpoint_auto_segment",
                "checkpoint_auto_step",
                "revolve_s8",
                "offload",
                "auto_40GiB",
            ),
            runs_at=(
                (1, ("naive", "first_order")),
                *((n, _GPT2_SMALL_LONG) for n in (50, 100)),
            ),
            single_run=True,
            targets=("memory_model", "time_model"),
        ),
        # The same code path on this CPU: GPT-2 with 4 layers, 256 wide, 4 x 64 tokens,
        # Adam inner lr 1e-4, dropout 0.1, tied embeddings: memory and time models checked
        # on a transformer.
        Preset(
            "gpt2-cpu",
            image=0,
            batch=4,
            steps=(5, 10, 20),
            clip=None,
            lr=1e-4,
            inner="adam",
            model="gpt2",
            model_options=gpt2_sizes(4, 256, 4, vocab=2000, seq=64),
            repeats=1,
            runs=(
                "naive",
                "first_order",
                "checkpoint_auto_segment",
                "checkpoint_auto_step",
                "revolve_s4",
                "auto_800MiB",
            ),
            targets=("auto_vs_named", "memory_model", "time_model"),
        ),
        # For tests, seconds: the GPU preset's shape at toy size (runs that differ by N,
        # naive missing at the largest N so checkpoint(segment) stands in as reference).
        Preset(
            "tiny",
            image=32,
            batch=8,
            steps=(2, 3),
            clip=None,
            repeats=1,
            timeout_s=300,
            runs=("naive", "first_order", "checkpoint_auto_segment", "checkpoint_k5"),
            runs_at=((3, ("checkpoint_auto_segment", "revolve_s8", "offload")),),
            single_run=True,
        ),
        # For tests, seconds: gpt2-small's path (token batches, Adam, the LM loss, dropout on,
        # tied embeddings) at toy size in float64, where every exact run must equal naive
        Preset(
            "gpt2-tiny",
            image=0,
            batch=2,
            steps=(3,),
            clip=None,
            lr=1e-3,
            inner="adam",
            dtype="float64",
            model="gpt2",
            model_options=gpt2_sizes(1, 16, 2, vocab=40, seq=8),
            repeats=1,
            timeout_s=300,
            runs=(
                "naive",
                "first_order",
                "checkpoint_auto_segment",
                "checkpoint_auto_step",
                "revolve_s2",
                "auto_2GiB",
            ),
        ),
    ]
}


def base_preset(name: str) -> Preset | None:
    """The preset a results folder's name comes from (``gpt2-small-b1`` -> gpt2-small,
    :meth:`Preset.variant`), or None."""
    return PRESETS.get(re.sub(r"(-b\d+)?(-amp-\w+)?$", "", name))
