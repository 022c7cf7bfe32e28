"""``python -m bench.zoo`` (``make zoo``): every torchvision classification model up to a
size, and Hugging Face families at tiny size, through every exact strategy against naive.

Per model: float64, train mode (dropout, stochastic depth, BatchNorm statistics on), a
5-class head, ``N`` inner steps on distinct batches (SGD for images, Adam for tokens); each
exact strategy's adapted parameters, buffers, inner losses and meta-gradient are compared
with naive's. A result is ``bitwise`` (values and meta-gradient identical), ``summation
order`` (values identical, meta-gradient within 1e-12 relative: what the exactness
specification allows), ``rounding`` (values differ at rounding level) or ``failed`` (with
the error). ``checkpoint_first_order_advances`` is a diagnostic row: ``checkpoint`` with
``exact_states=False``, the states a first-order forward gives (Note [States bitwise
naive's]): where it is not bitwise, the probe's choice is what makes the others so.

Writes ``results/zoo/zoo.csv`` (a row per model and strategy, as runs end) and
``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import re
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import effmaml

from .env import device_name, environment

__all__ = ["COLUMNS", "STRATEGIES", "classify", "hf_models", "main", "run_model", "vision_models"]

# label -> (strategy, options); auto's budget is set per model below naive's predicted peak
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "checkpoint_segment1": ("checkpoint", {"segment": 1}),
    "checkpoint_step2": ("checkpoint", {"segment": 2, "pullback": "step"}),
    "revolve_slots1": ("revolve", {"slots": 1}),
    "offload_segment2": ("offload", {"segment": 2}),
    "auto_below_naive": ("auto", {}),
    "checkpoint_first_order_advances": ("checkpoint", {"segment": 1, "exact_states": False}),
}
COLUMNS = [
    "family",
    "model",
    "params",
    "strategy",
    "status",
    "result",
    "exact_states",
    "chosen",
    "grad_rel_l2",
    "value_max_abs",
    "seconds",
    "error",
    "torch",
    "git",
]
RELATIVE_SUMMATION = 1e-12
CLASSES = 5


# -- the models -------------------------------------------------------------------------------
def vision_models(max_params: float) -> list[str]:
    """torchvision's classification models with at most ``max_params`` parameters (with
    a 5-class head), smallest first."""
    import torchvision

    sizes = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:  # counted without allocating: on the meta device (builders' notices muted)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torchvision.models.get_model(name, num_classes=CLASSES)
        except NotImplementedError:
            # RegNets compute their widths with tensors: build the small ones for real
            # (regnet_x/y at 8 GFLOPs and up have 39 M parameters or more)
            flops = re.search(r"_(\d+)gf$", name)
            if flops and int(flops.group(1)) >= 8:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torchvision.models.get_model(name, num_classes=CLASSES)
        n = sum(p.numel() for p in model.parameters())
        if n <= max_params:
            sizes.append((n, name))
    return [name for _, name in sorted(sizes)]


def _vision(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, num_classes=CLASSES)


def image_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    out = model(x)
    out = getattr(out, "logits", out)  # GoogLeNet's and Inception's named outputs
    return F.cross_entropy(out, y)


def token_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def vit_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(pixel_values=x).logits, y)


def hf_models() -> dict[str, Callable[[], nn.Module]]:
    """Tiny configurations of six Hugging Face families (dropout 0.1): decoder-only with
    rotary embeddings and RMSNorm (Llama, Qwen2, Mistral), an encoder (BERT), a vision
    transformer (ViT) and an encoder-decoder with cross-attention (T5)."""
    import transformers as tr

    dec = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
        "attention_dropout": 0.1,
    }
    return {
        "llama": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**dec)),
        "qwen2": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**dec)),
        "mistral": lambda: tr.MistralForCausalLM(tr.MistralConfig(**dec)),
        "bert": lambda: tr.BertForMaskedLM(
            tr.BertConfig(
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
            )
        ),
        "vit": lambda: tr.ViTForImageClassification(
            tr.ViTConfig(
                image_size=16,
                patch_size=4,
                num_channels=3,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                num_labels=CLASSES,
                hidden_dropout_prob=0.1,
            )
        ),
        "t5": lambda: tr.T5ForConditionalGeneration(
            tr.T5Config(
                vocab_size=64,
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                dropout_rate=0.1,
                decoder_start_token_id=0,
            )
        ),
    }


# -- one model ----------------------------------------------------------------------------------
def _batches(kind: str, n: int, size: int, seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]
    return [
        (
            torch.randn(2, 3, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (2,), generator=g),
        )
        for _ in range(n)
    ]


def _one(build, loss_fn, kind, strategy, steps, size, **kw) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().to(torch.float64).train()
    inner = effmaml.Adam(0.01) if kind == "tokens" else effmaml.SGD(0.01)
    maml = effmaml.MAML(model, loss_fn, inner, strategy, **kw)
    batches, query = _batches(kind, steps, size), _batches(kind, 1, size, seed=9)[0]
    torch.manual_seed(7)  # dropout, stochastic depth
    t0 = time.perf_counter()
    adapted = maml.adapt(batches)
    loss = loss_fn(adapted, query)
    wrt = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    seconds = time.perf_counter() - t0
    flat = torch.cat(
        [(torch.zeros_like(w) if g is None else g).reshape(-1) for w, g in zip(wrt, grads)]
    )
    values = [*adapted.params.values(), *adapted.buffers.values(), *adapted.losses, loss]
    return {
        "grad": flat.detach(),
        "values": [v.detach() for v in values],
        "info": adapted.info,
        "seconds": seconds,
        "params": sum(w.numel() for w in wrt),
    }


def classify(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """The comparison of one strategy's run with naive's."""
    value_diff = max(
        (float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
        for a, b in zip(ours["values"], ref["values"])
    )
    g, r = ours["grad"], ref["grad"]
    rel = float((g - r).norm() / r.norm()) if r.norm() > 0 else float((g - r).norm())
    if value_diff == 0.0 and torch.equal(g, r):
        result = "bitwise"
    elif value_diff == 0.0 and rel <= RELATIVE_SUMMATION:
        result = "summation order"
    else:
        result = "rounding"
    return {"result": result, "grad_rel_l2": rel, "value_max_abs": value_diff}


def run_model(family: str, name: str, steps: int = 3, size: int = 64) -> list[dict[str, Any]]:
    """Naive and every strategy of :data:`STRATEGIES` on one model: a row each."""
    if family == "torchvision":
        build, loss_fn, kind = (lambda: _vision(name)), image_loss, "images"
    else:
        build = hf_models()[name]
        kind = "tokens" if name != "vit" else "images"
        loss_fn = token_loss if kind == "tokens" else vit_loss
        size = 16 if name == "vit" else size
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    base = {"family": family, "model": name}
    try:
        ref = _one(build, loss_fn, kind, "naive", steps, size)
    except Exception as err:  # a model that does not run at this size, or at all
        return [{**base, "strategy": "naive", "status": "failed", "error": _short(err)}]
    rows.append({**base, "strategy": "naive", "status": "ok", "params": ref["params"]})
    rows[-1]["seconds"] = ref["seconds"]
    for label, (strategy, kw) in STRATEGIES.items():
        row = {**base, "strategy": label, "params": ref["params"]}
        try:
            if strategy == "auto":
                kw = {"memory_budget": _below_naive(build, loss_fn, kind, steps, size)}
            ours = _one(build, loss_fn, kind, strategy, steps, size, **kw)
            row.update(classify(ours, ref), status="ok", seconds=ours["seconds"])
            row.update(
                exact_states=ours["info"].get("exact_states", ""),
                chosen=ours["info"].get("chosen", ""),
            )
        except Exception as err:
            row.update(status="failed", result="failed", error=_short(err))
        rows.append(row)
    return rows


def _below_naive(build, loss_fn, kind, steps, size) -> int:
    torch.manual_seed(0)
    model = build().to(torch.float64).train()
    inner = effmaml.Adam(0.01) if kind == "tokens" else effmaml.SGD(0.01)
    preds = effmaml.MAML(model, loss_fn, inner).estimate(_batches(kind, 1, size)[0], steps)
    naive = preds["naive"].peak_bytes
    least = min(p.peak_bytes for p in preds.values())
    return (least + naive) // 2


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    if len(text) > 400:
        text = text[:400] + " ..."
    return text or traceback.format_exc(limit=1)


# -- the sweep and its report ---------------------------------------------------------------------
def _job(args: tuple[str, str, int, int]) -> list[dict[str, Any]]:
    return run_model(*args)


def write_summary(out: Path, seconds: float) -> str:
    """summary.md from zoo.csv: counts, then one line per model."""
    df = pd.read_csv(out / "zoo.csv")
    strategies = df[(df.strategy != "naive") & (df.strategy != "checkpoint_first_order_advances")]
    per_model = strategies.groupby(["family", "model"]).result.agg(
        lambda r: (
            "failed"
            if (r == "failed").any()
            else (
                "rounding"
                if (r == "rounding").any()
                else ("summation order" if (r == "summation order").any() else "bitwise")
            )
        )
    )
    naive_failed = df[(df.strategy == "naive") & (df.status == "failed")]
    counts = per_model.value_counts()
    fo = df[df.strategy == "checkpoint_first_order_advances"].set_index(["family", "model"])
    lines = [
        "# zoo: every exact strategy against naive, model by model",
        "",
        f"float64, train mode, 5 classes, 3 inner steps on distinct batches (images 2x3x64x64, "
        f"SGD 0.01; tokens 2x8, Adam 0.01), strategies {', '.join(STRATEGIES)}; "
        f"{seconds / 60:.1f} minutes on {device_name('cpu')}, torch {torch.__version__}.",
        "",
        f"Models: {len(per_model)} ran under naive"
        + (f", {len(naive_failed)} did not run at all" if len(naive_failed) else "")
        + ". Worst result over the exact strategies: "
        + ", ".join(
            f"{counts.get(k, 0)} {k}" for k in ("bitwise", "summation order", "rounding", "failed")
        )
        + ".",
        "",
        "| family | model | parameters | exact strategies | exact_states | "
        "first-order advances instead: meta-gradient rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for (family, model), result in per_model.items():
        sub = strategies[(strategies.family == family) & (strategies.model == model)]
        states = sub.exact_states.dropna()
        states = str(states.iloc[0]) if len(states) else ""
        params = int(sub.params.iloc[0]) if sub.params.notna().any() else 0
        diag = ""
        if (family, model) in fo.index:
            r = fo.loc[(family, model)]
            diag = f"{r.result} ({r.grad_rel_l2:.1e})" if r.status == "ok" else "failed"
        bad = sub[sub.result != result].strategy.tolist() if result != "bitwise" else []
        detail = (
            result
            if result == "bitwise"
            else f"{result}: "
            + ", ".join(f"{s} {r}" for s, r in zip(sub.strategy, sub.result) if r != "bitwise")
        )
        del bad
        lines.append(
            f"| {family} | {model} | {params / 1e6:.2f} M | {detail} | {states} | {diag} |"
        )
    failures = df[df.status == "failed"]
    if len(failures):
        lines += ["", "Failures:", ""]
        lines += [f"- {r.model} {r.strategy}: {r.error}" for _, r in failures.iterrows()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__)
    ap.add_argument("--max-params", type=float, default=8e6, help="torchvision models up to this")
    ap.add_argument("--models", help="comma-separated names (default: every one that fits)")
    ap.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face families")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="results/zoo")
    a = ap.parse_args(argv)
    jobs: list[tuple[str, str, int, int]] = []
    names = a.models.split(",") if a.models else None
    for name in vision_models(a.max_params):
        if names is None or name in names:
            jobs.append(("torchvision", name, a.steps, a.size))
    if not a.no_hf:
        try:
            hf = hf_models()
        except ImportError:
            hf = {}
            print("transformers is not installed (pip install -e '.[transformers]'): no HF rows")
        jobs += [("huggingface", n, a.steps, a.size) for n in hf if names is None or n in names]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    t0 = time.perf_counter()
    with open(out / "zoo.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.workers) if a.workers > 1 else _Serial() as pool:
            for rows in pool.imap_unordered(_job, jobs):
                for row in rows:
                    writer.writerow({k: row.get(k, env.get(k, "")) for k in COLUMNS})
                f.flush()
                print(
                    f"{rows[0]['model']}: "
                    + ", ".join(str(r.get("result", r["status"])) for r in rows[1:])
                )
    print(write_summary(out, time.perf_counter() - t0))


class _Serial:
    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def imap_unordered(self, fn: Callable[..., Any], jobs: list[Any]) -> Any:
        return map(fn, jobs)


if __name__ == "__main__":
    main()
