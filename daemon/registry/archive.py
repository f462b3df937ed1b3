"""Weight-only swaps: tell when a TorchScript archive differs from a loaded one only in its tensor data.

A new version published by an unlearning round usually has the architecture of the one serving and new
weights. Loading its TorchScript afresh (deserialise, compile, profile, optimise) costs tens of
milliseconds of CPU; copying its weights into a copy of the module already serving costs a fraction of one,
and the copy shares the compiled, already-optimised code of its type, so it needs no warm-up.

That is only sound when the two archives describe the same computation. ``read_layout`` reads a
``torch.jit.save`` archive (a zip) without deserialising it and returns

* ``signature``: a digest of everything in the archive except the bytes of its tensor storages — the code
  of every class, the module tree and its attributes (``data.pkl``, which also gives every tensor's storage,
  dtype, offset, shape and strides), the constants and their tensors, the format version. Class names are
  replaced by their order of first appearance in the module tree, because ``torch.jit.trace`` gives
  each trace in a process fresh names (``___torch_mangle_N``) for the same classes; the renaming is
  one-to-one, so equal signatures mean the same classes with the same code in the same tree.
* ``tensors``: for each storage, the attribute path of a tensor that uses it.

Two archives with equal signatures give modules that differ only in the contents of their storages, so
loading the second is the same as copying its storages into a copy of the first (``copy_storages``).
Anything this reader does not understand (an unknown pickled global, code outside classes, a class name
not in the tree) gives ``None``: the caller then loads the archive in full.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["ArchiveLayout", "copy_state", "copy_storages", "pt2_layout", "read_layout"]

# A pickle GLOBAL opcode naming a TorchScript class: b"c" module "\n" name "\n".
_PKL_CLASS = re.compile(rb"c(__torch__(?:\.[A-Za-z_]\w*)*)\n([A-Za-z_]\w*)\n")
# A class reference in TorchScript code: __torch__.<module path>.<Class>.
_CODE_REF = re.compile(rb"__torch__(?:\.[A-Za-z_]\w*)+")
_CLASS_LINE = re.compile(rb"^class ([A-Za-z_]\w*)\b", re.MULTILINE)
# Entries that do not take part in the computation: debug source ranges, a per-save random id, and the
# example inputs torch.jit.trace records.
_IGNORED = re.compile(r"(.*\.debug_pkl|\.data/serialization_id|traced_inputs\.pkl|traced_inputs/.*)")
_STORAGE = re.compile(r"data/([0-9]+)")


class _NotUnderstood(Exception):
    pass


@dataclass(frozen=True)
class ArchiveLayout:
    """What ``read_layout`` found: see the module docstring."""

    signature: str
    tensors: tuple[tuple[str, tuple[str, ...]], ...]   # (storage key, attribute path of a tensor using it)
    entries: tuple[tuple[str, int, int, int], ...]     # (storage key, data offset in the file, bytes, CRC-32)


# -- reading data.pkl without torch: which tensor (attribute path) uses which storage ----------------------
class _Obj:
    """A TorchScript object of the module tree (a module); its attributes arrive through BUILD."""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise _NotUnderstood(f"object state is a {type(state).__name__}")
        self.__dict__["attrs"] = state


@dataclass(frozen=True)
class _StorageRef:
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, *rest: object) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise _NotUnderstood("tensor without a storage")
    return _TensorRef(storage)


class _TreeUnpickler(pickle.Unpickler):
    """Rebuilds the module tree of ``data.pkl`` from the few globals TorchScript uses; refuses others."""

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            return _Obj
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise _NotUnderstood(f"pickled global {module}.{name}")

    def persistent_load(self, pid: object) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise _NotUnderstood(f"persistent id {pid!r}")
        return _StorageRef(pid[2], pid[4])


def _tensor_paths(root: object) -> dict[str, tuple[str, ...]]:
    """Storage key -> the attribute path of the first tensor (in tree order) that uses it."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(obj: object, path: tuple[str, ...]) -> None:
        if isinstance(obj, _TensorRef):
            found.setdefault(obj.storage.key, path)
        elif isinstance(obj, _Obj):
            for name, value in obj.__dict__.get("attrs", {}).items():
                walk(value, (*path, str(name)))
        elif isinstance(obj, (list, tuple)):
            # a tensor inside a container attribute has no attribute path to write through
            if any(isinstance(v, (_TensorRef, _Obj)) for v in obj):
                raise _NotUnderstood("tensor or module inside a container attribute")
        elif isinstance(obj, dict):
            if any(isinstance(v, (_TensorRef, _Obj)) for v in obj.values()):
                raise _NotUnderstood("tensor or module inside a dict attribute")

    if not isinstance(root, _Obj):
        raise _NotUnderstood("data.pkl does not hold a module")
    walk(root, ())
    return found


