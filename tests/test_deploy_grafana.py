"""deploy/grafana: the dashboard is valid JSON with unique panel ids, a sound layout, the rows an operator
needs, queries that name only exported metrics and defined variables, and provisioning that finds it."""

from __future__ import annotations

import itertools
import json
import re

import yaml

from tests.test_deploy_promql import (
    DASHBOARD,
    DEPLOY,
    GRAFANA_BUILTINS,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
    metric_names,
)

GRAFANA = DEPLOY / "grafana"
ROWS = ["Intake and outcomes", "Deletion clock", "Rounds", "Retention and drift", "Capacity", "Serving",
        "Errors and DLQ"]


def _rows(dashboard):  # noqa: ANN001, ANN202 - {row title: [panels below it]}
    rows: dict[str, list] = {}
    current = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = list(panel.get("panels", []))
        else:
            assert current is not None, f"panel {panel['title']!r} is above the first row"
            rows[current].append(panel)
    return rows


def test_dashboard_is_valid_json_with_unique_panel_ids():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "unlearnd" and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_panels_fit_the_grid_without_overlapping():
    panels = [p for p in load_dashboard()["panels"]]
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]

    def cells(p):  # noqa: ANN001, ANN202
        g = p["gridPos"]
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    for a, b in itertools.combinations(panels, 2):
        assert not cells(a) & cells(b), f"panels {a['title']!r} and {b['title']!r} overlap"
    ys = [p["gridPos"]["y"] for p in panels]
    assert ys == sorted(ys), "panels are not listed top to bottom"


def test_dashboard_has_the_rows_an_operator_needs():
    rows = _rows(load_dashboard())
    assert list(rows) == ROWS
    for title, panels in rows.items():
        assert panels, f"row {title!r} is empty"

    def used(row: str) -> set[str]:
        return set().union(*(metric_names(t["expr"]) for p in rows[row] for t in p["targets"]))

    assert {"unlearnd_intake_messages_total", "unlearnd_requests_total"} <= used("Intake and outcomes")
    assert {"unlearnd_oldest_pending_age_seconds", "unlearnd:deletion_deadline_seconds",
            "unlearnd_time_to_forget_seconds_bucket"} <= used("Deletion clock")
    assert {"unlearnd_rounds_total", "unlearnd_round_duration_seconds_bucket"} <= used("Rounds")
    assert {"unlearnd_forget_accuracy_ratio", "unlearnd_probe_accuracy_ratio", "unlearnd_param_drift_l2",
            "unlearnd_prediction_flip_ratio", "unlearnd_importance_density_ratio"} <= used("Retention and drift")
    assert {"unlearnd_retention_headroom_ratio", "unlearnd_retention_gate_floor_ratio", "unlearnd_deletions_since_base",
            "unlearnd_memory_fill_ratio", "unlearnd_memory_free_ratio"} <= used("Capacity")
    assert {"unlearnd_serve_model_version", "unlearnd_model_version", "unlearnd_serve_swaps_total"} <= used("Serving")
    assert {"unlearnd_dlq_total", "unlearnd_consumer_lag_records", "unlearnd_serve_load_failures_total"} <= \
        used("Errors and DLQ")
    probe = " ".join(t["expr"] for p in rows["Retention and drift"] for t in p["targets"])
    assert 'reference="original"' in probe


def test_served_versions_carry_swap_annotations():
    annotations = {a["name"]: a for a in load_dashboard()["annotations"]["list"]}
    swaps = annotations["Version swaps"]
    assert swaps["enable"] and "unlearnd_serve_model_version" in metric_names(swaps["expr"])
    assert "instance" in swaps["tagKeys"]


def test_every_target_has_a_query_a_unique_ref_and_the_dashboard_datasource():
    dashboard = load_dashboard()
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip() and t["datasource"] == panel["datasource"], panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} says nothing about what it shows"


def test_queries_use_only_defined_variables():
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "daemon", "server", "model"} <= defined
    for where, expr in dashboard_queries(dashboard):
        for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", expr):
            assert var in defined or f"${var}" in GRAFANA_BUILTINS, f"{where} uses undefined ${var}"


def test_provisioning_finds_the_dashboard_and_the_datasource_it_names():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        src, dst = volume.split(":")[:2]
        mounts[dst] = (DEPLOY / "compose" / src).resolve()
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "unlearnd.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert mounts[path] == DASHBOARD.parent, "the provider's path is not where compose mounts the dashboards"
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prom = datasources["datasources"][0]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    current = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert current["query"] == "prometheus" and current["current"]["value"] == prom["uid"]
