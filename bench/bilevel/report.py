"""``make bilevel``'s summary (markdown) and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_images", "plot_schedule", "plot_weights", "summary"]

MIB = 1 << 20


def _pct(x: float, ci: float | None = None) -> str:
    return f"{100 * x:.1f}" if ci is None else f"{100 * x:.1f} ± {100 * ci:.1f}"


def summary(
    distill: list[dict],
    schedule: list[dict],
    sched: dict[str, Any],
    clean: dict,
    memory: list[dict],
    env: dict,
    cfg: Any,
) -> str:
    """The three tables, the memory table and the published figures beside them."""
    lines = [
        "# Bilevel problems: exact hypergradients through long unrolls, on real data",
        "",
        f"{env['device']}, torch {env['torch']}, {env['threads']} threads, git {env['git']}, "
        f"{env['date']}; {env['minutes']:.1f} minutes (`make bilevel`). Every hypergradient "
        f'goes through every inner step exactly (`strategy="checkpoint"`: naive\'s to float '
        f"rounding, in the memory of a few states); nothing is truncated or first-order.",
        "",
        "## Dataset distillation: 10 learned 8x8 images (scikit-learn's digits)",
        "",
        f"An MLP (64-128-10) trained by SGD for N steps on 10 learned images (one per "
        f"class) at N learned rates, scored on the 497 held-out real test digits; "
        f"{len(cfg.seeds)} distillation seeds (mean ± 95% interval over them). fixed: one "
        f"initialisation, learned for and scored from; random: a new one every outer step, "
        f"scored from 10 never seen. Baselines trained the same way at the best of a grid "
        f"of constant rates (chosen on 300 validation digits): 10 random real training "
        f"images (mean of {cfg.draws} draws), the 10 class means, all 1,000 training "
        f"digits (full batch, N steps). Test accuracy, %:",
        "",
        "| N | init | outer steps | distilled | 10 random real | class means | full train |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in distill:
        lines.append(
            f"| {r['steps']} | {r['init']} | {r['outer_steps']} | "
            f"{_pct(r['distilled'], r['distilled_ci'])} | {_pct(r['random_real'])} | "
            f"{_pct(r['class_means'])} | {_pct(r['full_train'])} |"
        )
    lines += [
        "",
        "Published, beside and not comparable in absolute terms (MNIST at 28x28, LeNet, "
        "Wang et al. 2018, Table 1): fixed init, 10 images, 93.8%; random init, 100 "
        "images, 79.5 ± 8.1%.",
        "",
        "![the learned images](distilled.png)",
        "",
        "Memory of one outer step (fresh process, peak resident bytes above the start) and "
        "the meta-gradient (images, rates, initialisation) against naive's:",
        "",
        "| N | strategy | peak (MiB) | predicted (MiB) | rel. L2 vs naive |",
        "|---|---|---|---|---|",
    ]
    for r in memory:
        lines.append(
            f"| {r['steps']} | {r['strategy']} | {r['peak'] / MIB:.1f} | "
            f"{r['predicted'] / MIB:.1f} | {r['rel_l2_vs_naive']:.1e} |"
        )
    starts = sched["starts"]
    n = len(sched["per_step"])
    lines += [
        "",
        f"## A learning rate by hypergradient through {n} SGD steps (MNIST-1D)",
        "",
        f"An MLP (40-100-100-10) trained by SGD for {n} steps on minibatches of 100 of "
        f"MNIST-1D's training signals; the outer objective is the loss on 500 validation "
        f"signals after the last step; Adam on the log-rate, {len(next(iter(starts.values())))} "
        f"outer steps, a new initialisation and minibatch sequence each.",
        "",
        "| start | after 1/4 | after 1/2 | final |",
        "|---|---|---|---|",
    ]
    for s, h in starts.items():
        lines.append(f"| {s} | {h[len(h) // 4]:.3f} | {h[len(h) // 2]:.3f} | {h[-1]:.3f} |")
    grid = ", ".join(f"{k}: {100 * v:.1f}" for k, v in sched["grid"].items())
    lines += [
        "",
        "In Greydanus's notebook (his MLP and training setup, not this one) starts of 1.5 "
        "and 0.15 both converged to about 0.62.",
        "",
        f"Then one rate per step ({n} of them), started from the mean of the two learned "
        f"constants, against the best constant of a grid (validation accuracy, %: {grid}). "
        f"Test accuracy after {n} steps from {len(cfg.schedule_seeds)} unseen "
        f"initialisations and minibatch sequences, %:",
        "",
        "| schedule | test accuracy |",
        "|---|---|",
    ]
    for r in schedule:
        lines.append(f"| {r['schedule']} | {_pct(r['test_acc'], r['ci'])} |")
    lines += [
        "",
        "![the rates](schedule.png)",
        "",
        "## Data hyper-cleaning (MNIST-1D, half the labels flipped)",
        "",
        f"{cfg.clean_train} training signals, half relabelled (seeded) to another class; one "
        f"weight per example (sigmoid of a learned logit) in the inner loss; {cfg.clean_steps} "
        f"full-batch SGD steps of an MLP (40-100-10); the outer objective is the loss on "
        f"1,000 clean validation signals; {clean['outer_steps']} outer steps of Adam "
        f"(validation loss {clean['val_loss_first']:.3f} -> {clean['val_loss_last']:.3f}). "
        f"Test accuracy of fresh networks trained the same way, %, 3 initialisations:",
        "",
        "| learned weights | uniform (noisy labels) | clean examples only (oracle) |",
        "|---|---|---|",
        f"| {_pct(clean['learned_acc'], clean['learned_ci'])} | "
        f"{_pct(clean['noisy_acc'], clean['noisy_ci'])} | "
        f"{_pct(clean['oracle_acc'], clean['oracle_ci'])} |",
        "",
        f"The lowest-weighted half called flipped: precision {clean['precision']:.3f}, recall "
        f"{clean['recall']:.3f}, F1 {clean['f1']:.3f} (chance: 0.5).",
        "",
        "![the learned weights](weights.png)",
        "",
        "## Shrunk against the papers",
        "",
        "- Distillation: 8x8 digits and an MLP where Wang et al. use 28x28 MNIST and "
        "LeNet; one pass of N steps over the 10 images (they also use several epochs); "
        "tens of outer steps where they use thousands.",
        "- Schedule: 200 inner steps as in Greydanus's experiment, tens of outer steps.",
        f"- Hyper-cleaning: {cfg.clean_train} training examples where Franceschi et al. use "
        "5,000 MNIST digits, an MLP where they use a linear model (on MNIST-1D a linear "
        "model learns little), tens of outer steps.",
    ]
    return "\n".join(lines) + "\n"


def plot_images(images: dict, path: Path) -> None:
    """The learned images, a row per (N, init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(images)
    fig, axes = plt.subplots(len(keys), 10, figsize=(10, 1.1 * len(keys) + 0.3), squeeze=False)
    for i, key in enumerate(keys):
        for c in range(10):
            ax = axes[i][c]
            ax.imshow(
                images[key][c].reshape(8, 8).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"N={key[0]}\n{key[1]}", fontsize=8)
            if i == 0:
                ax.set_title(str(c), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_schedule(sched: dict, path: Path) -> None:
    """The learned constant per outer step from both starts, and the per-step schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    for start, h in sched["starts"].items():
        a.plot(h, label=f"start {start}")
    a.axhline(sched["best"], color="gray", ls="--", label=f"best grid constant {sched['best']}")
    a.set_xlabel("outer step")
    a.set_ylabel("learned rate")
    a.set_yscale("log")
    a.legend(fontsize=8)
    b.plot(sched["per_step"])
    b.set_xlabel("inner step")
    b.set_ylabel("learned rate")
    b.set_title("one rate per step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_weights(weights: torch.Tensor, flipped: torch.Tensor, path: Path) -> None:
    """Histograms of the learned weights, flipped against clean examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(weights[~flipped].tolist(), bins=bins, alpha=0.6, label="clean")
    ax.hist(weights[flipped].tolist(), bins=bins, alpha=0.6, label="flipped")
    ax.set_xlabel("learned weight")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
