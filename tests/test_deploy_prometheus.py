"""deploy/prometheus: promtool accepts the configuration and the rules, and the rule unit tests pass;
every alert fires in a unit test and stays silent in another, and has a summary and a runbook."""

from __future__ import annotations

import re
import subprocess
from fnmatch import fnmatch

import pytest
import yaml

from tests.test_deploy_promql import DEPLOY, ROOT, RULES, alerts, load_rules, require_binary

PROM = DEPLOY / "prometheus"
RULE_TESTS = sorted((PROM / "tests").glob("*.test.yml"))
OPERATIONS = ROOT / "docs" / "operations.md"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_promtool_check_config_accepts_the_scrape_configuration_and_its_rule_files():
    result = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules_accepts_the_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(load_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests"
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_fires_in_a_unit_test_and_stays_silent_in_another():
    fired: dict[str, int] = {}
    silent: dict[str, int] = {}
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert [str((path.parent / f).resolve()) for f in doc["rule_files"]] == [str(RULES)]
        # promtool orders groups at random unless told: recording rules first, as the alerts read them
        assert doc["group_eval_order"] == [g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]]
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                bucket = fired if case.get("exp_alerts") else silent
                bucket[case["alertname"]] = bucket.get(case["alertname"], 0) + 1
                for exp in case.get("exp_alerts") or []:
                    # promtool compares annotations too: the rendered texts are under test
                    assert set(exp["exp_annotations"]) == {"summary", "description", "runbook_url"}
    names = set(alerts())
    assert names - set(fired) == set(), "alerts no unit test fires"
    assert names - set(silent) == set(), "alerts no unit test keeps silent"
    assert set(fired) | set(silent) <= names, "unit tests name alerts that do not exist"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    runbook = OPERATIONS.read_text()
    anchors = {re.sub(r"[^a-z0-9_-]", "", h.strip().lower().replace(" ", "-"))
               for h in re.findall(r"^#{2,4} (.+)$", runbook, re.MULTILINE)}
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        ann = rule["annotations"]
        assert ann["summary"].strip() and ann["description"].strip(), name
        assert ann["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"
        section = runbook.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert len(section.split()) >= 40, f"the runbook of {name} is too short to act on"


def test_scrape_configuration_names_the_jobs_the_rules_expect():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert {"unlearnd-daemon", "unlearnd-serve"} <= set(jobs)
    for static in jobs["unlearnd-serve"]["static_configs"]:
        assert static["labels"]["model"], "every server target needs its model label (the stale-version rule)"
    rule_exprs = " ".join(r["expr"] for r in load_rules())
    for job in re.findall(r'job="([^"]+)"', rule_exprs):
        assert job in jobs, f"the rules select job {job!r}, which prometheus.yml does not scrape"
    relative = RULES.relative_to(PROM).as_posix()
    assert any(fnmatch(relative, pattern) for pattern in cfg["rule_files"])


@pytest.mark.parametrize("name", ["UnlearndDeletionClockWarning", "UnlearndDeletionDeadlineMissed"])
def test_the_deletion_deadline_is_read_from_its_recording_rules(name):
    expr = alerts()[name]["expr"]
    assert "unlearnd:deletion_deadline_seconds" in expr
    deadlines = {r["labels"]["severity"]: r["expr"] for r in load_rules()
                 if r.get("record") == "unlearnd:deletion_deadline_seconds"}
    assert deadlines == {"warning": "vector(86400)", "critical": "vector(259200)"}


def test_the_secure_scrape_configuration_uses_https_mutual_tls_and_a_token_file(tmp_path):
    """deploy/prometheus/prometheus-secure.yml (issue 23): promtool accepts it once its secret files exist, and
    it scrapes the same jobs as prometheus.yml, each over HTTPS with a CA, a client certificate and a token."""
    secure = PROM / "prometheus-secure.yml"
    doc = yaml.safe_load(secure.read_text())
    plain = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {j["job_name"] for j in plain["scrape_configs"]}
    assert doc["rule_files"] == plain["rule_files"]
    for name in ("unlearnd-daemon", "unlearnd-serve"):
        job = jobs[name]
        assert job["scheme"] == "https"
        assert set(job["tls_config"]) == {"ca_file", "cert_file", "key_file"}
        assert job["authorization"] == {"credentials_file": "/etc/prometheus/secrets/token"}
    # promtool checks that the files exist: give it a copy whose secrets live in tmp_path
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for f in ("ca.pem", "client.pem", "client.key", "token"):
        (secrets / f).write_text("placeholder\n")
    (tmp_path / "rules").symlink_to(PROM / "rules")
    copy = tmp_path / "prometheus-secure.yml"
    copy.write_text(secure.read_text().replace("/etc/prometheus/secrets", str(secrets)))
    result = _promtool("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