# -- the signature ------------------------------------------------------------------------------------------
def _canonical_code(text: bytes, ids: dict[bytes, bytes]) -> bytes:
    def sub(match: re.Match[bytes]) -> bytes:
        ref = match.group(0)
        if ref not in ids:
            raise _NotUnderstood(f"code refers to {ref.decode(errors='replace')}, not in the module tree")
        return ids[ref]

    return _CODE_REF.sub(sub, text)


def read_layout(data: bytes) -> ArchiveLayout | None:
    """The layout of a ``torch.jit.save`` archive, or ``None`` if it is not one this module understands."""
    try:
        return _read_layout(data)
    except (_NotUnderstood, zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, EOFError,
            UnicodeDecodeError, TypeError, AttributeError, IndexError):
        return None


def _read_layout(data: bytes) -> ArchiveLayout:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1:
            raise _NotUnderstood("not one archive folder")
        root = roots.pop() + "/"
        entries = {i.filename[len(root):]: i for i in infos}
        tree_pkl = zf.read(entries["data.pkl"])
        # Class -> canonical id, by first appearance in the module tree.
        ids: dict[bytes, bytes] = {}
        for match in _PKL_CLASS.finditer(tree_pkl):
            qualname = match.group(1) + b"." + match.group(2)
            ids.setdefault(qualname, b"__torch__.C%d" % len(ids))
        paths = _tensor_paths(_TreeUnpickler(io.BytesIO(tree_pkl)).load())

        def canonical_pkl(raw: bytes) -> bytes:
            return _PKL_CLASS.sub(lambda m: b"c" + ids[m.group(1) + b"." + m.group(2)] + b"\n", raw)

        parts: dict[str, bytes] = {"data.pkl": canonical_pkl(tree_pkl)}
        storages: dict[str, tuple[str, int]] = {}
        for name, info in entries.items():
            if info.is_dir() or name == "data.pkl" or _IGNORED.fullmatch(name):
                continue
            storage = _STORAGE.fullmatch(name)
            if storage:
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise _NotUnderstood(f"{name} is compressed")
                # where the bytes start: after the local header, whose extra field is torch's padding
                local = info.header_offset
                if data[local:local + 4] != b"PK\x03\x04":
                    raise _NotUnderstood(f"{name}: no local header")
                start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + \
                    int.from_bytes(data[local + 28:local + 30], "little")
                if start + info.file_size > len(data):
                    raise _NotUnderstood(f"{name}: runs past the end of the file")
                storages[storage.group(1)] = (start, info.file_size, info.CRC)
                continue
            raw = zf.read(info)
            if name.startswith("code/") and name.endswith(".py"):
                module = b".".join(name[len("code/"):-len(".py")].encode().split(b"/"))
                starts = list(_CLASS_LINE.finditer(raw))
                if not starts or raw[:starts[0].start()].strip():
                    raise _NotUnderstood(f"{name}: code outside classes")
                for k, start in enumerate(starts):
                    block = raw[start.start():starts[k + 1].start() if k + 1 < len(starts) else len(raw)]
                    qualname = module + b"." + start.group(1)
                    if qualname not in ids:
                        raise _NotUnderstood(f"class {qualname.decode()} is not in the module tree")
                    parts["class " + ids[qualname].decode()] = _canonical_code(block, ids)
            elif name == "constants.pkl":
                parts[name] = canonical_pkl(raw)
            else:                           # constants/N, version, byteorder, extra files: byte for byte
                parts[name] = raw
        if set(paths) != set(storages):
            raise _NotUnderstood("storages and the tensors of the module tree do not match")
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(b"%d:%s%d:" % (len(name), name.encode(), len(parts[name])))
        digest.update(parts[name])
    for key in sorted(storages):
        digest.update(b"storage %s %d;" % (key.encode(), storages[key][1]))
    return ArchiveLayout(
        signature=digest.hexdigest(),
        tensors=tuple(sorted(paths.items())),
        entries=tuple((key, *where) for key, where in sorted(storages.items())),
    )


