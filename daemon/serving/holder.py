"""The served version and how it changes: load beside the old one, verify, warm up, swap atomically.

Requests read ``holder.current`` once and use that snapshot to the end, so a swap never changes the model
under a request in flight, and the version a response names is the one that computed it. A swap is one
reference assignment; loads are serialised by a lock, so two triggers never load the same version twice.

Two ways to load a version, both after every file has been verified against the manifest (in a helper
process when the holder has a ``Verifier``: the hashing and the archive's layout then cost this process, and
the requests it serves, almost nothing; see ``daemon.serving.verifier``):

* ``weights``: when its ``model.pt`` differs from the served one's only in the bytes of its tensors
  (``daemon.registry.archive``: same classes, code, module tree, constants), those bytes are copied into the
  standby, a second module with the served one's compiled and optimised code, which then serves. Nothing
  is deserialised or optimised; two probe inferences check the result. Double buffering: the standby is the
  module the previous version served with, once no request holds that version (a weak reference tells), or
  else a copy of the served module. The module serving is never written.
* ``full``: otherwise (a new architecture, the first version, an archive the reader does not understand),
  ``torch.jit.load`` of the very bytes hashed, then warm-up until TorchScript has optimised the graph.

A version with a ``model.pt2`` (torch.export) is served from it instead: ``torch.export.load(...).module()`` for a
full load; for a weight-only one, when its graph (everything in the archive but its weights' bytes,
``archive.pt2_layout``) is the served one's, its ``model.safetensors`` is copied into the standby. Either way the
loaded module must reproduce, on ``trust.probe_inputs``, the logits the verifier computed from the weights
rebuilt from the manifest (``daemon.registry.trust``), or the version is refused (``mismatch``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import structlog
import torch

from daemon import registry
from daemon.registry import trust
from daemon.registry.archive import ArchiveLayout, copy_state, copy_storages
from daemon.serving.metrics import LOAD_FAILURE_REASONS, ServeMetrics
from daemon.serving.verifier import Verified, Verifier, VerifierUnavailable, verify_for_load

__all__ = ["LoadError", "ModelHolder", "ServedVersion", "SwapResult"]

_log = structlog.get_logger("unlearnd.serve")
_WARMUP_CALLS = 3   # profiling run, optimising run, one optimised run
_PROBE_CALLS = 2    # a weight-only load runs code that is optimised already: check the output, twice
# While a load runs, the GIL switch interval is this short (then restored). A load's Python work (the
# manifest, the archive's layout, the checks) would otherwise keep the GIL for a whole interval each time a
# request thread hands it over (for a socket, a thread hand-off, an inference), and a request takes it
# several times: the requests served during a swap were slowed by a few ms that way.
_LOAD_SWITCH_INTERVAL_S = 0.0001
# Between the stages of a weight-only load, the loading thread sleeps this long, so the requests that
# queued behind a stage run before the next one starts (each stage is under a millisecond of CPU).
_STAGE_PAUSE_S = 0.0003


@contextlib.contextmanager
def _short_switch_interval(seconds: float = _LOAD_SWITCH_INTERVAL_S):
    """Shorten the interpreter's GIL switch interval for the duration (never lengthen it)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _pause() -> None:
    time.sleep(_STAGE_PAUSE_S)


