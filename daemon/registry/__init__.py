"""The on-disk model registry (contract §4): one directory per model, one per version, Triton-compatible.

Layout::

    <registry>/<model>/config.pbtxt                 Triton configuration (platform "pytorch_libtorch")
    <registry>/<model>/labels.txt                   class names, one a line (Triton's label_filename; models
                                                    published through model_store)
    <registry>/<model>/<version>/model.pt           TorchScript, CPU, float32 NCHW in [0, 1] -> logits
    <registry>/<model>/<version>/model.pt2          the same as a torch.export archive, where the model exports
    <registry>/<model>/<version>/model.safetensors  the state dict
    <registry>/<model>/<version>/manifest.json      provenance and the sha256 of every other file
    <registry>/<model>/LATEST                       the current version number

Why it is shaped this way:

* A receipt says "request R is forgotten in version V with sha256 S". That promise only holds if a
  version directory can never be seen half-written and never changes afterwards, so a version is built
  in a hidden temporary sibling (``.tmp-<uuid>``), every file and the directory are fsynced, and only
  then is it renamed to its number. A crash leaves either the whole version or an invisible temporary
  (``clean_temporaries`` removes it at the next start).
* ``LATEST`` is what the daemon resumes from, so it is replaced atomically and only after the new
  version has been read back and verified against its manifest.
* Triton (poll mode) ignores non-numeric and dot-prefixed entries, so the temporaries never confuse it.
* Weights are read only through safetensors (no pickle); TorchScript exists for serving.

The registry assumes one writer per model (the daemon's model worker); readers may run at any time.

The package, one job a module: ``layout`` (file names, safe names, version directories, errors),
``files`` (atomic, durable writes and hashing), ``manifest`` (building, serialising and reading
manifests), ``read`` (``LATEST``, listing, verification, loading), ``write`` (new versions, ``LATEST``,
clean-up), ``export`` (TorchScript with its cache, Triton's ``config.pbtxt``), ``archive`` (the layout of a
TorchScript or torch.export archive, for weight-only swaps), ``trust`` (what a version must be beyond its
hashes: inside the registry, finite, serving files that compute what its weights say). On top of them, not imported here: ``ops`` (leases, retention,
rollback, whole-model verification) and ``model_store`` (the live model and its session state, glue to
``daemon.engine``).
"""

from __future__ import annotations

from daemon.registry.export import DEFAULT_MAX_BATCH_SIZE
from daemon.registry.files import atomic_write_bytes
from daemon.registry.layout import (
    CONFIG_FILE,
    EXPORT_FILE,
    LABELS_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    STANDARD_FILES,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    RegistryError,
    VerificationError,
    VersionInfo,
)
from daemon.registry.manifest import MANIFEST_SCHEMA, read_manifest
from daemon.registry.read import (
    latest_version,
    list_versions,
    load_state_dict,
    load_torchscript,
    read_extra_file,
    read_verified,
    verify_version,
)
from daemon.registry.write import Sealer, clean_temporaries, copy_version, set_latest, write_version

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MAX_BATCH_SIZE",
    "EXPORT_FILE",
    "LABELS_FILE",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "STANDARD_FILES",
    "STATE_DICT_FILE",
    "Sealer",
    "TORCHSCRIPT_FILE",
    "RegistryError",
    "VerificationError",
    "VersionInfo",
    "atomic_write_bytes",
    "clean_temporaries",
    "copy_version",
    "latest_version",
    "list_versions",
    "load_state_dict",
    "load_torchscript",
    "read_extra_file",
    "read_manifest",
    "read_verified",
    "set_latest",
    "verify_version",
    "write_version",
]
