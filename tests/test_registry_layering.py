"""The registry package sits below the server: nothing in ``daemon.registry`` imports ``daemon.serving``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "daemon" / "registry"


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
