"""Every Python code block in README.md and docs/ runs, and the claims that could drift are
checked against the code.

A page's blocks run in order in one namespace (a later block may use an earlier one's
names), in a scratch directory. A block preceded by ``<!-- test: skip REASON -->`` is
skipped with that reason shown; none may be skipped without one.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?:<!-- test: skip (?P<skip>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[str, str | None, int]]:
    text = page.read_text()
    return [
        (m["code"], m["skip"], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)
    ]


def test_the_pages_have_code_to_run():
    assert sum(len(blocks(p)) for p in PAGES) >= 12
    assert blocks(ROOT / "README.md")


@pytest.mark.parametrize(
    "page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    found = blocks(page)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    skipped = []
    for code, skip, line in found:
        if skip is not None:
            skipped.append(f"line {line}: {skip}")
            continue
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
    if skipped:
        pytest.skip("; ".join(skipped))


def test_the_strategy_tables_name_every_registered_strategy_and_the_probes_cost():
    """README's and the strategies page's tables list exactly effmaml.STRATEGIES, and the
    probe's evaluations there are what effmaml.probe counts."""
    import effmaml
    from effmaml.probe import PROBE_EVALS

    for page in (ROOT / "README.md", ROOT / "docs" / "strategies.md"):
        text = page.read_text()
        rows = re.findall(r"^\| `(\w+)`", text, re.M)
        assert set(rows) == set(effmaml.STRATEGIES), (page.name, rows)
        assert f"PROBE_EVALS` = {PROBE_EVALS}" in text or f"{PROBE_EVALS} more step" in text


def test_readme_stays_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    for phrase in ("this round", "issue #", "the previous round"):
        assert phrase not in text.lower(), phrase
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, page


def test_the_docstrings_state_the_probes_cost_as_counted():
    """Every docstring or comment in effmaml that gives the probe's evaluations as a number
    gives PROBE_EVALS, and says which constant it is; and no docstring uses a Sphinx role
    (``:class:`X```), which the API pages would show raw."""
    from effmaml.probe import PROBE_EVALS

    claims = []
    for path in sorted((ROOT / "effmaml").rglob("*.py")):
        text = path.read_text()
        claims += [(path.name, int(n)) for n in re.findall(r"PROBE_EVALS`*\)?\s*=\s*(\d+)", text)]
        claims += [
            (path.name, int(n))
            for n in re.findall(r"(\d+) step evaluations \(``PROBE_EVALS``\)", text)
        ]
        stale = re.findall(r"probe(?:s first|'s) \(?(\d+)\b", text)
        assert not stale, f"{path.name} states the probe's cost without PROBE_EVALS: {stale}"
        roles = re.findall(r":(?:class|attr|func|meth|data|mod|exc|obj):`[^`]+`", text)
        assert not roles, f"{path.name}: Sphinx roles show raw on the API pages: {roles[:3]}"
    assert len(claims) >= 3, claims
    assert all(n == PROBE_EVALS for _, n in claims), claims


def test_notes_are_comments_not_docstrings():
    """A ``# Note [...]`` written inside a docstring renders as a heading on the API pages;
    notes are comments, as in PyTorch."""
    import ast

    for path in sorted((ROOT / "effmaml").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node) or ""
                assert "# Note [" not in doc, f"{path.name}: {getattr(node, 'name', 'module')}"
