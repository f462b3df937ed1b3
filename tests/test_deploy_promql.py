"""What the deployment files query: metric names read out of PromQL, the rules and the dashboard.

The other ``test_deploy_*`` modules import these helpers; the tests here check the PromQL reader itself,
and that every metric the rules and the dashboard name is one the code defines (the live test in
``test_deploy_live.py`` then finds each of them in a real Prometheus's TSDB).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "unlearnd.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "unlearnd.json"

# Series that Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Grafana's built-in variables, and what to put in their place to run a query against Prometheus.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}
_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:[smhdwy]|ms)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<var>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<space>\s+)
  | (?P<other>.)
""", re.VERBOSE)


def require_binary(name: str) -> str:
    """The path of a binary the deployment tests need; missing, the test fails (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test-deps` (Debian's prometheus package)")
    return path


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "", m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (label names, functions and keywords left out)."""
    tokens = _tokens(expr)
    names: set[str] = set()
    i = 0
    depth_skip: list[str] = []   # closing brackets of spans that hold no metric names
    while i < len(tokens):
        kind, text = tokens[i]
        if depth_skip:
            if kind == "open":
                depth_skip.append({"(": ")", "{": "}", "[": "]"}[text])
            elif kind == "close" and text == depth_skip[-1]:
                depth_skip.pop()
            i += 1
            continue
        if kind == "open" and text in "{[":
            depth_skip.append("}" if text == "{" else "]")      # label matchers, ranges, subquery steps
        elif kind == "ident":
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
            low = text.lower()
            if low in _LABEL_LIST_KEYWORDS:
                if nxt == ("open", "("):
                    depth_skip.append(")")                      # by (job, instance): label names
                    i += 1
            elif low in _KEYWORDS or low in _AGGREGATORS or nxt == ("open", "("):
                pass                                            # an operator, an aggregation or a function
            else:
                names.add(text)
        i += 1
    return names


def substitute_grafana(expr: str) -> str:
    """A dashboard query made runnable on Prometheus: built-ins replaced, multi-value variables as ``.*``."""
    for var, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in load_rules() if "alert" in r}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and template variable of the dashboard."""
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {target.get('refId')}", target["expr"]))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_]+\)", query)
            out.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return out


def rule_queries() -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for r in load_rules()]


def exported_metric_names() -> set[str]:
    """The sample names the daemon and the server export, read from their metric definitions."""
    from daemon.pipeline.metrics import DaemonMetrics
    from daemon.serving.metrics import ServeMetrics

    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count",
                                                                                "_created")}
    names = set()
    for registry in (DaemonMetrics().registry, ServeMetrics().registry):
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


# -- the PromQL reader ------------------------------------------------------------------------------
@pytest.mark.parametrize(("expr", "expected"), [
    ("up", {"up"}),
    ('sum by (job, instance) (rate(unlearnd_dlq_total{reason=~"a|b"}[5m]))', {"unlearnd_dlq_total"}),
    ('a{x="y"} - ignoring(reference) b{reference="current"}', {"a", "b"}),
    ("max by (model) (v) - on(model) group_right(extra) w > 0", {"v", "w"}),
    ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
    ('avg_over_time((d{reference="previous"} > 0)[1d:1m]) offset 5m', {"d"}),
    ("x > scalar(unlearnd:deletion_deadline_seconds{severity=\"warning\"})", {"x", "unlearnd:deletion_deadline_seconds"}),
    ("vector(86400)", set()),
    ('up{job="x"} == 0 or absent(up{job="x"})', {"up"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)") and bool n', {"m", "n"}),
    ("sum without (le) (c) / count(c) unless topk(3, e)", {"c", "e"}),
])
def test_metric_names_reads_selectors_and_nothing_else(expr, expected):
    assert metric_names(expr) == expected


def test_substitute_grafana_makes_queries_runnable():
    assert substitute_grafana('rate(x{instance=~"$daemon"}[$__rate_interval])') == 'rate(x{instance=~".*"}[1m])'
    assert substitute_grafana("increase(x[$__range])") == "increase(x[1h])"


# -- what the rules and the dashboard name exists in the code ---------------------------------------
def test_exported_names_cover_the_contract_metrics():
    names = exported_metric_names()
    for metric in ("unlearnd_requests_total", "unlearnd_dlq_total", "unlearnd_rounds_total",
                   "unlearnd_round_duration_seconds_bucket", "unlearnd_time_to_forget_seconds_bucket",
                   "unlearnd_pending_requests", "unlearnd_oldest_pending_age_seconds",
                   "unlearnd_forget_accuracy_ratio", "unlearnd_probe_accuracy_ratio", "unlearnd_param_drift_l2",
                   "unlearnd_prediction_flip_ratio", "unlearnd_importance_density_ratio", "unlearnd_model_version",
                   "unlearnd_consumer_lag_records", "unlearnd_serve_model_version", "unlearnd_serve_requests_total",
                   "unlearnd_memory_fill_ratio", "unlearnd_memory_free_ratio", "unlearnd_retention_headroom_ratio",
                   "unlearnd_retention_gate_floor_ratio", "unlearnd_deletions_since_base",
                   "unlearnd_stale_owner_refusals_total"):
        assert metric in names


def test_every_metric_the_rules_use_is_exported_recorded_or_made_by_prometheus():
    known = exported_metric_names() | recorded_names() | PROMETHEUS_SERIES
    for where, expr in rule_queries():
        unknown = metric_names(expr) - known
        assert not unknown, f"rule {where} uses {sorted(unknown)}, which nothing exports"


def test_every_dashboard_query_names_exported_metrics_only():
    exported = exported_metric_names()
    known = exported | recorded_names()
    dashboard = load_dashboard()
    for where, expr in dashboard_queries(dashboard):
        unknown = metric_names(expr) - known
        assert not unknown, f"{where} uses {sorted(unknown)}, which neither the daemon nor the server exports"
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        used = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
        assert used & exported, f"panel {panel['title']!r} names no metric the daemon or the server exports"
