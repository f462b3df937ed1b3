"""benchmarks/serve_exhaustion.py's attack spread over many source addresses (issue 23, "a botnet"): the sources it
accepts, and a live attacker process binding each new connection to the next address of a loopback network.

The live test runs the benchmark's own attacker process against a small real TCP listener that records each
connection's peer address and closes it (so every slot reconnects, from the next address)."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_exhaustion.py"
_spec = importlib.util.spec_from_file_location("serve_exhaustion", BENCH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_sources_are_one_address_or_every_address_of_a_loopback_network() -> None:
    assert bench.attack_sources("127.0.0.3") == ["127.0.0.3"]
    spread = bench.attack_sources("127.1.0.0/22")
    assert len(spread) == len(set(spread)) == 1024
    assert spread[0] == "127.1.0.0" and spread[-1] == "127.1.3.255"


@pytest.mark.parametrize(("spec", "reason"), [
    ("10.0.0.0/22", "not inside 127.0.0.0/8"),
    ("127.1.0.1/22", "neither an IPv4 address nor a network"),      # host bits set: a typo, not a network
    ("::1", "not inside 127.0.0.0/8"),
    ("127.0.0.0/8", "at most 65,536"),
    ("botnet", "neither an IPv4 address nor a network"),
])
def test_bad_sources_are_refused_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        bench.attack_sources(spec)


def test_the_command_line_refuses_a_bad_network_and_a_malformed_nginx_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--proxy", "nginx", "--attack-addrs", "192.168.0.0/24"])
    assert "not inside 127.0.0.0/8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--proxy", "nginx", "--nginx-set", "CLIENT_KEY"])
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_round_robin_starts_at_the_offset_and_wraps() -> None:
    src = bench._Sources(["a", "b", "c"], offset=2)
    assert [src.next() for _ in range(5)] == ["c", "a", "b", "c", "a"]
    with pytest.raises(ValueError, match="no source"):
        bench._Sources([])


def test_a_live_attacker_spreads_its_connections_over_every_address(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = listener.getsockname()[1]
    peers: Counter[str] = Counter()
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, (addr, _) = listener.accept()
            except (TimeoutError, OSError):
                continue
            peers[addr] += 1
            conn.close()        # the slot reconnects after --reconnect-s, from the next address

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    report = tmp_path / "attacker.json"
    proc = subprocess.Popen([sys.executable, str(BENCH), "--attack", "--port", str(port), "--source", "127.1.0.0/29",
                             "--source-offset", "3", "--connections", "4", "--reconnect-s", "0.05",
                             "--report", str(report)])
    try:
        deadline = time.monotonic() + 30
        while sum(peers.values()) < 80 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        done.set()
        thread.join(timeout=5)
        listener.close()
    assert proc.returncode == 0
    assert set(peers) == {f"127.1.0.{i}" for i in range(8)}, peers
    assert max(peers.values()) - min(peers.values()) <= 8, peers    # round robin: every address about as often
    assert json.loads(report.read_text())["opened"] >= 80
