"""Verify a version in a helper process, so that a load costs the serving process almost no CPU or GIL time.

Before a version is served, every file of its manifest is read and hashed, the version is checked beyond the
hashes (``daemon.registry.trust``: nothing outside the registry, finite weights, serving files whose outputs
agree with the weights rebuilt from the manifest, which loads each of them here), and its served archive's
layout is read (``daemon.registry.archive``: is it the served architecture with new weights?) with the CRC-32
of every tensor storage checked. In the serving process that is a few milliseconds of CPU, much of it
Python holding the GIL (the manifest, the archive's directory and pickles), and requests queued behind it.
Here it runs in a child process at a low CPU priority (``nice``): the serving thread only waits on a pipe
(the GIL free) and receives the result and the very bytes of ``model.pt`` that were hashed, so a file
replaced after the check cannot slip in. What is verified is exactly what ``registry.read_verified`` and
``weights.read_layout`` check in-process; the child runs that code.

Protocol (binary, on the child's stdin and stdout): a request is one JSON line
``{"registry": DIR, "model": NAME, "version": N}``; the answer is a 16-byte prefix (the JSON header's length
and the payload's, 8 bytes each, big-endian), the JSON header, then the payload when the header says
``"ok": true``: the served file (``model.pt2`` when the version has one, else ``model.pt``; ``data_bytes`` long),
then, for ``model.pt2``, ``model.safetensors``. The header also carries the reference logits on the probe
inputs (``daemon.registry.trust``), which the server's warm-up must reproduce. The child says ``{"ready": true}`` the same way once it has imported everything.

``Verifier`` (the serving side) starts the child, restarts it if it dies, and reports a child that cannot be
used (no answer within ``timeout_s``, a broken pipe) as ``VerifierUnavailable`` so the caller can verify
in-process instead: the helper only moves work, it never decides differently.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from daemon.cpu_policy import set_thread_policy

__all__ = ["Verified", "Verifier", "VerifierUnavailable", "verify_for_load"]

_PREFIX = 16
_START_TIMEOUT_S = 60.0


class VerifierUnavailable(Exception):
    """The helper process could not answer (not started, died, timed out): verify in-process instead."""


class _HelperGone(VerifierUnavailable):
    """The helper's pipe closed: it died, perhaps before this request reached it (a kill not yet reaped when the
    request was sent). A verification reads and changes nothing, so it is asked once more of a fresh helper."""


@dataclass(frozen=True)
class Verified:
    """What a load needs from verification: the version's manifest (checked), the served file's bytes (hashed:
    ``model.pt2`` when the version has one, else ``model.pt``), its layout (``None``: not understood, load it in
    full), whether its storages' CRC-32s are right, and the logits it must give on the probe inputs
    (``daemon.registry.trust``: rebuilt from the manifest and ``model.safetensors``)."""

    info: Any                  # registry.VersionInfo
    data: bytes | bytearray    # the served file, the bytes whose sha256 matched the manifest
    layout: Any                # weights.ArchiveLayout | None
    crc_ok: bool               # every storage entry of the layout matches the CRC-32 the zip records
    policy: str | None = None  # the helper's scheduling policy when it answered ("idle", "other"); None: in-process
    served_file: str = "model.pt"
    reference: Any = None      # torch.Tensor: the logits on trust.probe_inputs; None only for hand-built ones
    state_data: bytes | bytearray = b""   # model.safetensors, for a weight-only load of a model.pt2


def _crc_ok(data: bytes | bytearray, layout: Any) -> bool:
    view = memoryview(data)
    return all(zlib.crc32(view[start:start + size]) == crc for _, start, size, crc in layout.entries)


def verify_for_load(registry_dir: Path | str, model: str, version: int) -> Verified:
    """Verify ``version`` (every file against the manifest, then ``trust.check_version``: nothing outside the
    registry, finite weights, serving files that compute what the weights say) and read the served file's
    layout, in this process.

    Raises ``registry.RegistryError`` / ``registry.VerificationError`` / ``OSError`` as ``read_verified``.
    """
    from daemon import registry
    from daemon.registry import trust
    from daemon.registry.archive import pt2_layout, read_layout

    manifest = registry.read_manifest(registry_dir, model, version)
    has_pt2 = registry.EXPORT_FILE in manifest["files"]
    wanted = (registry.TORCHSCRIPT_FILE, registry.STATE_DICT_FILE, *((registry.EXPORT_FILE,) if has_pt2 else ()))
    info, contents = registry.read_verified(registry_dir, model, version, read=wanted)
    checked = trust.check_version(info, contents, registry_dir=registry_dir)
    if has_pt2:
        data = contents[registry.EXPORT_FILE]
        return Verified(info=info, data=data, layout=pt2_layout(data), crc_ok=True, served_file=registry.EXPORT_FILE,
                        reference=checked.reference, state_data=contents[registry.STATE_DICT_FILE])
    data = contents[registry.TORCHSCRIPT_FILE]
    layout = read_layout(data)
    return Verified(info=info, data=data, layout=layout, crc_ok=layout is None or _crc_ok(data, layout),
                    reference=checked.reference)


# -- the child ------------------------------------------------------------------------------------------
def _send(out: BinaryIO, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    out.write(len(head).to_bytes(8, "big") + len(payload).to_bytes(8, "big") + head)
    if payload:
        out.write(payload)
    out.flush()


def _answer(request: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    from daemon import registry

    try:
        v = verify_for_load(request["registry"], request["model"], int(request["version"]))
    except registry.VerificationError as exc:
        return {"ok": False, "kind": "verification", "file": exc.file, "reason": exc.reason, "code": exc.code,
                "message": str(exc)}, b""
    except registry.RegistryError as exc:
        return {"ok": False, "kind": "registry", "message": str(exc)}, b""
    except OSError as exc:
        return {"ok": False, "kind": "os", "message": str(exc)}, b""
    layout = None
    if v.layout is not None:
        layout = {"signature": v.layout.signature, "tensors": [[k, list(p)] for k, p in v.layout.tensors],
                  "entries": [list(e) for e in v.layout.entries]}
    info = v.info
    return {"ok": True, "model": info.model, "version": info.version, "path": str(info.path),
            "manifest": info.manifest, "sha256": info.sha256, "layout": layout, "crc_ok": v.crc_ok,
            "served_file": v.served_file, "data_bytes": len(v.data),
            "reference": v.reference.tolist()}, bytes(v.data) + bytes(v.state_data)


def _policy() -> str:
    try:
        policy = os.sched_getscheduler(0)
    except OSError:
        return "unknown"
    return {getattr(os, "SCHED_IDLE", -1): "idle", os.SCHED_OTHER: "other",
            getattr(os, "SCHED_BATCH", -2): "batch"}.get(policy, str(policy))


def main(argv: list[str] | None = None) -> int:
    """The child: answer requests on stdin until it closes."""
    import argparse

    p = argparse.ArgumentParser(description="unlearnd serve's verification helper (internal)")
    p.add_argument("--nice", type=int, default=19)
    p.add_argument("--idle", action="store_true", help="run at SCHED_IDLE while verifying")
    args = p.parse_args(argv)
    if args.nice > 0:
        os.nice(args.nice)
    from daemon.serving.sched import set_thread_slice

    set_thread_slice(0)        # not the serving threads' short slice (inherited): it is background work
    out = sys.stdout.buffer
    sys.stdout = sys.stderr                 # nothing else may write into the protocol
    import daemon.registry  # noqa: F401 - imported before saying ready, not during the first load
    from daemon.registry import trust

    trust.prime()

    if args.idle:
        set_thread_policy("idle")
    _send(out, {"ready": True})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            header, payload = _answer(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - a bad request gets an answer, the helper lives on
            header, payload = {"ok": False, "kind": "internal", "message": f"{type(exc).__name__}: {exc}"}, b""
        header["policy"] = _policy()
        _send(out, header, payload)
        if args.idle:
            set_thread_policy("idle")     # the server may have raised it to finish this one (never undone before the answer)
    return 0


# -- the serving side ---------------------------------------------------------------------------------------
class Verifier:
    """Runs verification in a helper process (started by ``start`` or the first ``verify``).

    Arguments:
        nice: how much lower the helper's CPU priority is (0-19).
        idle: the helper verifies at SCHED_IDLE (Linux): it runs only on CPU time that the requests (and
            everything else) leave over, so it never delays them. A machine with no idle CPU would starve
            it, so after ``idle_grace_s`` without an answer it is raised to SCHED_OTHER (at its nice value)
            to finish; it goes back to SCHED_IDLE for the next verification.
        timeout_s: how long one verification may take before the helper is given up (and restarted later).
    """

    def __init__(self, *, nice: int = 19, idle: bool = True, idle_grace_s: float = 0.2,
                 timeout_s: float = 30.0) -> None:
        self.nice = nice
        self.idle = idle and hasattr(os, "SCHED_IDLE")
        self.idle_grace_s = idle_grace_s
        self.timeout_s = timeout_s
        self.escalations = 0         # verifications that had to be raised out of SCHED_IDLE
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the helper and wait until it is ready; raises ``VerifierUnavailable`` if it cannot start."""
        with self._lock:
            self._ensure()

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._kill()
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "daemon.serving.verifier", "--nice", str(self.nice),
                                     *(["--idle"] if self.idle else [])],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        except OSError as exc:
            raise VerifierUnavailable(f"cannot start the verification helper: {exc}") from exc
        self._proc = proc
        try:
            header, _ = self._receive(proc, time.monotonic() + _START_TIMEOUT_S)
        except VerifierUnavailable:
            self._kill()
            raise
        if not header.get("ready"):
            self._kill()
            raise VerifierUnavailable(f"the verification helper said {header!r} instead of ready")
        return proc

    def _receive(self, proc: subprocess.Popen[bytes], deadline: float,
                 escalate_at: float | None = None) -> tuple[dict[str, Any], bytearray]:
        if escalate_at is not None and not self._wait_readable(proc, escalate_at):
            self._escalate(proc)
        prefix = self._read(proc, _PREFIX, deadline)
        head_len, payload_len = int.from_bytes(prefix[:8], "big"), int.from_bytes(prefix[8:], "big")
        header = json.loads(bytes(self._read(proc, head_len, deadline)))
        return header, self._read(proc, payload_len, deadline)

    @staticmethod
    def _wait_readable(proc: subprocess.Popen[bytes], until: float) -> bool:
        assert proc.stdout is not None
        poller = select.poll()
        poller.register(proc.stdout.fileno(), select.POLLIN)
        return bool(poller.poll(max(0.0, until - time.monotonic()) * 1e3))

    def _escalate(self, proc: subprocess.Popen[bytes]) -> None:
        """The machine has had no idle CPU for the helper: let it compete (at its nice value) to finish."""
        self.escalations += 1
        try:
            os.sched_setscheduler(proc.pid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], size: int, deadline: float) -> bytearray:
        """Exactly ``size`` bytes from the helper (the GIL free while waiting), or ``VerifierUnavailable``."""
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        stdout = proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1e3):
                raise VerifierUnavailable("the verification helper did not answer in time")
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise _HelperGone(f"the verification helper exited (code {proc.poll()})")
            got += n
        return buf

    def _ask(self, request: bytes) -> tuple[dict[str, Any], bytearray]:
        """One request and its answer; any failure kills the helper (out of step: a fresh one next time)."""
        proc = self._ensure()
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except BrokenPipeError as exc:
                raise _HelperGone(f"the verification helper exited (code {proc.poll()})") from exc
            now = time.monotonic()
            return self._receive(proc, now + self.timeout_s, now + self.idle_grace_s if self.idle else None)
        except VerifierUnavailable:
            self._kill()
            raise
        except (OSError, ValueError) as exc:
            self._kill()
            raise VerifierUnavailable(f"the verification helper failed: {type(exc).__name__}: {exc}") from exc

    def verify(self, registry_dir: Path | str, model: str, version: int) -> Verified:
        """``verify_for_load`` in the helper. Raises what it raises, or ``VerifierUnavailable``."""
        from daemon import registry
        from daemon.registry.archive import ArchiveLayout

        request = json.dumps({"registry": str(registry_dir), "model": model, "version": version}) + "\n"
        with self._lock:
            try:
                header, payload = self._ask(request.encode())
            except _HelperGone:
                header, payload = self._ask(request.encode())      # once more, of a fresh helper
        if not header.get("ok"):
            kind, message = header.get("kind"), str(header.get("message"))
            if kind == "verification":
                raise registry.VerificationError(model, version, header.get("file"), str(header.get("reason")),
                                                 code=str(header.get("code") or "verification"))
            if kind == "registry":
                raise registry.RegistryError(message)
            if kind == "os":
                raise OSError(message)
            raise VerifierUnavailable(f"the verification helper failed: {message}")
        info = registry.VersionInfo(model=header["model"], version=int(header["version"]), path=Path(header["path"]),
                                    manifest=header["manifest"], sha256=header["sha256"])
        if info.model != model or info.version != version:
            raise VerifierUnavailable(f"the verification helper answered for {info.model} {info.version}")
        raw = header.get("layout")
        layout = None if raw is None else ArchiveLayout(
            signature=raw["signature"], tensors=tuple((k, tuple(p)) for k, p in raw["tensors"]),
            entries=tuple((k, int(a), int(b), int(c)) for k, a, b, c in raw["entries"]))
        import torch

        split = int(header["data_bytes"])
        data, state_data = (payload, b"") if split == len(payload) else (payload[:split], payload[split:])
        return Verified(info=info, data=data, layout=layout, crc_ok=bool(header.get("crc_ok")),
                        policy=header.get("policy"), served_file=str(header["served_file"]),
                        reference=torch.tensor(header["reference"], dtype=torch.float32),
                        state_data=state_data)


if __name__ == "__main__":
    sys.exit(main())
