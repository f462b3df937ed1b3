"""Real parts for the daemon tests: a Tansu broker on a free port, daemons as subprocesses, topic readers.

Everything talks TCP to a real Kafka-protocol broker; daemons run as `python -m daemon.cli run`, so a
test can SIGKILL or SIGTERM them like an operator (or the kernel) would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.pipeline.broker import start_broker

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: a test's broker or terminator never outlives it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Broker:
    """A Tansu broker (in-memory storage) that a test may stop and start again on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = start_broker(self.port)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Pki:
    """A throw-away CA and a server certificate it signed (for 127.0.0.1 and localhost), made with the openssl CLI;
    ``other_ca`` is a second CA that signed nothing here (a client trusting it must refuse the server)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.pem"
        self.other_ca = root / "other-ca.pem"
        self.cert = root / "server.pem"
        self.key = root / "server.key"
        self.localhost_cert = root / "localhost.pem"     # names only DNS:localhost (no IP): 127.0.0.1 mismatches
        self.localhost_key = root / "localhost.key"

    def make(self) -> Pki:
        self.root.mkdir(parents=True, exist_ok=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for name in ("ca", "other-ca"):
            _openssl("req", "-x509", *ec, "-keyout", str(self.root / f"{name}.key"), "-out",
                     str(self.root / f"{name}.pem"), "-days", "2", "-subj", f"/CN=unlearnd test {name}")
        for cert, key, names in ((self.cert, self.key, "DNS:localhost,IP:127.0.0.1"),
                                 (self.localhost_cert, self.localhost_key, "DNS:localhost")):
            csr, ext = cert.with_suffix(".csr"), cert.with_suffix(".ext")
            _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
            ext.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.root / "ca.key"),
                     "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
        return self


def _openssl(*args: str) -> None:
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {out.stderr}")


def stunnel_binary() -> str | None:
    """Debian's stunnel4 (``make test-deps`` installs it), or None."""
    return shutil.which("stunnel4") or shutil.which("stunnel")


class Stunnel:
    """stunnel in TLS-server mode: accepts TLS on ``port`` and forwards the plain bytes to ``target_port``."""

    def __init__(self, pki: Pki, target_port: int, port: int | None = None, log: Path | None = None, *,
                 cert: Path | None = None, key: Path | None = None) -> None:
        self.pki, self.target_port = pki, target_port
        self.cert, self.key = cert or pki.cert, key or pki.key
        self.port = port or free_port()
        self.log = log or pki.root / f"stunnel-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Stunnel:
        binary = stunnel_binary()
        if binary is None:
            raise RuntimeError("stunnel is not installed (make test-deps installs Debian's stunnel4)")
        conf = self.pki.root / f"stunnel-{self.port}.conf"
        conf.write_text(f"foreground = yes\npid =\ndebug = 5\noutput = {self.log}\n[kafka]\n"
                        f"accept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{self.target_port}\n"
                        f"cert = {self.cert}\nkey = {self.key}\n")
        self.proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        from daemon.pipeline.broker import wait_until_listening

        try:
            wait_until_listening("127.0.0.1", self.port, 10.0)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class TlsBroker(Broker):
    """Tansu behind stunnel: clients reach it only by TLS on ``tls_port`` (``bootstrap``), which Tansu advertises
    in its metadata, so no client is sent around the terminator; ``plain_bootstrap`` is Tansu itself."""

    def __init__(self, pki: Pki, *, authentication: bool = False) -> None:
        super().__init__()
        self.pki, self.authentication = pki, authentication
        self.plain_bootstrap = self.bootstrap
        self.tunnel = Stunnel(pki, self.port)
        self.bootstrap = f"127.0.0.1:{self.tunnel.port}"
        self.log = pki.root / f"tansu-{self.port}.log"

    def start(self) -> TlsBroker:
        self.proc = start_broker(self.port, advertised_port=self.tunnel.port, authentication=self.authentication,
                                 log_file=self.log)
        try:
            self.tunnel.start()
        except Exception:
            super().stop()
            raise
        return self

    def stop(self) -> None:
        self.tunnel.stop()
        super().stop()


def copy_registry(source: Path, dest: Path, names: Iterable[str] = ("mnist-cnn",), source_name: str = "mnist-cnn"
                  ) -> Path:
    """A private registry for one test, with the session's pretrained model under each name."""
    from daemon import registry

    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == source_name:
            shutil.copytree(source / source_name, dest / name)
        else:   # a second model: same weights, its own name (manifest and Triton config)
            from daemon.registry import model_store

            live = model_store.load_live(source, source_name)
            model_store.publish(dest, name, live.model, live.session, arch=live.arch, input_shape=live.input_shape,
                                classes=live.classes, parent=None, dataset="mnist")
            assert registry.latest_version(dest, name) == 1
    return dest