# -- copying ------------------------------------------------------------------------------------------------
def _attribute(module: torch.jit.ScriptModule, path: tuple[str, ...]) -> torch.Tensor:
    obj: object = module
    for name in path:
        obj = getattr(obj, name)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{'.'.join(path)} is a {type(obj).__name__}, not a tensor")
    return obj


def copy_storages(module: torch.jit.ScriptModule, layout: ArchiveLayout, data: bytes | bytearray, *,
                  check_crc: bool = True) -> None:
    """Overwrite every storage of ``module`` with the archive's bytes for it (``data``: the archive).

    ``module`` must have been loaded from an archive with ``layout.signature`` (or be a copy of one), and
    must not be serving: nothing else may read it while it is written. Each storage's bytes are checked
    against the CRC-32 the zip records for them first, as reading the entry would (``check_crc=False``: the
    caller has checked them in these very bytes already).
    """
    paths = dict(layout.tensors)
    view = memoryview(data)
    targets = []
    for key, start, size, crc in layout.entries:
        target = _attribute(module, paths[key]).untyped_storage()
        if target.nbytes() != size:
            raise ValueError(f"storage {key}: {target.nbytes()} bytes in the module, {size} in the archive")
        if check_crc and zlib.crc32(view[start:start + size]) != crc:
            raise ValueError(f"storage {key}: bad CRC-32")
        targets.append((target, start, size))
    with torch.no_grad(), warnings.catch_warnings():
        # read-only source: torch warns that the tensor over it is not writable; it is only read
        warnings.filterwarnings("ignore", message=r".*non-writable", category=UserWarning)
        for target, start, size in targets:
            if size:
                target.copy_(torch.frombuffer(view[start:start + size], dtype=torch.uint8).untyped_storage())


# -- torch.export archives (model.pt2) ---------------------------------------------------------------------
# Entries of a torch.export.save archive that carry no computation: the weights' bytes (their names, dtypes
# and shapes are in model_weights_config.json, which is signed), a per-save random id, the example inputs.
_PT2_IGNORED = re.compile(r"[^/]+/(data/weights/weight_[0-9]+|\.data/serialization_id|data/sample_inputs/.*)")


def pt2_layout(data: bytes | bytearray) -> ArchiveLayout | None:
    """The layout of a ``torch.export`` archive: a signature over everything but its weights' bytes.

    Two ``model.pt2`` with equal signatures run the same graph on tensors of the same names and shapes, so
    the second is served by copying its weights (``model.safetensors``, which ``daemon.registry.trust``
    checked it agrees with) into a copy of the first. ``None``: not a zip archive (load it in full, which
    refuses it).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
            digest = hashlib.sha256(b"pt2\0")
            for name in sorted(archive.namelist()):
                if _PT2_IGNORED.fullmatch(name):
                    continue
                digest.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
        return None
    return ArchiveLayout(signature="pt2:" + digest.hexdigest(), tensors=(), entries=())


def copy_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s same-named parameters and buffers, shapes equal. Every name of ``state``
    must be the module's; the module's others are the graph's constants (signed with its layout)."""
    targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ValueError(f"the module has no tensor {unknown[:3]}")
    for key, value in state.items():
        if targets[key].shape != value.shape:
            raise ValueError(f"tensor {key!r} is {tuple(value.shape)}, the module's {tuple(targets[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)
