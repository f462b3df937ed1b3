"""The package's layers: no import cycle between its modules, the engine below everything else (pure PyTorch),
and the registry below the server (nothing in ``daemon.registry`` imports ``daemon.serving``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "daemon" / "registry"


DAEMON = REPO / "daemon"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """The ``daemon`` modules a module imports when it is imported (``if TYPE_CHECKING`` blocks included, imports
    inside functions left out: those are deliberate, deferred until the function runs)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        for sub in ast.walk(node) if isinstance(node, ast.If) else [node]:
            if isinstance(sub, ast.Import):
                names.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.add(sub.module)
                names.update(f"{sub.module}.{alias.name}" for alias in sub.names)
    return {n for n in names if n.startswith("daemon.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in DAEMON.rglob("*.py")}
    return {name: {m for m in _top_level_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycle_between_the_package_modules() -> None:
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_engine_imports_nothing_above_it() -> None:
    above = ("daemon.pipeline", "daemon.registry", "daemon.serving", "daemon.bench", "daemon.data", "daemon.cli")
    offenders = {name: sorted(m for m in deps if m.startswith(above))
                 for name, deps in _graph().items() if name.startswith("daemon.engine")}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_registry_module_imports_the_serving_layer() -> None:
    offenders = {path.name: sorted(m for m in _imported_modules(path) if m.startswith("daemon.serving"))
                 for path in sorted(PACKAGE.glob("*.py"))}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_importing_every_registry_module_loads_no_serving_module() -> None:
    modules = sorted(f"daemon.registry.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('daemon.serving')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
