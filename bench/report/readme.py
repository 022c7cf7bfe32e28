"""The README's results block, between its markers, from the summaries under results/."""

from __future__ import annotations

from pathlib import Path

__all__ = ["END", "START", "update_readme"]


START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: Path | str = "README.md", root: Path | str = "results") -> bool:
    """Put every ``results/<preset>/summary.md`` and its memory plot between the markers."""
    readme, root = Path(readme), Path(root)
    if not readme.exists():
        return False
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    parts = []
    # what a newcomer reproduces first (make bench on a CPU), the claims, the GPU sweep,
    # then the rest by name
    first = ["cpu-quick", "claims", "resnet18-224"]

    def name(p: Path) -> str:
        return p.stem if p.name == "claims.md" else p.parent.name

    summaries = sorted(
        [*root.glob("*/summary.md"), *root.glob("claims.md")],
        key=lambda p: (first.index(name(p)) if name(p) in first else len(first), name(p)),
    )
    for summary in summaries:
        body = summary.read_text().strip()
        if body.startswith("# "):
            body = body.replace("# ", "### ", 1)
        elif not body.startswith("#"):
            body = f"### {summary.parent.name}\n\n{body}"
        parts += [body, ""]
        for png in ("memory_vs_steps.png", "tradeoff.png", "loss_vs_steps.png"):
            if (summary.parent / png).exists():
                parts += [f"![{png[:-4]}]({summary.parent / png})", ""]
    block = "\n".join([START, *parts, END]) if parts else f"{START}\n{END}"
    head, rest = text.split(START, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])
    return True
