"""A real Prometheus (Debian's package) scrapes a running daemon and a running server, with the rules of
deploy/prometheus loaded: every metric the rules and the dashboard use is in its TSDB, every query runs,
the rules evaluate without errors, and ``promtool check metrics`` accepts both ``/metrics`` outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pipeline_harness import (
    Broker,
    DaemonProcess,
    copy_registry,
    free_port,
    outcome_receipts,
    produce_requests,
    read_topic,
    request,
    write_config,
)
from tests.test_deploy_promql import (
    ROOT,
    RULES,
    dashboard_queries,
    load_dashboard,
    metric_names,
    recorded_names,
    require_binary,
    rule_queries,
    substitute_grafana,
)

pytestmark = pytest.mark.slow
MODEL = "mnist-cnn"


@dataclass
class Stack:
    prometheus: str        # http://127.0.0.1:PORT
    daemon_metrics: str    # http://127.0.0.1:PORT/metrics
    serve_metrics: str
    names: set[str]        # metric names in Prometheus's TSDB once the scenario ran


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _api(base: str, path: str, **params: str) -> Any:
    body = json.loads(_get(f"{base}{path}?{urllib.parse.urlencode(params)}"))
    assert body["status"] == "success", body
    return body["data"]


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError as exc:      # not listening yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last_exc}" if last_exc else ""))


def _value(base: str, query: str) -> float | None:
    """The first sample of an instant query (None when it has none)."""
    result = _api(base, "/api/v1/query", query=query)["result"]
    return float(result[0]["value"][1]) if result else None


def _infer_version(port: int) -> int:
    body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": [0.0] * 784}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(json.loads(resp.read())["model_version"])


def _needed_names() -> set[str]:
    used: set[str] = set()
    for _, expr in rule_queries() + dashboard_queries(load_dashboard()):
        used |= metric_names(expr)
    return used


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mnist_registry: Path):
    prometheus_bin = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("deploy-live")
    reg = copy_registry(mnist_registry, tmp / "registry")
    metrics_port, serve_port, prom_port = free_port(), free_port(), free_port()
    broker = Broker().start()
    procs: list[subprocess.Popen] = []
    daemon = DaemonProcess(write_config(tmp / "unlearnd.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                                        state_dir=tmp / "state", metrics_port=metrics_port),
                           tmp / "daemon.log")
    try:
        daemon.start()
        with (tmp / "serve.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "serve", "--registry", str(reg), "--model", MODEL,
                 "--port", str(serve_port), "--poll-interval", "0.1", "--server-id", "deploy-test"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        # the test's own Prometheus: the shipped rules, the shipped job names and model label, real ports
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "unlearnd-daemon", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
                {"job_name": "unlearnd-serve", "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"],
                                                                     "labels": {"model": MODEL}}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run([require_binary("promtool"), "check", "config", str(tmp / "prometheus.yml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        with (tmp / "prometheus.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{prom_port}"

        # one valid request (applied: rounds, histograms, drift gauges, a new version the server swaps to)
        # and one invalid (rejected: a DLQ reason); then one inference so the server has request series
        daemon.wait_assigned()
        assert _wait(lambda: _infer_version(serve_port), 60, "the server to answer") == 1
        produce_requests(broker.bootstrap, [
            request("deploy-live-ok", "forget", ["mnist-train:0"]),
            request("deploy-live-bad", "forget", ["mnist-train:99999999"]),
        ])
        receipts = outcome_receipts(read_topic(broker.bootstrap, "unlearn.receipts", timeout=120,
                                               until=lambda rs: len(outcome_receipts(rs)) >= 2))
        assert {k: [r["status"] for r in v] for k, v in receipts.items()} == {
            "deploy-live-ok": ["applied"], "deploy-live-bad": ["rejected"]}, daemon.tail()
        assert _wait(lambda: _infer_version(serve_port) == 2, 30, "the server to swap to version 2")

        needed = _needed_names()

        def scraped() -> set[str] | None:
            names = set(_api(base, "/api/v1/label/__name__/values"))
            return names if needed <= names else None

        try:
            names = _wait(scraped, 30, "Prometheus to hold every metric the rules and the dashboard use", 0.5)
        except AssertionError:
            names = set(_api(base, "/api/v1/label/__name__/values"))
        else:   # names can be complete before the scrape that follows the swap: wait for the end state too
            _wait(lambda: (_value(base, "max(unlearnd_serve_model_version)") == 2
                           and _value(base, "max(unlearnd:serve_versions_behind)") == 0
                           and _value(base, 'sum(unlearnd_rounds_total{outcome="applied"})') == 1),
                  30, "Prometheus to scrape the scenario's end state", 0.5)
        yield Stack(base, f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{serve_port}/metrics",
                    names)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.terminate()
        broker.stop()


def test_every_metric_the_rules_and_the_dashboard_use_is_in_the_tsdb(stack):
    missing = _needed_names() - stack.names
    assert not missing, f"not in Prometheus's TSDB after scraping a daemon and a server: {sorted(missing)}"
    # and the recording rules, evaluated on the scraped series, wrote their results
    assert recorded_names() <= stack.names


def test_every_dashboard_and_rule_query_runs_on_prometheus(stack):
    for where, expr in dashboard_queries(load_dashboard()) + rule_queries():
        _api(stack.prometheus, "/api/v1/query", query=substitute_grafana(expr))   # asserts status success, where


def test_the_rules_load_and_evaluate_without_errors(stack):
    groups = _api(stack.prometheus, "/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(rule_queries())
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # nothing fires on a healthy stack
    firing = [a for a in _api(stack.prometheus, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], firing


def test_the_stale_version_join_matches_the_real_labels(stack):
    result = _api(stack.prometheus, "/api/v1/query", query="unlearnd:serve_versions_behind")["result"]
    assert [(r["metric"]["job"], r["metric"]["model"], r["value"][1]) for r in result] == [
        ("unlearnd-serve", MODEL, "0")]


def test_dashboard_panels_show_the_scenario(stack):
    def value(expr: str) -> float | None:
        return _value(stack.prometheus, substitute_grafana(expr))

    assert value('max by (instance, model) (unlearnd_serve_model_version{instance=~"$server"})') == 2
    assert value('sum(unlearnd_rounds_total{outcome="applied"})') == 1
    assert value('sum(unlearnd_requests_total{status="rejected"})') == 1
    assert value("sum(unlearnd_dlq_total)") == 1


@pytest.mark.parametrize("which", ["daemon", "serve"])
def test_promtool_check_metrics_accepts_the_metrics_output(stack, which):
    text = _get(stack.daemon_metrics if which == "daemon" else stack.serve_metrics)
    result = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"unlearnd_" in text
