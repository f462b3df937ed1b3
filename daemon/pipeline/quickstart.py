"""`unlearnd quickstart` (what `make run` runs): the whole product on one machine, with embedded defaults.

It starts, each as its own process, the embedded broker, the daemon (a demo MNIST model, trained on
the first run and then taken from the registry), and `unlearnd serve`; publishes a few demo requests
(one of each kind, and one malformed message) with `unlearnd publish`; and prints receipts as they
arrive with `unlearnd receipts`. Ctrl-C (or SIGTERM) stops everything in order: the receipt follower,
the daemon (which finishes or aborts its round), the server, the broker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from daemon.pipeline.broker import DEFAULT_PORT, wait_until_listening
from daemon.pipeline.config_docs import example_toml

__all__ = ["run_quickstart"]

SERVE_PORT = 8000
METRICS_PORT = 9464


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon.cli", *args]


def _config(directory: Path, broker_port: int, serve_port: int) -> Path:
    text = example_toml()
    text = text.replace('bootstrap = "127.0.0.1:19092"', f'bootstrap = "127.0.0.1:{broker_port}"')
    text = text.replace('dir = "var/state"', f'dir = "{directory / "state"}"')
    text = text.replace('dir = "var/registry"', f'dir = "{directory / "registry"}"')
    text = text.replace("notify_urls = []",
                        f'notify_urls = ["http://127.0.0.1:{serve_port}/v2/repository/models/{{name}}/load"]')
    text = text.replace('format = "json"', 'format = "console"')
    text = text.replace('cpu_policy = "normal"', 'cpu_policy = "idle"')     # the server shares this host
    path = directory / "unlearnd.toml"
    path.write_text(text)
    return path


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s")


def _demo_requests(model: str) -> list[str]:
    from daemon.data.mnist import load_mnist

    run = uuid.uuid4().hex[:6]
    start = random.Random().randrange(0, 59000)
    label = int(load_mnist().train_y[start + 9])
    lines = [
        {"schema": "unlearn.request/v1", "request_id": f"demo-{run}-forget", "model": model, "kind": "forget",
         "instances": [{"id": f"demo-user/{run}/photo-{i}", "ref": f"mnist-train:{start + i}"} for i in range(4)]},
        {"schema": "unlearn.request/v1", "request_id": f"demo-{run}-relabel", "model": model, "kind": "relabel",
         "instances": [{"id": f"demo-user/{run}/photo-9", "ref": f"mnist-train:{start + 9}",
                        "label": label, "target": (label + 1) % 10}]},
        {"schema": "unlearn.request/v1", "request_id": f"demo-{run}-bad", "model": model, "kind": "forget",
         "instances": [{"id": "demo-user/x", "ref": "mnist-train:99999999"}]},
    ]
    return [json.dumps(line) for line in lines]


def run_quickstart(directory: Path, *, broker_port: int = DEFAULT_PORT, serve_port: int = SERVE_PORT,
                   model: str = "mnist-cnn") -> int:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    config = _config(directory, broker_port, serve_port)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def spawn(name: str, args: list[str], log: bool = True) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "ab") if log else None  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT if log else None,
                                start_new_session=True)    # Ctrl-C reaches only us; we stop them in order
        procs.append((name, proc))
        return proc

    try:
        print(f"unlearnd quickstart in {directory} (logs in {logs})", flush=True)
        spawn("broker", _cli("broker", "--port", str(broker_port)))
        wait_until_listening("127.0.0.1", broker_port, 15)
        print(f"  broker     127.0.0.1:{broker_port} (embedded Tansu, in memory)", flush=True)
        daemon = spawn("daemon", _cli("run", "--config", str(config)))
        first = not (directory / "registry" / model / "LATEST").exists()
        if first:
            print("  daemon     training the demo MNIST model (first run only, about a minute) ...", flush=True)
        _wait_http(f"http://127.0.0.1:{METRICS_PORT}/metrics", 600, daemon, "the daemon")
        print(f"  daemon     metrics on http://127.0.0.1:{METRICS_PORT}/metrics, config {config}", flush=True)
        server = spawn("serve", _cli("serve", "--registry", str(directory / "registry"), "--model", model,
                                     "--port", str(serve_port)))
        _wait_http(f"http://127.0.0.1:{serve_port}/v2/health/ready", 120, server, "the server")
        print(f"  serve      http://127.0.0.1:{serve_port}/v2/models/{model} (KServe v2)", flush=True)
        requests_file = directory / "demo-requests.jsonl"
        requests_file.write_text("\n".join(_demo_requests(model)) + "\nthis line is not JSON\n")
        subprocess.run(_cli("publish", "--bootstrap", f"127.0.0.1:{broker_port}", "--file", str(requests_file),
                            "--model", model), env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"  published  {requests_file} (a forget, a relabel, a ref out of range, a line that is not JSON)")
        print("receipts as they arrive (Ctrl-C stops everything):", flush=True)
        spawn("receipts", _cli("receipts", "--bootstrap", f"127.0.0.1:{broker_port}", "--from-beginning"),
              log=False)
        while not stopping:
            for name, proc in procs:
                if proc.poll() is not None and name != "receipts":
                    print(f"{name} exited with code {proc.returncode}; stopping (see {logs / (name + '.log')})")
                    stopping = True
            time.sleep(0.2)
        return 0
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"quickstart failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping ...", flush=True)
        for name, proc in reversed(procs):        # receipts, serve, daemon, broker
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60 if name == "daemon" else 15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        print("stopped", flush=True)
