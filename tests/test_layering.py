"""DESIGN's data flow holds in the code: no stage imports a later one, and no import cycles.

Every ``import`` of a rankcut module, at module level or inside a function, is read from the source (AST)
and checked against the stage each module belongs to. A module may import its own stage or an earlier one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rankcut"

#: Stages in data-flow order (DESIGN §2): foundations, runtime modules, registries and configuration,
#: calibration and targets, the pipeline, compression, checkpoints, reports built on them, speed, CLI.
STAGES = [
    ("foundation", ["rankcut.utils", "rankcut.linalg", "rankcut.lanczos", "rankcut.dcom", "rankcut.quant", "rankcut.units",
                    "rankcut.kernels", "rankcut.cost"]),
    ("modules", ["rankcut.modules"]),
    ("registries", ["rankcut.methods", "rankcut.policies", "rankcut.config"]),
    ("calibration", ["rankcut.data", "rankcut.calibrate", "rankcut.targets", "rankcut.summary", "rankcut.record",
                     "rankcut.distributed"]),
    ("pipeline", ["rankcut.pipeline", "rankcut.factorize", "rankcut.parallel"]),
    ("compress", ["rankcut.compress", "rankcut.fuse", "rankcut.runtime", "rankcut.quantize"]),
    ("checkpoint", ["rankcut.io", "rankcut.hf", "rankcut.streaming"]),
    ("reports", ["rankcut.evaluate", "rankcut.analyze", "rankcut.sensitivity", "rankcut.search", "rankcut.sweep",
                 "rankcut.plots", "rankcut.adapters",
                 "rankcut.train", "rankcut.recover", "rankcut.report"]),
    ("speed", ["rankcut.bench"]),
    ("integrations", ["rankcut.integrations"]),
    ("cli", ["rankcut.cli", "rankcut.__main__"]),
]


def module_name(path: Path) -> str:
    parts = ["rankcut", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no stage: add it to STAGES"
    return best[0]


def is_module(name: str) -> bool:
    path = ROOT.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported rankcut module, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("rankcut")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rankcut") and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if is_module(f"{node.module}.{a.name}")]
        for name in names:
            if name != "rankcut":
                found.append((name, id(node) in top))
    return found


SOURCES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stage_imports_a_later_one(path):
    me = module_name(path)
    mine = stage_of(me)
    later = [(name, STAGES[stage_of(name)][0]) for name, _ in imports(path) if stage_of(name) > mine]
    assert not later, f"{me} ({STAGES[mine][0]}) imports later stages: {later}"


def test_no_import_cycles_at_module_level():
    graph = {module_name(p): {n for n, top in imports(p) if top} for p in SOURCES}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail + [node, nxt])}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_bench_does_not_import_the_cli():
    for path in (ROOT / "bench").glob("*.py"):
        assert not any(name.startswith("rankcut.cli") for name, _ in imports(path)), path
