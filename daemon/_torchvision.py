"""The one place that imports torchvision, so that it imports at all on CPU-only torch.

Why this module exists: every torchvision wheel on the package index is a CUDA build
(``0.28.0+cu130``). Its C extension ``_C.so`` links against ``libc10_cuda.so`` and
``libtorch_cuda.so``, which the CPU build of torch does not ship, so the extension silently fails
to load. ``torchvision/_meta_registrations.py`` then calls ``register_fake("torchvision::nms")``
unconditionally and ``import torchvision`` dies with
``RuntimeError: operator torchvision::nms does not exist``
(see ``notes/environment.md`` §2, "Fix A").

The fix is to declare the two schemas that registration needs (``nms`` and ``qnms``) before the
first import. Declaring a schema gives no kernel, so ``torchvision.ops.nms`` still raises
"Couldn't load custom C++ ops" here; the classifiers (``models``), ``transforms`` v1/v2 and
``datasets`` work, which is all unlearnd uses. ``torchvision.io`` does not work (use PIL).

We cannot "just try the import and fall back": a failed ``import torchvision`` leaves
half-initialised submodules in ``sys.modules``. So the shim decides up front:

1. the ``torchvision::nms`` operator already exists (torchvision imported, or its extension
   loaded earlier) → nothing to do;
2. otherwise try to load the extension exactly as torchvision would (``torch.ops.load_library``);
   if that works (a CUDA torch on a GPU machine, or a matching CPU build) it registers the real
   operators → nothing to do;
3. otherwise declare the schemas, each under ``try`` so a schema someone else already declared is
   not an error.

Everything is idempotent and guarded by a lock. Import torchvision only through
:func:`import_torchvision` (or the lazy ``models`` / ``transforms`` attributes of this module).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for type checkers only; at run time these come from __getattr__ below
    from torchvision import models, transforms

__all__ = ["ensure_importable", "import_torchvision", "models", "transforms"]

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LAZY_SUBMODULES = ("models", "transforms")

_lock = threading.Lock()
# The Library object must stay alive: when it is garbage-collected its definitions are removed.
# FRAGMENT (not DEF) because it may share the namespace with other definitions without conflict.
_lib: torch.library.Library | None = None
_ready = False


def _has_op(name: str) -> bool:
    # torch.ops namespaces look operators up on every access and raise AttributeError when absent.
    return hasattr(torch.ops.torchvision, name)


def _extension_path() -> Path | None:
    """torchvision's ``_C`` extension file, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(folder) / f"_C{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _try_load_extension() -> bool:
    path = _extension_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, ImportError, RuntimeError):
        return False
    return all(_has_op(name) for name in _SCHEMAS)


def _ensure_ops() -> None:
    global _lib, _ready
    with _lock:
        if _ready:
            return
        already = "torchvision" in sys.modules or all(_has_op(name) for name in _SCHEMAS)
        if already or _try_load_extension():
            _ready = True
            return
        _lib = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _SCHEMAS.items():
            if _has_op(name):
                continue
            try:
                _lib.define(schema)
            except RuntimeError:
                # Declared meanwhile by someone else in this process: that is all we need.
                if not _has_op(name):
                    raise
        _ready = True


def ensure_importable() -> None:
    """Make a later plain ``import torchvision`` work, without importing it.

    For code that imports modules we do not own (an operator's model factory, a model zoo built on
    torchvision): call this before ``importlib.import_module`` of such a module, whether or not it
    turns out to use torchvision; it is cheap and idempotent.
    """
    _ensure_ops()


def import_torchvision() -> ModuleType:
    """Import torchvision (after declaring the missing operators where needed) and return it."""
    _ensure_ops()
    return importlib.import_module("torchvision")


def __getattr__(name: str) -> ModuleType:
    # Lazy re-exports: `from daemon._torchvision import models` imports torchvision on first use.
    if name in _LAZY_SUBMODULES:
        import_torchvision()
        return importlib.import_module(f"torchvision.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
