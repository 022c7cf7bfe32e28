"""The package's shape: layers import only downward; warnings point at the user's line."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import effmaml

from .helpers import ce_loss, make_batch, make_model

ROOT = Path(effmaml.__file__).parent

# every module of effmaml, bottom first: a module may import only modules before it
ORDER = [
    "measure",
    "memory",
    "replay",
    "clip",
    "inner",
    "optim",
    "learned",
    "checks",
    "notices",
    "checkpoints",
    "tasks",
    "episodes",
    "omniglot",
    "state",
    "substitutes",
    "module",
    "outer",
    "sources",
    "problem",
    "step",
    "perstep",
    "diagnose",
    "engine",
    "schedules",
    "costs",
    "offload",
    "probe",
    "watch",
    "strategies.base",
    "strategies.scheduled",
    "strategies.naive",
    "strategies.first_order",
    "strategies.checkpoint",
    "strategies.revolve",
    "strategies.offload",
    "strategies.implicit",
    "strategies.truncated",
    "strategies.auto",
    "strategies",
    "adapted",
    "maml",
    "distributed",
    "preemption",
    "runlog",
    "curriculum",
    "train",
    "",  # effmaml/__init__.py
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """effmaml modules ``path`` imports anywhere (function bodies included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("effmaml"):
                target = node.module.removeprefix("effmaml").lstrip(".")
            else:
                continue
            if node.module is None:  # from . import x
                found |= {".".join(filter(None, [target, a.name])) for a in node.names}
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("effmaml."):
                    found.add(a.name.removeprefix("effmaml."))
    return found


def test_every_module_is_placed():
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    assert modules == set(ORDER), modules ^ set(ORDER)


# the package front (effmaml/__init__.py) imports lazily: test_the_front_imports_nothing_eagerly
@pytest.mark.parametrize(
    "path", [p for p in sorted(ROOT.rglob("*.py")) if _module_name(p)], ids=_module_name
)
def test_layers_import_only_downward(path):
    name = _module_name(path)
    rank = ORDER.index(name)
    for target in _imports(path):
        assert target in ORDER, f"{name} imports unknown {target}"
        assert ORDER.index(target) < rank, f"{name} imports {target}, which is not below it"


def test_the_front_imports_nothing_eagerly():
    """effmaml/__init__.py loads its names on first use: outside ``if TYPE_CHECKING`` it
    imports no effmaml module, so importing one layer loads only the layers under it."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    eager = [
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and (getattr(node, "level", 0) or "effmaml" in ast.unparse(node))
    ]
    assert eager == [], [ast.unparse(n) for n in eager]
    assert any(isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING" for n in tree.body)


def test_importing_the_memory_model_loads_no_strategy():
    code = (
        "import sys, effmaml.memory, effmaml.costs; "
        "print([m for m in sys.modules if m.startswith(('effmaml.strategies', 'effmaml.maml'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_strategy_warnings_point_at_the_users_line():
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    maml = effmaml.MAML(make_model(), ce_loss, effmaml.SGD(lr), "first_order")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maml.adapt(make_batch(0), steps=2)  # the line the warning must name
    (w,) = [w for w in caught if "learned inner" in str(w.message)]
    assert w.filename == __file__, w.filename


def test_the_suite_runs_deterministic_cublas():
    """conftest turns on deterministic algorithms and pytest turns warnings into errors;
    on CUDA, cuBLAS warns without a fixed workspace unless this is set before CUDA starts."""
    import os

    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


def test_the_wheel_ships_effmaml_alone():
    """Every package of effmaml and nothing else: bench/ (pandas, matplotlib, the peers)
    runs from the source tree, where `make` and the tests run it."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    shipped = sorted(config["tool"]["setuptools"]["packages"])
    found = sorted(
        ".".join(("effmaml", *d.relative_to(ROOT).parts))
        for d in [ROOT, *ROOT.rglob("*")]
        if d.is_dir() and (d / "__init__.py").exists()
    )
    assert shipped == found
