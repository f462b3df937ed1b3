"""deploy/k8s, checked without a cluster: the kinds an operator needs, selectors that match their pods,
ports and probes that agree, the registry shared read-write-many, a ConfigMap that load_config accepts,
ServiceMonitors that find the Services under the job names the rules expect, and a PrometheusRule that is
the rules file. Run as a script, it regenerates deploy/k8s/prometheusrule.yaml from the rules file."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

if __name__ == "__main__":    # `python tests/test_deploy_k8s.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.cli import build_parser
from daemon.pipeline.config import load_config
from daemon.pipeline.config_docs import reference_rows
from tests.test_deploy_promql import DEPLOY, RULES

K8S = DEPLOY / "k8s"
PROMETHEUS_RULE = K8S / "prometheusrule.yaml"
API = {"ConfigMap": "v1", "Service": "v1", "PersistentVolumeClaim": "v1", "StatefulSet": "apps/v1",
       "Deployment": "apps/v1", "ServiceMonitor": "monitoring.coreos.com/v1",
       "PrometheusRule": "monitoring.coreos.com/v1"}
POD_NAME = "unlearnd-daemon-0"   # what a fieldRef to metadata.name gives the first pod


def _docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return _docs()


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            out[e["name"]] = POD_NAME
    return out


def _args(container: dict[str, Any]):  # noqa: ANN202 - argparse.Namespace from unlearnd's own parser
    env = _env(container)
    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    return build_parser().parse_args(args)


def _daemon_config(docs: list[dict[str, Any]]):  # noqa: ANN202
    sts = _one(docs, "StatefulSet")
    container = _container(sts)
    args = _args(container)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir = str(Path(args.config).parent)
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[config_dir])
    cm = _one(docs, "ConfigMap", volume["configMap"]["name"])
    text = cm["data"][Path(args.config).name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unlearnd.toml"
        path.write_text(text)
        return load_config(path, env=_env(container))


def test_kustomization_lists_every_manifest_and_the_image(docs):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    images = {i["name"]: i["newTag"] for i in kustomization["images"]}
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    built = compose["services"]["daemon"]["image"]          # built from deploy/docker/Dockerfile
    assert f"unlearnd:{images['unlearnd']}" == built
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment"):
            assert _container(d)["image"] == built


def test_every_kind_an_operator_needs_is_there_with_its_api_version(docs):
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Service", "Service", "StatefulSet", "Deployment",
                            "ServiceMonitor", "ServiceMonitor", "PrometheusRule"])
    for d in docs:
        assert d["apiVersion"] == API[d["kind"]], d["kind"]
        assert d["metadata"]["name"]


def test_workload_selectors_match_their_pod_labels(docs):
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment"):
            selector = d["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), d["metadata"]["name"]


def test_each_service_selects_one_workload_and_targets_its_named_ports(docs):
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        ports = {p["name"]: p["containerPort"] for p in _container(matched[0])["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{svc['metadata']['name']}: no container port {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]]
    sts = _one(docs, "StatefulSet")
    headless = _one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_volumes_are_declared_the_state_is_per_pod_and_the_registry_is_shared(docs):
    config = _daemon_config(docs)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    registry_claims = set()
    for w in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"]: t for t in w["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["mountPath"]: m["name"] for m in _container(w)["volumeMounts"]}
        for name in mounts.values():
            assert name in volumes or name in templates, f"{w['metadata']['name']} mounts undeclared volume {name}"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        registry = mounts[config.registry.dir]
        assert registry in volumes, "the registry must be one shared claim, not a per-pod template"
        registry_claims.add(volumes[registry]["persistentVolumeClaim"]["claimName"])
        if w["kind"] == "StatefulSet":
            state = templates[mounts[config.state.dir]]
            assert state["spec"]["accessModes"] == ["ReadWriteOnce"]
        else:
            assert _args(_container(w)).registry == config.registry.dir
    [claim] = registry_claims
    assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_configmap_loads_and_matches_the_daemon_container(docs):
    config = _daemon_config(docs)
    sts = _one(docs, "StatefulSet")
    container = _container(sts)
    settings = {r["env"] for r in reference_rows()}
    for name in _env(container):
        assert name in settings or not name.startswith("UNLEARND_"), f"{name} is not an unlearnd setting"
    assert config.kafka.instance_id == POD_NAME, "each daemon pod needs its own static membership id"
    assert config.metrics.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics.port
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.rounds.grace_period_s
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"


def test_servers_have_health_probes_and_serve_a_model_the_daemon_owns(docs):
    config = _daemon_config(docs)
    deployment = _one(docs, "Deployment")
    container = _container(deployment)
    args = _args(container)
    assert args.func.__name__ == "cmd_serve" and args.host == "0.0.0.0"
    assert args.model in [m.name for m in config.models]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http", "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http", "scheme": "HTTPS"}
    flags = container["args"]
    assert flags[flags.index("--server-id") + 1] == "$(POD_NAME)"     # one lease per replica
    assert "POD_NAME" in {e["name"] for e in container["env"]}
    svc = _one(docs, "Service", "unlearnd-serve")
    assert svc["metadata"]["labels"]["unlearnd.io/model"] == args.model


def test_pipeline_monitors_find_the_services_under_the_job_names_the_rules_use(docs):
    services = [d for d in docs if d["kind"] == "Service"]
    rule_jobs = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    jobs = set()
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        selector = sm["spec"]["selector"]["matchLabels"]
        [svc] = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        for endpoint in sm["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert "jobLabel" not in sm["spec"], "the job label must stay the Service's name"
        jobs.add(svc["metadata"]["name"])
        if "unlearnd.io/model" in svc["metadata"]["labels"]:
            relabel = sm["spec"]["endpoints"][0]["relabelings"]
            assert {"sourceLabels": ["__meta_kubernetes_service_label_unlearnd_io_model"], "targetLabel": "model"} \
                in relabel, "server targets need their model label (the stale-version rule)"
    assert jobs == rule_jobs == {"unlearnd-daemon", "unlearnd-serve"}


def test_prometheus_rule_is_the_rules_file(docs):
    rule = _one(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from the rules file: run `.venv/bin/python tests/test_deploy_k8s.py`")


def write_prometheus_rule() -> None:
    """Regenerate deploy/k8s/prometheusrule.yaml from deploy/prometheus/rules/unlearnd.rules.yml."""
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    header = PROMETHEUS_RULE.read_text().split("apiVersion:", 1)[0]
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "unlearnd", "labels": {"app.kubernetes.io/name": "unlearnd"}},
           "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]}}
    PROMETHEUS_RULE.write_text(header + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120,
                                                  allow_unicode=True))


if __name__ == "__main__":
    write_prometheus_rule()
    print(f"wrote {PROMETHEUS_RULE}")


def test_servers_read_their_token_and_certificate_from_mounted_secrets(docs):
    """Issue 23: serve runs HTTPS with a bearer token, both from Secrets mounted read-only; the serve monitor
    scrapes over HTTPS with the same token."""
    container = _container(_one(docs, "Deployment"))
    args = _args(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    for flag, volume in ((args.token_file, "token"), (args.tls_cert_file, "tls"), (args.tls_key_file, "tls")):
        assert flag.startswith(mounts[volume]["mountPath"] + "/") and mounts[volume]["readOnly"]
        assert "secret" in volumes[volume] and volumes[volume]["secret"]["defaultMode"] & 0o004 == 0
    [endpoint] = _one(docs, "ServiceMonitor", "unlearnd-serve")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["authorization"]["credentials"]["name"] == volumes["token"]["secret"]["secretName"]
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == volumes["tls"]["secret"]["secretName"]
