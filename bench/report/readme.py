"""README.md's headline results and results/README.md's full tables, from the summaries
under results/ (what ``make report`` writes)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["END", "HEADLINE", "START", "headline_block", "update_readme", "write_index"]


START, END = "<!-- results:start -->", "<!-- results:end -->"
# README's headline: what a newcomer reproduces first (make bench on a CPU), the seed's
# claims, the GPU sweep, the daily few-shot workload; each with its summary's first table
HEADLINE = ("cpu-quick", "claims", "resnet18-224", "fewshot-speed")
_PLOTS = ("memory_vs_steps.png", "tradeoff.png", "loss_vs_steps.png")


def _summaries(root: Path) -> list[tuple[str, Path]]:
    """(name, path) of every summary, the headline's first, then the rest by name."""
    found = [(p.parent.name, p) for p in root.glob("*/summary.md")]
    if (root / "claims.md").exists():
        found.append(("claims", root / "claims.md"))

    def key(item: tuple[str, Path]) -> tuple[int, str]:
        name = item[0]
        return (HEADLINE.index(name) if name in HEADLINE else len(HEADLINE), name)

    return sorted(found, key=key)


def _body(name: str, path: Path) -> str:
    body = path.read_text().strip()
    if body.startswith("# "):
        return body.replace("# ", "### ", 1)
    return body if body.startswith("#") else f"### {name}\n\n{body}"


def _first_table(name: str, path: Path) -> str:
    """The summary's heading, its first paragraph and its first table."""
    lines = path.read_text().strip().splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else name
    rest = lines[1:] if lines and lines[0].startswith("#") else lines
    start = next((i for i, ln in enumerate(rest) if ln.startswith("|")), None)
    # what precedes the table: the set-up and machine, the run's git revision and date
    before = rest[:start] if start is not None else rest[:1]
    para = "\n\n".join(ln for ln in before if ln.strip() and not ln.startswith("#"))
    table: list[str] = []
    if start is not None:
        for ln in rest[start:]:
            if not ln.startswith("|"):
                break
            table.append(ln)
    out = [f"### {title}", ""]
    if para:
        out += [para, ""]
    return "\n".join([*out, *table])


def _distillation_line(root: Path) -> str:
    """One line on ``make bilevel``'s distillation table (its longest horizon), or ""."""
    import csv

    path = root / "bilevel" / "distill.csv"
    if not path.exists():
        return ""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    n = max(int(r["steps"]) for r in rows)
    at = {r["init"]: r for r in rows if int(r["steps"]) == n}

    def pct(row: dict, key: str) -> str:
        return f"{100 * float(row[key]):.1f}%"

    parts = [
        f"{init} init {pct(r, 'distilled')} (10 random real images: {pct(r, 'random_real')}, "
        f"class means {pct(r, 'class_means')}, all 1,000: {pct(r, 'full_train')})"
        for init, r in at.items()
    ]
    return (
        f"**Dataset distillation, exact through N = {n} steps** (`make bilevel`, scikit-learn's "
        f"real digits): 10 learned 8x8 images train an MLP to " + "; ".join(parts) + " on the "
        f"held-out test digits; [the tables]({(root / 'bilevel' / 'summary.md').as_posix()})."
    )


def _omniglot_read(folder: Path) -> tuple[dict[tuple[str, str], float], list[dict]]:
    """A ``bench.omniglot`` report's mean error % on the 20 runs per (method, set) (the
    baselines with set "") and its results.csv rows."""
    import csv

    errors: dict[tuple[str, str], list[float]] = {}
    with open(folder / "values.csv") as f:
        for r in csv.DictReader(f):
            if r["score"] == "runs":
                errors.setdefault((r["method"], r["set"]), []).append(float(r["value"]))
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: sum(v) / len(v) for k, v in errors.items()}, rows


def _seeds(rows: list[dict], sets: list[str], sep: str = " / ") -> str:
    """``"3 / 1"``: how many seeds each set's jobs ran."""
    return sep.join(str(len({r["seed"] for r in rows if r["set"] == s})) for s in sets)


