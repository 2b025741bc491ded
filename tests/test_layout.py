"""The floors of src/torchslim (docs/ARCHITECTURE.md): arrows point down, no import cycle, short files.

Imports are read from the source (every ``import``/``from`` statement, inside functions too), so a
cycle dodged by a function-level import still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "torchslim"

# Bottom to top. A module may import its own floor's modules and any floor below, never above.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "_deprecate", "_files", "_select", "_inputs", "layers", "macs"),
    ("models", "data", "comm", "structure"),
    ("regularize",),
    ("surgery",),
    ("deploy",),
    ("__init__",),  # the public API: the core's façade
    ("train",),
    ("cli", "__main__"),
)
APP = ("train", "cli", "__main__")
LONG_FILES: dict[str, str] = {}  # file -> why it may be longer than MAX_LINES for now
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """``{"torchslim.structure.groups": path, "torchslim.models": .../models/__init__.py, ...}``."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The torchslim modules ``path`` imports: ``from pkg import sub`` names the submodule where one exists."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torchslim")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchslim"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {node.module}
    return {m for m in found if m in modules}


def _floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module} is on no floor: add its package to FLOORS and to docs/ARCHITECTURE.md")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_import_points_down(graph):
    up = [f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
          for a, deps in graph.items() for b in deps if _floor(b) > _floor(a)]
    assert not up, "imports pointing up:\n" + "\n".join(sorted(up))


def test_core_never_imports_the_app(graph):
    core = [m for m in graph if _floor(m) < FLOORS.index(("train",))]
    bad = [f"{a} imports {b}" for a in core for b in graph[a] if _floor(b) >= FLOORS.index(("train",))]
    assert not bad, "\n".join(bad)
    assert all(top in sum(FLOORS, ()) for top in APP)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle(graph):
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_FILES), f"files over {MAX_LINES} lines: {long}"
