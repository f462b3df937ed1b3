"""Can ``unlearnd serve`` be exhausted? 20,000 slow or oversized connections against a legitimate client.

Processes: ``unlearnd serve`` with its default limits (the server under test, an MNIST CNN from a fresh
registry), attacker processes (this file with ``--attack``: asyncio, their open-files limit raised), and this
orchestrator, which is also the legitimate client: inference requests (JSON FP32 [1,1,28,28]) at ``--rate``
per second, open loop, each on a fresh connection (what a client behind a load balancer does, and what an
exhausted server refuses first), from a pool of threads.

1. ``idle`` (``--idle-s``): the legitimate client alone -> ``idle_p99_ms``.
2. ``attack`` (``--attack-s``): the attackers hold ``--connections`` connection slots, a third each of
   - ``oversized``: ``Content-Length: 1073741824`` and 1 byte of body, then wait for the answer;
   - ``slowloris``: a request line, then one header line every ``--trickle-s`` seconds, never ending the head;
   - ``slowbody``: full headers claiming 100,000 bytes, then one byte every ``--trickle-s`` seconds;
   a slot whose connection the server closes reconnects after ``--reconnect-s`` (a sustained attack, not one
   burst). The legitimate client goes on -> ``attack_p99_ms``, ``legit_non_200`` (errors, timeouts and every
   status but 200).

The bar (issue 23): legitimate requests keep their 200s with ``attack_p99_ms <= 10 * idle_p99_ms``.

With ``--proxy nginx`` the clients and the attackers connect to nginx from ``deploy/nginx``'s template
(started here on a free port, its files in the run's temp dir) in front of the same server; the legitimate
clients come from 127.0.0.2 and the attackers from 127.0.0.3, so nginx's per-address limits tell them apart
(as clients on different hosts are); results ``serve_exhaustion_nginx.{json,md}``. ``--attack-addrs
127.1.0.0/22`` spreads the attackers over 1,024 loopback addresses instead, each new attacking connection from the
next (a botnet, which per-address limits do not bound in total; ``attack_sources`` in the result), and
``--nginx-set NAME=VALUE`` renders the template with other values (``CLIENT_KEY='""'``: per-address limits off).

Usage: ``.venv/bin/python benchmarks/serve_exhaustion.py [--proxy nginx] [--out benchmarks/results]``
(about 4 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench-mnist"
SHAPE = (1, 28, 28)
KINDS = ("oversized", "slowloris", "slowbody")


# -- attacker (its own processes) --------------------------------------------------------------------------
class _Tally:
    def __init__(self) -> None:
        self.opened = 0
        self.open_now = 0
        self.peak_open = 0
        self.connect_failed = 0
        self.answers: dict[str, int] = {}
        self.closed_without_answer = 0


_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)   # Linux >= 4.2


def attack_sources(spec: str) -> list[str]:
    """The source addresses ``spec`` names: one address (``127.0.0.3``) or a network (``127.1.0.0/22``: all
    1,024 of its addresses, network and broadcast included, since none is special on loopback).

    Only loopback (127.0.0.0/8) is accepted: Linux routes all of it to ``lo``, so any of its addresses can be bound
    without configuring an interface, and an attack from it never leaves the machine. Raises ValueError otherwise.
    """
    import ipaddress

    try:
        net = ipaddress.ip_network(spec.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"attack source {spec!r} is neither an IPv4 address nor a network like 127.1.0.0/22: "
                         f"{exc}") from exc
    if net.version != 4 or not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")):   # type: ignore[arg-type]
        raise ValueError(f"attack source {spec!r} is not inside 127.0.0.0/8 (loopback, bindable without set-up)")
    if net.num_addresses > 65_536:
        raise ValueError(f"attack source {spec!r} has {net.num_addresses} addresses; at most 65,536 (a /16)")
    return [str(a) for a in net]


class _Sources:
    """Round robin over the source addresses: each new attacking connection binds the next one, so with N
    addresses every address holds about 1/N of the attack at any time (as a botnet's hosts would)."""

    def __init__(self, addrs: list[str], offset: int = 0) -> None:
        if not addrs:
            raise ValueError("no source address")
        self.addrs = addrs
        self.i = offset % len(addrs)

    def next(self) -> str:
        addr = self.addrs[self.i]
        self.i = (self.i + 1) % len(self.addrs)
        return addr


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port`` from ``source``. The source port is chosen at connect time
    (IP_BIND_ADDRESS_NO_PORT), as for a connect without bind: a plain bind to port 0 would need a port free for
    every destination and could not reuse TIME_WAIT ones, which caps an attacker at a few thousand connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _slot(i: int, args: argparse.Namespace, tally: _Tally, stop: asyncio.Event, connects: asyncio.Semaphore,
                sources: _Sources) -> None:
    kind = KINDS[i % len(KINDS)]
    head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    while not stop.is_set():
        try:
            async with connects:
                reader, writer = await asyncio.wait_for(_connect(args.port, sources.next()), 30)
        except (OSError, asyncio.TimeoutError):
            tally.connect_failed += 1
            await asyncio.sleep(args.reconnect_s)
            continue
        tally.opened += 1
        tally.open_now += 1
        tally.peak_open = max(tally.peak_open, tally.open_now)
        try:
            if kind == "oversized":
                writer.write((head + f"Content-Length: {1 << 30}\r\n\r\n").encode() + b"{")
            elif kind == "slowloris":
                writer.write((head + "X-Slow-0: 0\r\n").encode())
            else:
                writer.write((head + "Content-Length: 100000\r\n\r\n").encode() + b"{")
            await writer.drain()
            n = 0
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), args.trickle_s)
                except asyncio.TimeoutError:
                    n += 1
                    writer.write(f"X-Slow-{n}: {n}\r\n".encode() if kind == "slowloris" else b" ")
                    await writer.drain()
                    continue
                if data.startswith(b"HTTP/1.1 "):
                    code = data[9:12].decode("ascii", "replace")
                    tally.answers[code] = tally.answers.get(code, 0) + 1
                else:
                    tally.closed_without_answer += 1
                break
        except (OSError, ConnectionError):
            tally.closed_without_answer += 1
        finally:
            tally.open_now -= 1
            writer.close()
        await asyncio.sleep(args.reconnect_s)