class LoadError(Exception):
    """A version could not be made servable; the previous one keeps serving.

    Attributes:
        version: the version refused.
        reason: one of ``metrics.LOAD_FAILURE_REASONS`` (a metric label).
        detail: what was wrong, in words.
    """

    def __init__(self, version: int | None, reason: str, detail: str) -> None:
        super().__init__(f"version {version}: {reason}: {detail}")
        self.version = version
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ServedVersion:
    """One loaded, verified, warmed-up version (immutable: a swap replaces the whole object)."""

    model: str
    version: int
    module: torch.nn.Module               # a ScriptModule (model.pt) or torch.export's GraphModule (model.pt2)
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    sha256: str
    loaded_at: float
    layout: ArchiveLayout | None = None   # of its served file; None: not understood (no weight-only swaps)
    load_kind: str = "full"                # how it was loaded: "full" or "weights"
    served_file: str = registry.TORCHSCRIPT_FILE   # model.pt2 when the version has one, else model.pt

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a float32 (N, C, H, W) batch in [0, 1]."""
        with torch.inference_mode():
            return self.module(batch)


@dataclass(frozen=True)
class SwapResult:
    """What one attempt to follow the registry did: ``swapped``, ``unchanged`` or ``failed``."""

    outcome: str
    version: int | None          # the version served afterwards
    attempted: int | None = None
    error: LoadError | None = None
    seconds: float = 0.0
    kind: str | None = None      # for a swap: how the version was loaded, "full" or "weights"


class ModelHolder:
    """Holds the served version of one model and swaps in new ones from the registry.

    Arguments:
        registry_dir: the registry root.
        model: the model name.
        metrics: where swaps and refusals are counted.
        verifier: verifies versions in a helper process (``daemon.serving.verifier``), so a load costs this
            process little CPU and GIL time; ``None`` (or a helper that cannot answer): in this process.
    """

    def __init__(self, registry_dir: Path | str, model: str, *, metrics: ServeMetrics,
                 verifier: Verifier | None = None) -> None:
        self.registry_dir = Path(registry_dir)
        self.model = model
        self.metrics = metrics
        self.verifier = verifier
        self._current: ServedVersion | None = None
        self._lock = threading.Lock()
        # (archive signature, module): not serving; written only by a weight-only load, which uses it up.
        self._standby: tuple[str, torch.jit.ScriptModule] | None = None
        # The module the previous version served with, once no request holds that version any more.
        self._retired: tuple[weakref.ref[ServedVersion], str, torch.jit.ScriptModule] | None = None
        self._stages_ms: dict[str, float] = {}     # of the last load: where its time went
        trust.prime()     # model.pt2's loader imports now (once a process), not in the first swap

    @property
    def current(self) -> ServedVersion | None:
        return self._current

    def load(self, version: int, *,
             run_full: Callable[[Callable[[], ServedVersion]], ServedVersion] | None = None) -> ServedVersion:
        """Verify ``version`` (its files against the manifest, then beyond: ``daemon.registry.trust``), load its
        ``model.pt2`` or TorchScript, warm it up and check it reproduces the reference outputs.

        Nothing is swapped; raises ``LoadError`` with a reason on any failure. A weight-only load uses up
        the standby, so call this through ``swap_to`` (which holds the load lock). ``run_full`` runs the
        deserialising and warm-up of a full load (e.g. on a thread at lower CPU priority); default: here.
        """
        marks = [time.perf_counter()]
        # Every file of the manifest is hashed; model.pt is read once, and the bytes hashed are the bytes
        # loaded below (a file replaced after verification cannot slip in).
        verified = self._verify(version)
        info, data, layout = verified.info, verified.data, verified.layout
        manifest = info.manifest
        try:
            shape = tuple(int(d) for d in manifest["input_shape"])
            classes = tuple(str(c) for c in manifest["classes"])
            if len(shape) != 3 or len(classes) < 2:
                raise ValueError(f"input_shape {shape} / {len(classes)} classes")
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(version, "verification", f"manifest lacks a usable input_shape/classes: {exc}") from exc
        marks.append(time.perf_counter())
        _pause()
        base = self._take_standby(layout)
        marks.append(time.perf_counter())
        file = verified.served_file
        if base is not None:
            _pause()
            try:
                if file == registry.EXPORT_FILE:
                    copy_state(base, safetensors.torch.load(bytes(verified.state_data)))
                else:
                    if not verified.crc_ok:
                        raise ValueError("a storage's bytes do not match the CRC-32 the archive records")
                    copy_storages(base, layout, data, check_crc=False)    # checked with the layout
            except Exception as exc:  # noqa: BLE001 - the archive's entries are unreadable: refuse it
                raise LoadError(version, "load", f"{file}: {type(exc).__name__}: {exc}") from exc
            marks.append(time.perf_counter())
            _pause()
            served = ServedVersion(model=self.model, version=version, module=base, input_shape=shape,
                                   classes=classes, sha256=info.sha256, loaded_at=time.time(), layout=layout,
                                   load_kind="weights", served_file=file)
            self._warm_up(served, _PROBE_CALLS)
            self._check_reference(served, verified.reference)
        else:
            def full() -> ServedVersion:
                try:
                    if file == registry.EXPORT_FILE:
                        module = trust.load_pt2(data)
                    else:
                        module = trust.load_torchscript_bytes(data)
                except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive: refuse
                    raise LoadError(version, "load", f"{file}: {type(exc).__name__}: {exc}") from exc
                marks.append(time.perf_counter())
                loaded = ServedVersion(model=self.model, version=version, module=module, input_shape=shape,
                                       classes=classes, sha256=info.sha256, loaded_at=time.time(), layout=layout,
                                       load_kind="full", served_file=file)
                self._warm_up(loaded, _WARMUP_CALLS)
                self._check_reference(loaded, verified.reference)
                return loaded

            served = run_full(full) if run_full is not None else full()
        marks.append(time.perf_counter())
        self._stages_ms = {name: round((b - a) * 1e3, 2) for name, a, b in
                           zip(("verify", "layout", "load", "warmup"), marks, marks[1:])}
        return served

    def _verify(self, version: int) -> Verified:
        """Verify ``version`` (in the helper process when there is one that answers); raises ``LoadError``."""
        try:
            if self.verifier is not None:
                escalations = self.verifier.escalations
                try:
                    verified = self.verifier.verify(self.registry_dir, self.model, version)
                    if self.verifier.escalations != escalations:
                        _log.info("verifier_raised", model=self.model, version=version,
                                  detail=f"no idle CPU for {self.verifier.idle_grace_s} s: raised to SCHED_OTHER")
                    return verified
                except VerifierUnavailable as exc:
                    _log.warning("verifier_unavailable", model=self.model, version=version, detail=str(exc))
            return verify_for_load(self.registry_dir, self.model, version)
        except registry.VerificationError as exc:
            reason = exc.code if exc.code in LOAD_FAILURE_REASONS else "verification"
            if exc.file == registry.MANIFEST_FILE and exc.reason == "missing":
                reason = "missing"
            raise LoadError(version, reason, str(exc)) from exc
        except (registry.RegistryError, OSError) as exc:
            raise LoadError(version, "missing", str(exc)) from exc

    def _take_standby(self, layout: ArchiveLayout | None) -> torch.jit.ScriptModule | None:
        """The standby module if ``layout`` has the served archive's signature (it is then used up)."""
        if layout is None:
            return None
        self._prepare_standby(copy_if_busy=True)
        standby = self._standby
        if standby is None or standby[0] != layout.signature:
            return None
        self._standby = None          # written now: it must never be reused, whatever happens next
        return standby[1]

    def prepare_standby(self) -> bool:
        """Have a standby for the next weight-only load ready, if not done yet; returns whether one is.

        Double buffering: the standby is the module the previous version served with, as soon as no
        request holds that version any more (a weak reference tells, so it is never written under a request),
        or else a copy of the served module; either shares the served module's compiled, optimised code. The
        watcher calls this between polls, off the request path; a load that finds none ready makes the copy.
        Skipped while a load is in progress.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._prepare_standby(copy_if_busy=False)
        finally:
            self._lock.release()

    def _prepare_standby(self, *, copy_if_busy: bool) -> bool:
        current = self._current
        if current is None or current.layout is None:
            return False
        signature = current.layout.signature
        if self._standby is not None and self._standby[0] == signature:
            return True
        retired = self._retired
        if retired is not None:
            if retired[0]() is None:                 # no request holds the previous version any more
                self._retired = None
                if retired[1] == signature:
                    self._standby = (signature, retired[2])
                    return True
            elif retired[1] == signature and not copy_if_busy:
                return False                         # it will be free at the next call: no copy needed
        try:
            module = copy.deepcopy(current.module)
        except Exception as exc:  # noqa: BLE001 - no standby only means full loads
            _log.warning("standby_copy_failed", model=self.model, version=current.version,
                         detail=f"{type(exc).__name__}: {exc}")
            return False
        self._standby = (signature, module)
        return True

    @staticmethod
    def _warm_up(served: ServedVersion, calls: int = _WARMUP_CALLS) -> None:
        """Run the module until TorchScript has profiled and optimised it, before any request sees it.

        The profiling executor profiles on the first call and optimises on the second, so the first
        real requests would otherwise pay for it (~2 ms each here). The calls must give the same finite
        (1, classes) logits. A weight-only load runs code optimised already: fewer calls only check it.
        """
        probe = torch.full((1, *served.input_shape), 0.5)
        try:
            outs = [served.infer(probe) for _ in range(calls)]
        except Exception as exc:  # noqa: BLE001 - any failure of the model's own code refuses the version
            raise LoadError(served.version, "warmup", f"{type(exc).__name__}: {exc}") from exc
        out = outs[-1]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, served.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise LoadError(served.version, "warmup",
                            f"output {got}, manifest promises (1, {served.num_classes}) logits")
        if out.dtype != torch.float32 or not math.isfinite(float(out.abs().sum())):
            raise LoadError(served.version, "warmup", f"output is {out.dtype} or not finite")
        if not all(torch.equal(o, out) for o in outs):
            raise LoadError(served.version, "warmup", "the same input gave different outputs")

    @staticmethod
    def _check_reference(served: ServedVersion, reference: torch.Tensor | None) -> None:
        """The loaded module must give, on the probe inputs, the logits of the weights rebuilt from the manifest
        (``daemon.registry.trust``; the verifier computed them): the module served is the one checked."""
        if reference is None:
            raise LoadError(served.version, "verification", "no reference outputs to check the module against")
        try:
            out = served.infer(trust.probe_inputs(served.input_shape))
        except Exception as exc:  # noqa: BLE001 - any failure of the model's own code refuses the version
            raise LoadError(served.version, "warmup", f"{type(exc).__name__}: {exc}") from exc
        ok, diff = trust.outputs_agree(out, reference)
        if not ok:
            raise LoadError(served.version, "mismatch",
                            f"{served.served_file}: outputs disagree with {registry.STATE_DICT_FILE} rebuilt from "
                            f"the manifest (max abs diff {diff:.3g})")

    def swap_to(self, version: int, *,
                run_full: Callable[[Callable[[], ServedVersion]], ServedVersion] | None = None) -> SwapResult:
        """Make ``version`` the served one unless it already is; on failure the old one keeps serving.

        ``run_full``: see ``load``."""
        with self._lock:
            old = self._current
            if old is not None and old.version == version:
                return SwapResult("unchanged", version, attempted=version)
            start = time.perf_counter()
            try:
                with _short_switch_interval():
                    new = self.load(version, run_full=run_full)
            except LoadError as exc:
                seconds = time.perf_counter() - start
                self.metrics.refused(exc.reason)
                _log.error("version_refused", model=self.model, version=version, reason=exc.reason,
                           detail=exc.detail, serving=old.version if old else None)
                return SwapResult("failed", old.version if old else None, attempted=version, error=exc,
                                  seconds=seconds)
            self._current = new          # the swap: one reference assignment
            if old is not None and old.layout is not None:
                self._retired = (weakref.ref(old), old.layout.signature, old.module)
            seconds = time.perf_counter() - start
            self.metrics.swapped(version, seconds, new.load_kind)
            _log.info("version_swapped", model=self.model, version=version, load=new.load_kind,
                      stages_ms=self._stages_ms,
                      previous=old.version if old else None, sha256=new.sha256, load_ms=round(seconds * 1e3, 2))
            return SwapResult("swapped", version, attempted=version, seconds=seconds, kind=new.load_kind)

    def describe(self) -> dict[str, Any]:
        cur = self._current
        return {"model": self.model, "version": cur.version if cur else None,
                "sha256": cur.sha256 if cur else None}
