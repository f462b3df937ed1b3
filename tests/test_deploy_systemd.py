"""deploy/systemd, checked structurally (systemd-analyze needs the installed binary): the daemon and the
templated server restart on failure, stop by SIGTERM with more time than the round grace period, run
commands unlearnd's own CLI parses, and agree with the example configuration on paths and ports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.cli import build_parser
from daemon.pipeline.config import load_config
from daemon.pipeline.config_docs import reference_rows
from tests.test_deploy_promql import DEPLOY

SYSTEMD = DEPLOY / "systemd"
UNITS = ["unlearnd-daemon.service", "unlearnd-serve@.service"]


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat; comments and continuations handled)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: bad section line {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: bad line {line!r}"
        key, value = (s.strip() for s in line.split("=", 1))
        current.setdefault(key, []).append(value)
    return sections


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _unit_env(service: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for item in service.get("Environment", []):
        env.update(pair.split("=", 1) for pair in item.split())
    return env


def _exec_args(unit: dict[str, dict[str, list[str]]], instance: str, env: dict[str, str]) -> list[str]:
    [cmd] = unit["Service"]["ExecStart"]
    cmd = cmd.replace("%i", instance).replace("%H", "host1")
    cmd = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], cmd)
    binary, *args = cmd.split()
    assert binary.startswith("/") and binary.endswith("/unlearnd"), "ExecStart must name the unlearnd binary"
    return args


def _config():  # noqa: ANN202 - the example configuration with the example environment applied
    return load_config(SYSTEMD / "unlearnd.toml", env=_env_file(SYSTEMD / "unlearnd.env"))


@pytest.mark.parametrize("name", UNITS)
def test_unit_restarts_on_failure_and_stops_by_sigterm_after_the_grace_period(name):
    unit = parse_unit(SYSTEMD / name)
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    if name.startswith("unlearnd-serve"):    # exit 2: a bad flag; no restart loop
        assert service["RestartPreventExitStatus"] == ["2"]
    else:   # the daemon also exits 2 when the broker is not reachable at start-up: that must be retried
        assert "RestartPreventExitStatus" not in service
    assert _seconds(service["TimeoutStopSec"][0]) > _config().rounds.grace_period_s
    assert service["User"] == ["unlearnd"] and service["Type"] == ["exec"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert unit["Unit"]["Description"][0]


def test_daemon_unit_runs_the_daemon_on_its_state_directory():
    unit = parse_unit(SYSTEMD / "unlearnd-daemon.service")
    args = build_parser().parse_args(_exec_args(unit, "", {}))
    assert args.func.__name__ == "cmd_run"
    config = _config()
    state_dirs = {f"/var/lib/{d}" for d in unit["Service"]["StateDirectory"][0].split()}
    assert config.state.dir in state_dirs and config.registry.dir in state_dirs
    assert Path(args.config).name == "unlearnd.toml"
    env_files = [f.lstrip("-") for f in unit["Service"]["EnvironmentFile"]]
    assert [Path(f).name for f in env_files] == ["unlearnd.env"]
    settings = {r["env"] for r in reference_rows()}
    assert set(_env_file(SYSTEMD / "unlearnd.env")) <= settings


def test_serve_unit_is_a_template_serving_its_instance_from_the_daemon_registry():
    unit = parse_unit(SYSTEMD / "unlearnd-serve@.service")
    service = unit["Service"]
    env = _unit_env(service)
    env_file = service["EnvironmentFile"][0].lstrip("-")
    assert "%i" in env_file
    env.update(_env_file(SYSTEMD / Path(env_file.replace("%i", "mnist-cnn")).name))
    args = build_parser().parse_args(_exec_args(unit, "mnist-cnn", env))
    config = _config()
    assert args.func.__name__ == "cmd_serve"
    assert args.model == "mnist-cnn" and args.model in [m.name for m in config.models]
    assert args.registry == config.registry.dir
    assert args.server_id == "host1-mnist-cnn"
    assert f"http://127.0.0.1:{args.port}/v2/repository/models/{{name}}/load" in config.serving.notify_urls
    assert config.registry.dir in service["ReadWritePaths"][0].split(), "the lease is written in the registry"
    assert "unlearnd-daemon.service" in unit["Unit"]["After"][0].split()


def test_example_configuration_exposes_metrics_for_prometheus():
    config = _config()
    assert config.metrics.host == "0.0.0.0" and config.metrics.port == 9464