async def _attack(args: argparse.Namespace) -> None:
    tally = _Tally()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connects = asyncio.Semaphore(args.connect_parallel)
    sources = _Sources(attack_sources(args.source), args.source_offset)
    tasks = [asyncio.create_task(_slot(args.first_slot + i, args, tally, stop, connects, sources))
             for i in range(args.connections)]
    report = Path(args.report)
    while not stop.is_set():
        report.write_text(json.dumps(vars(tally)))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    report.write_text(json.dumps(vars(tally)))


def _raise_open_files(n: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(n, soft), max(n, hard)))   # root may raise the hard limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the legitimate client -----------------------------------------------------------------------------------
_local = threading.local()


def _post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _infer_once(port: int, body: bytes, timeout: float, keep_alive: bool, source: str) -> tuple[float, float, int]:
    """One inference: on a fresh connection, or on this thread's kept-alive one (reopened once when the server
    closed it while idle, as a client pool does)."""
    t0 = time.perf_counter()
    try:
        if not keep_alive:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
            try:
                status = _post(conn, body)
            finally:
                conn.close()
        else:
            conn = getattr(_local, "conn", None)
            if conn is None:
                conn = _local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                                                source_address=(source, 0))
            try:
                status = _post(conn, body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                conn = _local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                                                source_address=(source, 0))
                status = _post(conn, body)
    except (OSError, http.client.HTTPException):
        if keep_alive and getattr(_local, "conn", None) is not None:
            _local.conn.close()
            _local.conn = None
        status = 0
    return t0, time.perf_counter(), status


def _legit(port: int, rate: float, seconds: float, timeout: float, keep_alive: bool = False,
           source: str = "127.0.0.1") -> np.ndarray:
    """(sent, received, status) of each request sent at ``rate`` per second for ``seconds``."""
    body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, *SHAPE], "datatype": "FP32",
                                   "data": np.random.default_rng(0).random(784).round(4).tolist()}]}).encode()
    n = int(rate * seconds)
    start = time.perf_counter() + 0.1
    with ThreadPoolExecutor(max_workers=32, thread_name_prefix="legit") as pool:
        futures = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(_infer_once, port, body, timeout, keep_alive, source))
        return np.array([f.result() for f in futures], dtype=float).reshape(-1, 3)