def write_config(path: Path, *, bootstrap: str, registry_dir: Path, state_dir: Path, models: Iterable[str] = (
        "mnist-cnn",), instance: str = "unlearnd-1", metrics_port: int = 0, group: str = "unlearnd",
        extra: str = "", rounds: str = "", probe: str = "mnist-test:0-999", retention_max_drop: float = 0.1,
        model_extra: str = "", kafka_extra: str = "", metrics_extra: str = "") -> Path:
    """A daemon configuration for tests (the 1-epoch test model is fragile: the retention gate is wide);
    ``model_extra`` ends each [[models]] table (e.g. a [models.rebase] table); ``kafka_extra`` ends [kafka]
    (e.g. ``security_protocol = "SSL"``), ``metrics_extra`` ends [metrics] (e.g. ``token_file = "..."``)."""
    model_tables = "\n".join(f'[[models]]\nname = "{m}"\nprobe = "{probe}"\n{model_extra}\n' for m in models)
    path.write_text(f"""
[kafka]
bootstrap = "{bootstrap}"
group_id = "{group}"
instance_id = "{instance}"
session_timeout_ms = 6000
heartbeat_interval_ms = 1000
poll_timeout_ms = 100
{kafka_extra}
[state]
dir = "{state_dir}"
[registry]
dir = "{registry_dir}"
[metrics]
port = {metrics_port}
{metrics_extra}
[rounds]
max_wait_s = 0.5
threads = 1
retention_max_drop = {retention_max_drop}
{rounds}
[daemon]
outbox_interval_s = 0.1
{extra}
{model_tables}
""")
    return path


def folder_model_table(model: str, source: str, root: Path, **keys: object) -> str:
    """A ``[[models]]`` table whose refs name a folder source ``source`` at ``root`` (probe: all of it); ``keys``
    are more settings of the model (``head="head"``, ``settings=[...]``), written as TOML values."""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return (f'[[models]]\nname = "{model}"\nprobe = "{source}:all"\n{extra}'
            f'[[models.sources]]\nkind = "folder"\nname = "{source}"\npath = "{root}"\n')


class DaemonProcess:
    """`unlearnd run` in a subprocess; its JSON log lines are read back from a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config)],
                                     cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        if not self.log.exists():
            return out
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, after: int = 0
                 ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            for e in events[after:]:
                if predicate(e):
                    return e
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for a log event:\n{self.tail()}")

    def wait_assigned(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda e: e.get("event") == "partitions_assigned" and e.get("partitions"), timeout)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)


def request(request_id: str, kind: str = "forget", refs: Iterable[str] = ("mnist-train:0",), *,
            model: str = "mnist-cnn", labels: Iterable[int] | None = None, targets: Iterable[int] | None = None,
            forget_class: int | None = None, id_prefix: str = "user/") -> dict[str, Any]:
    refs = list(refs)
    instances: list[dict[str, Any]] = [{"id": f"{id_prefix}{request_id}/{i}", "ref": r} for i, r in enumerate(refs)]
    for inst, lab in zip(instances, labels or [], strict=False):
        inst["label"] = lab
    for inst, tgt in zip(instances, targets or [], strict=False):
        inst["target"] = tgt
    body: dict[str, Any] = {"schema": "unlearn.request/v1", "request_id": request_id, "model": model, "kind": kind,
                            "instances": instances, "submitted_at": "2026-11-24T10:00:00Z"}
    if forget_class is not None:
        body["class"] = forget_class
    return body


def produce(bootstrap: str, messages: Iterable[tuple[bytes | None, bytes]], topic: str = "unlearn.requests") -> None:
    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", max_request_size=4 << 20,
                             max_block_ms=20000)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)


def publish_refs(bootstrap: str, model: str, request_id: str, refs: Iterable[str], labels: Iterable[int]
                 ) -> subprocess.CompletedProcess:
    """``unlearnd publish`` of one request naming ``refs`` (as an operator sends it), in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "publish", "--bootstrap", bootstrap, "--model", model,
         "--request-id", request_id, *[a for r in refs for a in ("--ref", r)],
         *[a for lab in labels for a in ("--label", str(lab))]],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


def produce_requests(bootstrap: str, bodies: Iterable[dict[str, Any]]) -> None:
    produce(bootstrap, [(b["model"].encode(), json.dumps(b).encode()) for b in bodies])


def read_topic(bootstrap: str, topic: str, *, until: Callable[[list[Any]], bool] | None = None,
               timeout: float = 60.0) -> list[Any]:
    """All records of a topic, polling until ``until(records)`` holds or the timeout passes."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False,
                             auto_offset_reset="earliest", group_id=None, client_id=f"reader-{uuid.uuid4().hex[:6]}")
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        parts: set[int] = set()
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                time.sleep(0.2)
        if not parts:
            return records
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                records.extend(recs)
            if until is not None and until(records):
                break
            if until is None and not consumer.poll(timeout_ms=300):
                break
        return records
    finally:
        consumer.close()


def receipts_by_request(records: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """Receipts per request id, deduplicated by audit entry (the outbox may resend after a crash)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for rec in records:
        r = json.loads(rec.value)
        out.setdefault(r["request_id"], {})[r["audit"]["entry"]] = r
    return {k: list(v.values()) for k, v in out.items()}


def outcome_receipts(records: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    return {k: [r for r in v if r["status"] != "duplicate"] for k, v in receipts_by_request(records).items()}


def pending_request(rt: Any, body: dict[str, Any], offset: int = 0) -> Any:
    """A request body as the daemon's intake makes it a PendingRequest for ``rt`` (a ModelRuntime): checked,
    decoded, labelled (missing labels from the published model), at ``offset`` of partition 0."""
    from daemon.pipeline.codec import Limits, check_request, decode_inputs
    from daemon.pipeline.intake import fill_labels
    from daemon.pipeline.pending import PendingRequest

    checked = check_request(json.dumps(body).encode(), rt.name.encode(), {rt.name: rt.spec}, Limits())
    decoded = decode_inputs(checked)
    labels, targets = fill_labels(decoded, rt.predict_at_intake)
    return PendingRequest(decoded=decoded, topic="t", partition=0, offset=offset, received_at=time.time(),
                          labels=labels, targets=targets)