def _omniglot_longer(folder: Path, sets: list[str]) -> list[str]:
    """``"MAML alone at 16 CPU-minutes (1/1 seeds) 27.5% / 24.5%"`` for each run in a
    subfolder of ``folder`` with its own report (``summary.md``: the main run's chosen
    values at another budget), error % on the 20 runs per set."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if (p / "summary.md").exists()):
        mean, rows = _omniglot_read(sub)
        methods = sorted({r["method"] for r in rows})
        budgets = {float(r["budget_cpu_s"]) for r in rows}
        if len(methods) != 1 or len(budgets) != 1:
            continue
        m = methods[0]
        cells = " / ".join(f"{mean[m, s]:.1f}%" if (m, s) in mean else "—" for s in sets)
        out.append(
            f"{_NAMES.get(m, m)} alone at {budgets.pop() / 60:g} CPU-minutes "
            f"({_seeds(rows, sets, '/')} seeds) {cells}"
        )
    return out


def _omniglot_line(root: Path) -> str:
    """One line on ``make fewshot-omniglot``'s 20 runs (error % per method and minimal
    set at the stated CPU budget, the MHD baseline and the published figures), or ""."""
    folder = root / "fewshot-omniglot"
    if not (folder / "values.csv").exists():
        return ""
    mean, rows = _omniglot_read(folder)
    budgets = {float(r["budget_cpu_s"]) for r in rows}
    sets = sorted({s for _, s in mean if s})
    learned = sorted(
        {m for m, s in mean if s and all((m, t) in mean for t in sets)},
        key=lambda m: max(mean[m, s] for s in sets),
    )

    def cell(method: str) -> str:
        return " / ".join(f"{mean[method, s]:.1f}%" for s in sets)

    best = learned[0]
    mhd = mean.get(("mhd", ""), float("nan"))
    below = [m for m in learned if all(mean[m, s] < mhd for s in sets)]
    verdict = (
        f"; {len(below)} of our {len(learned)} methods are below it on both sets"
        if below
        else "; no learned method beats it at this budget"
    )
    parts = [f"{_NAMES.get(m, m)} {cell(m)}" for m in ("maml",) if m in learned and m != best]
    parts += _omniglot_longer(folder, sets)
    budget = " / ".join(f"{b / 60:g}" for b in sorted(budgets))
    return (
        f"**Real Omniglot, Lake et al.'s 20 one-shot runs** (`make fewshot-omniglot`, "
        f"20-way within an unseen alphabet; every method meta-trained for {budget} "
        f"CPU-minutes per seed on each 5-alphabet minimal set "
        f"({' / '.join(s.removeprefix('omniglot-') for s in sets)}; "
        f"{_seeds(rows, sets)} seeds), hyperparameters "
        f"chosen on validation characters): error, best of ours {_NAMES.get(best, best)} "
        f"{cell(best)}" + "".join(f", {p}" for p in parts) + f"; the dataset's own MHD "
        f"baseline {mhd:.1f}%{verdict}; people 4.5%, BPL 3.3% (Lake et al. 2015, 30 "
        f"background alphabets); "
        f"[the tables]({(folder / 'summary.md').as_posix()})."
    )


_NAMES = {"maml": "MAML", "mamlpp": "MAML++", "first_order": "first-order MAML",
          "implicit": "iMAML", "protonet": "ProtoNets", "random": "random init"}  # fmt: skip


def _horizons_line(root: Path) -> str:
    """One line on ``make horizons``: exact against truncated hypergradients (its raw
    data), or ""."""
    import json

    path = root / "horizons" / "raw.json"
    if not path.exists():
        return ""
    from ..horizons.report import headline

    link = (root / "horizons" / "summary.md").as_posix()
    return f"{headline(json.loads(path.read_text()))}; [the tables]({link})."


def _learned_optimizer_line(root: Path) -> str:
    """One line on ``make learned-optimizer`` (its raw data), or ""."""
    import json

    path = root / "learned-optimizer" / "raw.json"
    if not path.exists():
        return ""
    from ..learned_optimizer.report import headline

    link = (root / "learned-optimizer" / "summary.md").as_posix()
    return f"{headline(json.loads(path.read_text()))}; [the tables]({link})."


def headline_block(root: Path | str = "results") -> str:
    """README's block: the headline summaries' first tables and plots, and a pointer to
    results/README.md for the rest."""
    root = Path(root)
    parts = [START, ""]
    for name, path in _summaries(root):
        if name not in HEADLINE:
            continue
        parts += [_first_table(name, path), ""]
        png = path.parent / "memory_vs_steps.png"
        if name == "cpu-quick" and png.exists():
            parts += [f"![{name}: peak memory vs inner steps]({png.as_posix()})", ""]
    lines = (
        _omniglot_line(root),
        _distillation_line(root),
        _horizons_line(root),
        _learned_optimizer_line(root),
    )
    for line in lines:
        if line:
            parts += [line, ""]
    parts += [
        "Every preset's full tables, targets and runs that did not finish: "
        f"[{root}/README.md]({root}/README.md).",
        "",
        END,
    ]
    return "\n".join(parts)


def write_index(root: Path | str = "results") -> Path:
    """results/README.md: every summary in full, with its plots."""
    root = Path(root)
    parts = [
        "# Results",
        "",
        "Every table below is generated by `make report` from the committed CSVs beside it; "
        "each names the machine it was measured on.",
        "",
    ]
    for name, path in _summaries(root):
        parts += [_body(name, path), ""]
        for png in _PLOTS:
            if (path.parent / png).exists():
                rel = (path.parent / png).relative_to(root).as_posix()
                parts += [f"![{name}: {png[:-4]}]({rel})", ""]
    out = root / "README.md"
    out.write_text("\n".join(parts))
    return out


def update_readme(readme: Path | str = "README.md", root: Path | str = "results") -> bool:
    """Replace README's block between the markers by :func:`headline_block` and write
    results/README.md; False (README untouched) if README or its markers are missing."""
    readme = Path(readme)
    write_index(root)
    if not readme.exists():
        return False
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    readme.write_text(head + headline_block(root) + rest.split(END, 1)[1])
    return True