def _both(port: int, args: argparse.Namespace, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """The fresh-connection client and the keep-alive client side by side, each at ``args.rate``."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        fresh = pool.submit(_legit, port, args.rate, seconds, args.timeout, False, args.legit_addr)
        kept = pool.submit(_legit, port, args.rate, seconds, args.timeout, True, args.legit_addr)
        return fresh.result(), kept.result()


def _summary(idle: np.ndarray, attack: np.ndarray) -> dict[str, object]:
    lat = (attack[:, 1] - attack[:, 0]) * 1e3
    return {"idle_p99_ms": round(_p99_ms(idle), 2), "attack_p99_ms": round(_p99_ms(attack), 2),
            "ratio": round(_p99_ms(attack) / _p99_ms(idle), 2), "legit_requests": int(len(attack)),
            "legit_non_200": int((attack[:, 2] != 200).sum()),
            "idle_p50_ms": round(float(np.median((idle[:, 1] - idle[:, 0]) * 1e3)), 2),
            "attack_p50_ms": round(float(np.median(lat)), 2), "attack_max_ms": round(float(lat.max()), 2),
            # a connect whose SYN the kernel dropped (accept queue full) is retried after 1 s, then 3 s
            "attack_over_900ms": int((lat > 900).sum()),
            "attack_statuses": {str(int(k)): int(v) for k, v in zip(*np.unique(attack[:, 2], return_counts=True))}}


def _p99_ms(rows: np.ndarray) -> float:
    ok = rows[rows[:, 2] == 200]
    return float(np.percentile((ok[:, 1] - ok[:, 0]) * 1e3, 99)) if len(ok) else float("nan")


# -- orchestration ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> dict[str, object]:
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "open_files_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def _publish(registry_dir: Path) -> None:
    import torch

    from daemon import registry
    from daemon.engine.models import build_model

    torch.manual_seed(0)
    model = build_model("mnist_cnn", num_classes=10, input_shape=SHAPE, mean=[0.1307], std=[0.3081]).eval()
    registry.write_version(registry_dir, MODEL, model, input_shape=SHAPE, classes=[str(c) for c in range(10)],
                           parent=None, method={"name": "bench"}, extra_manifest={"arch": "mnist_cnn"})


def _scrape_codes(port: int) -> dict[str, object]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:   # noqa: S310 - local
        text = r.read().decode()
    codes: dict[str, float] = {}
    dropped: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "unlearnd_serve_requests_total":
                codes[s.labels["code"]] = codes.get(s.labels["code"], 0) + s.value
            elif s.name == "unlearnd_serve_connections_dropped_total":
                dropped[s.labels["reason"]] = s.value
    return {"requests_by_code": codes, "connections_dropped": dropped}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:  # noqa: S310
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server not ready")


def _attackers(args: argparse.Namespace, port: int, work: Path, env: dict[str, str]) -> list[tuple[subprocess.Popen, Path]]:
    per = -(-args.connections // args.attackers)
    n_sources = len(attack_sources(args.attack_addr))
    procs = []
    for k in range(args.attackers):
        n = min(per, args.connections - k * per)
        report = work / f"attacker-{k}.json"
        procs.append((subprocess.Popen(
            [sys.executable, __file__, "--attack", "--port", str(port), "--source", args.attack_addr,
             "--source-offset", str(k * n_sources // args.attackers), "--connections", str(n),
             "--first-slot", str(k * per), "--trickle-s", str(args.trickle_s), "--reconnect-s", str(args.reconnect_s),
             "--report", str(report)], env=env, preexec_fn=lambda: os.nice(args.attacker_nice)), report))
    return procs


def _sum_reports(reports: list[Path]) -> dict[str, object]:
    total: dict[str, object] = {"opened": 0, "peak_open": 0, "connect_failed": 0, "closed_without_answer": 0,
                                "answers": {}}
    for path in reports:
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in ("opened", "peak_open", "connect_failed", "closed_without_answer"):
            total[key] += r[key]    # type: ignore[operator]
        for code, n in r["answers"].items():
            total["answers"][code] = total["answers"].get(code, 0) + n   # type: ignore[union-attr]
    return total


# -- the proxy in front (--proxy nginx) -----------------------------------------------------------------------
def _render_nginx_conf(prefix: Path, listen_port: int, upstream_port: int, values: dict[str, str]) -> Path:
    """deploy/nginx's template for this run: the server's default limits, one worker (see ``NGINX_WORKERS``),
    and ``values`` (``--nginx-set``) over them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nginx_render", REPO / "deploy" / "nginx" / "render.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = prefix / "nginx.conf"
    conf.write_text(mod.render({"PREFIX": str(prefix), "LISTEN": f"127.0.0.1:{listen_port}",
                                "UPSTREAM": f"127.0.0.1:{upstream_port}", "WORKER_PROCESSES": NGINX_WORKERS,
                                **values}))
    return conf


#: one worker, not auto: this machine has 2 cores, one taken by the server's event loop and the rest shared by
#: the attackers, the legitimate clients and other work; a second worker would only compete for the same cores,
#: and one C event loop accepts and ends thousands of connections a second in a few per cent of a core
NGINX_WORKERS = "1"


def _start_nginx(work: Path, upstream_port: int, values: dict[str, str]) -> tuple[subprocess.Popen, int, Path]:
    """nginx (foreground master, ``daemon off``) from the rendered template, listening on a free port."""
    nginx = shutil.which("nginx")
    if nginx is None:
        raise RuntimeError("--proxy nginx needs the nginx binary: apt-get install nginx-light "
                           "(make bench-serve-exhaustion-nginx installs it)")
    prefix = work / "nginx"
    prefix.mkdir()
    for path in (work, prefix):
        path.chmod(0o755)    # a root master runs its worker as nobody, which must reach the temp paths
    port = _free_port()
    conf = _render_nginx_conf(prefix, port, upstream_port, values)
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {(prefix / 'error.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, conf
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not listen within 30 s") from None
            time.sleep(0.05)


def _tree(pid: int) -> list[int]:
    """``pid`` and its child processes (nginx's master and workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(c) for c in children)]


def _rss_mb(pids: list[int]) -> float:
    """Resident memory of ``pids`` together, MiB (what held connections cost nginx: buffers per connection)."""
    kb = 0
    for pid in pids:
        try:
            kb += int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")))
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    return round(kb / 1024, 1)


def _fds(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def run(args: argparse.Namespace) -> dict[str, object]:
    machine_at_start = _machine()     # its load average is the one before this run's processes start
    work = Path(tempfile.mkdtemp(prefix="serve-exhaustion-"))
    registry_dir = work / "registry"
    _publish(registry_dir)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = open(work / "server.log", "w")   # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--registry", str(registry_dir),
                               "--model", MODEL, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    attackers: list[tuple[subprocess.Popen, Path]] = []
    proxy: subprocess.Popen | None = None
    conf: Path | None = None
    front = port                                                    # where the clients and the attackers connect
    try:
        _wait_ready(port, server)
        if args.proxy == "nginx":
            proxy, front, conf = _start_nginx(work, port, args.nginx_values)
            _wait_ready(front, server)
        proxy_pids = _tree(proxy.pid) if proxy is not None else []
        _both(front, args, 3.0)                                     # warm-up, not measured
        idle, idle_kept = _both(front, args, args.idle_s)
        attackers = _attackers(args, front, work, env)
        attack_start = time.time()
        cpu_start = {"server": _cpu_s(server.pid), "attackers": sum(_cpu_s(p.pid) for p, _ in attackers),
                     "proxy": sum(_cpu_s(p) for p in proxy_pids)}
        samples: list[dict[str, object]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(5.0):
                s = _sum_reports([r for _, r in attackers])
                samples.append({"t_s": round(time.time() - attack_start, 1), "attacker_open": s["peak_open"],
                                "server_fds": len(os.listdir(f"/proc/{server.pid}/fd")),
                                **({"proxy_fds": _fds(proxy_pids), "proxy_rss_mb": _rss_mb(proxy_pids)}
                                   if proxy_pids else {})})

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(args.ramp_s)                                     # the attackers open their connections
        attack, attack_kept = _both(front, args, args.attack_s)
        attack_elapsed = time.time() - attack_start
        cpu = {"server": _cpu_s(server.pid) - cpu_start["server"],
               "attackers": sum(_cpu_s(p.pid) for p, _ in attackers) - cpu_start["attackers"],
               "proxy": sum(_cpu_s(p) for p in proxy_pids) - cpu_start["proxy"]}
        stop.set()
        server_counts = _scrape_codes(port)
    finally:
        for proc, _ in attackers:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in attackers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if proxy is not None:
            proxy.send_signal(signal.SIGQUIT)                       # nginx: graceful stop
            try:
                proxy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proxy.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    tally = _sum_reports([r for _, r in attackers])
    machine = {**machine_at_start, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    fresh, kept = _summary(idle, attack), _summary(idle_kept, attack_kept)
    met = {name: bool(s["attack_p99_ms"] <= 10 * s["idle_p99_ms"] and s["legit_non_200"] == 0)
           for name, s in (("fresh", fresh), ("keep_alive", kept))}
    proxy_result = {} if proxy is None else {"nginx": {
        "conf": conf.read_text() if conf else "", "version": _nginx_version(),
        "worker_processes": NGINX_WORKERS, "cpu_cores_used": round(cpu["proxy"] / attack_elapsed, 2),
        "cpu_ms_per_attack_connection": round(1e3 * cpu["proxy"] / max(1, tally["opened"]), 3),
        "legit_addr": args.legit_addr, "attack_addr": args.attack_addr, "values": args.nginx_values}}
    return {
        "machine": machine,
        "proxy": args.proxy,
        **proxy_result,
        "attack_connections": args.connections,
        "attack_sources": len(attack_sources(args.attack_addr)),
        # the required fields: the fresh-connection client (the harder case: its connects queue with the attack's)
        **{k: fresh[k] for k in ("idle_p99_ms", "attack_p99_ms", "ratio", "legit_requests", "legit_non_200")},
        "bar_met": met["fresh"],
        "bar_met_keep_alive": met["keep_alive"],
        "fresh_connection_client": fresh,
        "keep_alive_client": kept,
        "attacker": {**tally, "processes": args.attackers, "nice": args.attacker_nice,
                     "cpu_cores_used": round(cpu["attackers"] / attack_elapsed, 2),
                     "connections_per_s": round(tally["opened"] / attack_elapsed, 1), "kinds": list(KINDS), "trickle_s": args.trickle_s,
                     "reconnect_s": args.reconnect_s, "ramp_s": args.ramp_s},
        "server": {**server_counts, "fd_samples": samples,
                   "uv_tcp_single_accept": os.environ.get("UV_TCP_SINGLE_ACCEPT", "1 (serve's own default)"),
                   # share of one core used during the attack (ramp and measured phase)
                   "cpu_cores_used": round(cpu["server"] / attack_elapsed, 2),
                   "cpu_ms_per_attack_connection": round(1e3 * cpu["server"] / max(1, tally["opened"]), 3),
                   "settings": "unlearnd serve defaults: header timeout 10 s, body timeout 30 s, max body 16 MiB, "
                               "max connections = open-files limit - 256"},
        "legit_client": {"rate_per_s": args.rate, "idle_s": args.idle_s, "attack_s": args.attack_s,
                         "clients": "two side by side, each at rate_per_s: a fresh connection per request, and a "
                                    "pool of kept-alive connections", "timeout_s": args.timeout},
    }


def _nginx_version() -> str:
    done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip()


def _finite(obj: object) -> object:
    """``obj`` with NaN (a p99 or ratio with no 200 to measure) as None, so the JSON stays strict."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def report(result: dict[str, object], out: Path, tag: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve_exhaustion" + (f"_{tag}" if tag else "")
    result = _finite(result)    # type: ignore[assignment]
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    a, s, m = result["attacker"], result["server"], result["machine"]
    fresh, kept = result["fresh_connection_client"], result["keep_alive_client"]

    def verdict(ok: object) -> str:
        return "met" if ok else "NOT met"

    lines = [
        "# `unlearnd serve` under 20,000 slow or oversized connections (issue 23)"
        + (" behind nginx" if result.get("proxy") == "nginx" else ""),
        "",
        f"Written by `benchmarks/serve_exhaustion.py` (`make bench-serve-exhaustion"
        f"{'-nginx' if result.get('proxy') == 'nginx' else ''}`). Machine: {m['cores']} cores "
        f"({m['cpu']}), load average {m['loadavg_at_start']} at the start: the CPU is shared with other work, so "
        "the attack, the server and the legitimate clients compete with it and with each other.",
        "",
        f"**Bar (legitimate requests keep their 200s, p99 <= 10x idle): fresh connections {verdict(result['bar_met'])}, "
        f"kept-alive connections {verdict(result['bar_met_keep_alive'])}.** What limits it: "
        "`serve_exhaustion_notes.md`.",
        "",
        "| legitimate client | idle p50 ms | idle p99 ms | attack requests | non-200 | attack p50 ms | attack p99 ms "
        "| ratio | over 900 ms | slowest ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in (("fresh connection per request", fresh), ("kept-alive connections", kept)):
        lines.append(f"| {name} | {c['idle_p50_ms']} | {c['idle_p99_ms']} | {c['legit_requests']} | {c['legit_non_200']} "
                     f"| {c['attack_p50_ms']} | {'- (no 200)' if c['attack_p99_ms'] is None else c['attack_p99_ms']} "
                     f"| {'-' if c['ratio'] is None else str(c['ratio']) + 'x'} "
                     f"| {c['attack_over_900ms']} "
                     f"| {c['attack_max_ms']} |")
    lines += [
        "",
        f"Attack: {result['attack_connections']} connection slots in {a['processes']} processes, a third each "
        f"{', '.join(a['kinds'])}; each slot reconnects {a['reconnect_s']} s after the server closes it; trickle "
        f"every {a['trickle_s']} s; attacker processes at nice {a['nice']}. Connections opened in all: {a['opened']} "
        f"({a['connections_per_s']} per second); at most {a['peak_open']} open at once (attacker's view); answers "
        f"the attackers read: {a['answers']}; closed without an answer: {a['closed_without_answer']}; connects that "
        f"failed: {a['connect_failed']}.",
        "",
        f"Server counters (`unlearnd_serve_requests_total` by code): {s['requests_by_code']}; connections dropped: "
        f"{s['connections_dropped']}. CPU during the attack: the server {s['cpu_cores_used']} cores "
        f"({s['cpu_ms_per_attack_connection']} ms per attacking connection), the attackers {a['cpu_cores_used']} "
        f"cores; load average at the end {result['machine'].get('loadavg_at_end')}. Server file descriptors during the attack (every 5 s): "
        f"{[x['server_fds'] for x in s['fd_samples']]}.",
        "",
        *([f"Proxy: {result['nginx']['version']}, `deploy/nginx/unlearnd-serve.conf.template` with the server's "
           f"limits, {result['nginx']['worker_processes']} worker; clients and attackers connect to it, it to the "
           f"server over kept-alive connections. Legitimate clients from {result['nginx']['legit_addr']}, attackers "
           f"from {result['nginx']['attack_addr']} ("
           + (f"{result['attack_sources']} addresses, each new attacking connection from the next; "
              if result.get("attack_sources", 1) > 1 else "")
           + ("per-address limits OFF" if result["nginx"].get("values", {}).get("CLIENT_KEY") in ('""', "''")
              else "per-address limits on")
           + (f"; template values {result['nginx']['values']}" if result["nginx"].get("values") else "") + "). "
           "nginx CPU during the attack: "
           f"{result['nginx']['cpu_cores_used']} cores ({result['nginx']['cpu_ms_per_attack_connection']} ms per "
           f"attacking connection); its descriptors (every 5 s): {[x.get('proxy_fds') for x in s['fd_samples']]}; "
           f"its resident memory, MiB: {[x.get('proxy_rss_mb') for x in s['fd_samples']]}. "
           "The server counters above are what reached the server.", ""] if "nginx" in result else []),
        f"Legitimate clients: {result['legit_client']['clients']}; {result['legit_client']['rate_per_s']} inferences/s "
        f"each (JSON FP32 [1,1,28,28]), {result['legit_client']['timeout_s']} s timeout; idle "
        f"{result['legit_client']['idle_s']} s, under attack {result['legit_client']['attack_s']} s after a "
        f"{a['ramp_s']} s ramp.",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines))


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--nginx-set {text!r}: expected NAME=VALUE, e.g. CLIENT_KEY='\"\"'")
    return name, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first-slot", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--source", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--source-offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--proxy", choices=("none", "nginx"), default="none",
                   help="none: clients and attackers connect to `unlearnd serve` itself (default); nginx: to "
                        "deploy/nginx's template in front of it (results serve_exhaustion_nginx.*)")
    p.add_argument("--legit-addr", help="source address of the legitimate clients (127.0.0.1; 127.0.0.2 with "
                                        "--proxy nginx, so its per-address limits tell them from the attackers)")
    p.add_argument("--attack-addr", help="source address of the attackers (127.0.0.1; 127.0.0.3 with --proxy nginx)")
    p.add_argument("--attack-addrs", metavar="NETWORK",
                   help="spread the attack over a loopback network (e.g. 127.1.0.0/22: 1,024 addresses), each new "
                        "attacking connection from the next address, as a botnet's hosts; overrides --attack-addr")
    p.add_argument("--nginx-set", action="append", default=[], metavar="NAME=VALUE",
                   help="a deploy/nginx/render.py value over the template's defaults (repeatable), e.g. "
                        "CLIENT_KEY='\"\"' to switch the per-address limits off")
    p.add_argument("--connections", type=int, default=20_000, help="attack connection slots (20000)")
    p.add_argument("--attackers", type=int, default=2, help="attacker processes (2)")
    p.add_argument("--connect-parallel", type=int, default=256, help="connects in flight per attacker (256)")
    p.add_argument("--trickle-s", type=float, default=5.0, help="seconds between an attacker's trickled bytes (5)")
    p.add_argument("--reconnect-s", type=float, default=1.0, help="seconds before a closed slot reconnects (1)")
    p.add_argument("--rate", type=float, default=20.0, help="legitimate inferences per second (20)")
    p.add_argument("--idle-s", type=float, default=45.0, help="idle phase (45 s)")
    p.add_argument("--ramp-s", type=float, default=15.0, help="attack ramp before measuring (15 s)")
    p.add_argument("--attack-s", type=float, default=90.0, help="measured attack phase (90 s)")
    p.add_argument("--timeout", type=float, default=10.0, help="legitimate request timeout (10 s)")
    p.add_argument("--attacker-nice", type=int, default=19,
                   help="nice value of the attacker processes (19: they stand in for clients on other machines, "
                        "taking only CPU the server leaves; 0: they compete with it as equals)")
    p.add_argument("--tag", default="", help="suffix of the result files (serve_exhaustion_<tag>.json)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.legit_addr is None:
        args.legit_addr = "127.0.0.2" if args.proxy == "nginx" else "127.0.0.1"
    if args.attack_addr is None:
        args.attack_addr = "127.0.0.3" if args.proxy == "nginx" else "127.0.0.1"
    if args.attack_addrs is not None:
        args.attack_addr = args.attack_addrs
    try:
        attack_sources(args.attack_addr)
        args.nginx_values = dict(_name_value(v) for v in args.nginx_set)
    except ValueError as exc:
        p.error(str(exc))
    if args.nginx_values and args.proxy != "nginx":
        p.error("--nginx-set needs --proxy nginx")
    if args.proxy == "nginx" and not args.tag:
        args.tag = "nginx"
    if args.attack:
        _raise_open_files(args.connections + 1024)
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_attack(args))
        return 0
    result = run(args)
    report(result, args.out, args.tag)
    print(json.dumps({k: result[k] for k in ("attack_connections", "idle_p99_ms", "attack_p99_ms", "ratio",
                                             "legit_requests", "legit_non_200", "bar_met")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
