"""Prometheus config, alert rules (promtool), Grafana provisioning and the metric-name list."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.gateway.log_exporter import GatewayLogMetrics
from serving.monitoring.metric_names import (
    ALERTS_PATH,
    NAMES_PATH,
    alert_expressions,
    dashboard_expressions,
    metric_names_used,
    model_server_metric_names,
    promql_metric_names,
)

MONITORING = ALERTS_PATH.parent
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "kronos-serving.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "kronos.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# The serving runtime's metric contract (kronos_* from the MLServer worker), Prometheus'
# own `up`, and the gateway exporter's series.
RUNTIME_COUNTERS = {
    "kronos_requests_total",
    "kronos_generated_candles_total",
    "kronos_abandoned_series_total",
    # MLServer's main process (serving.server_metrics)
    "kronos_answers_total",
    "kronos_worker_restarts_total",
    "kronos_registry_checks_total",
    # live accuracy (serving.metrics LIVE_*): forecast candles offered to the store, realised candles
    "kronos_live_records_total",
    "kronos_live_actuals_total",
}
RUNTIME_HISTOGRAMS = {
    "kronos_request_seconds",
    "kronos_queue_wait_seconds",
    "kronos_inference_seconds",
    "kronos_batch_series",
    "kronos_batch_requests",
    "kronos_step_series",
}
RUNTIME_GAUGES = {
    "kronos_queue_series",
    "kronos_queue_cost_bytes",
    "kronos_queue_budget_bytes",
    "kronos_running_series",
    "kronos_running_cost_bytes",
    "kronos_running_budget_bytes",
    "kronos_model_info",
    "kronos_model_version",
    "kronos_ready",
    "kronos_last_progress_timestamp_seconds",
    "kronos_worker_resident_memory_bytes",
    "kronos_ready_workers",  # MLServer's main process
    "kronos_registry_up",
    # live accuracy per (model_version, role, horizon) over the rolling window
    "kronos_live_forecasts",
    "kronos_live_mae",
    "kronos_live_mase",
    "kronos_live_directional_accuracy",
    "kronos_live_crps",
    "kronos_live_coverage",
    "kronos_live_coverage_nominal",
}
RUNTIME_SERIES = (
    RUNTIME_COUNTERS | RUNTIME_GAUGES | {f"{h}{s}" for h in RUNTIME_HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
)


def promtool(*args: str | Path, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    """Run promtool; the result carries its exit status and output."""
    return subprocess.run([PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ Prometheus, promtool


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", PROMETHEUS_YML)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_the_jobs_the_alerts_name() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"kronos", "kronos-gateway"} <= jobs
    kronos = next(j for j in config["scrape_configs"] if j["job_name"] == "kronos")
    assert kronos["dns_sd_configs"][0]["port"] == 8082  # MLServer's metrics port
    rules_text = ALERTS_PATH.read_text()
    assert 'up{job="kronos"}' in rules_text and 'up{job="kronos-gateway"}' in rules_text


def test_broken_prometheus_config_is_rejected(tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["rule_files"] = ["missing-rules.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert promtool("check", "config", tmp_path / "prometheus.yml").returncode != 0


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", ALERTS_PATH)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


REQUIRED_ALERTS = {
    "KronosServiceDown",
    "KronosNotReady",
    "KronosHighErrorRatio",
    "KronosHighLatencyP95",
    "KronosQueueSaturated",
    "KronosOverloaded",
    "KronosGatewayRateLimitSurge",
    "KronosModelVersionChanged",
    "KronosWorkerMemoryHigh",
    "KronosLiveCoverageOff",
    "KronosLiveWorseThanPersistence",
}


def _alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS_PATH.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = _alerts()
    names = {rule["alert"] for rule in alerts}
    assert names >= REQUIRED_ALERTS
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fires == names, f"never shown to fire: {names - fires}"
    assert silent == names, f"never shown to stay silent: {names - silent}"
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a threshold too lax: the error-ratio alert no longer fires on 7% errors
        (
            "          > 0.05\n        for: 5m\n        labels:\n          severity: critical",
            "          > 0.5\n        for: 5m\n        labels:\n          severity: critical",
        ),
        # the volume guard gone: an idle gateway with 2 of 4 requests rate-limited would page
        (
            '          and\n          (sum by (job) (rate(kronos_gateway_requests_total{status="429"}[5m])) > 0.2)\n',
            "\n",
        ),
        # no `for`: a readiness blip (or a normal cold start) would page
        (
            "max by (job, instance) (kronos_ready))\n        for: 5m",
            "max by (job, instance) (kronos_ready))\n        for: 0m",
        ),
        # a dead worker (no kronos_ready series at all) would go unnoticed
        (
            '          or\n          (max by (job, instance) (up{job="kronos"}) == 1\n'
            "            unless on (job, instance) max by (job, instance) (kronos_ready))\n",
            "\n",
        ),
        # invalid requests counted as failures
        ('outcome=~"error|timeout|unavailable"', 'outcome=~"error|timeout|unavailable|invalid"'),
        # the nominal gauge matched on no label: ambiguous as soon as two replicas export it
        ("on (job, instance) group_left kronos_live_coverage_nominal", "on () group_left kronos_live_coverage_nominal"),
        # no evidence guard: 30 matched forecasts would be enough to alert on coverage
        ("> 0.15\n              and kronos_live_forecasts >= 50\n", "> 0.15\n"),
        # a tolerance too lax: 55% coverage against a nominal 80% goes unnoticed
        ("kronos_live_coverage_nominal) > 0.15", "kronos_live_coverage_nominal) > 0.3"),
        # MASE exactly 1 (no better than persistence) not reported
        ("kronos_live_mase >= 1", "kronos_live_mase > 1"),
        # no evidence guard on MASE
        ("kronos_live_mase >= 1\n              and kronos_live_forecasts >= 50\n", "kronos_live_mase >= 1\n"),
        # one alert per replica instead of one per version, role and horizon
        (
            "max by (job, model_version, role, horizon) (\n            kronos_live_mase",
            "max by (job, instance, model_version, role, horizon) (\n            kronos_live_mase",
        ),
        # a short `for`: a volatile half hour would page
        (
            "kronos_live_mase >= 1\n              and kronos_live_forecasts >= 50\n          )\n        for: 1h",
            "kronos_live_mase >= 1\n              and kronos_live_forecasts >= 50\n          )\n        for: 30m",
        ),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, old: str, new: str) -> None:
    text = ALERTS_PATH.read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    assert promtool("check", "rules", tmp_path / "alerts.yml").returncode == 0
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0, result.stdout


# ------------------------------------------------------------------ Grafana provisioning


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _datasource_uid() -> str:
    provisioning = yaml.safe_load(DATASOURCES.read_text())
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    return str(source["uid"])


def test_dashboard_provider_points_at_a_file_directory() -> None:
    provisioning = yaml.safe_load(PROVIDERS.read_text())
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


def test_dashboard_json_is_in_provisioning_format() -> None:
    dashboard = _dashboard()
    assert "__inputs" not in dashboard  # an export-for-sharing file does not provision
    assert "${DS_" not in DASHBOARD.read_text()
    assert dashboard["uid"] == "kronos-serving" and dashboard["title"]
    assert dashboard.get("id") is None
    assert isinstance(dashboard["schemaVersion"], int)
    uid = _datasource_uid()
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat", "table", "gauge", "bargauge"}
        assert panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h"))
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":  # an expanded row: a full-width header, its panels follow it
            assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1)
            assert panel["collapsed"] is False and panel["panels"] == [] and "targets" not in panel
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids))
        for target in targets:
            assert target["expr"].strip()
            assert target["datasource"] == {"type": "prometheus", "uid": uid}


def test_dashboard_has_the_required_panels() -> None:
    titles = " | ".join(panel["title"].lower() for panel in _dashboard()["panels"])
    for wanted in (
        "requests by outcome",
        "latency percentiles",
        "batch size",
        "queue",
        "errors by kind",
        "model version",
        "gateway 4xx / 5xx",
        "live mase",
        "coverage vs nominal",
        "mae and crps",
        "directional accuracy",
        "matched forecasts",
        "records by result",
    ):
        assert wanted in titles, wanted


def test_live_accuracy_row_holds_the_live_panels() -> None:
    """Every panel reading a kronos_live_* series sits below the "Live accuracy" row, and
    every panel below it reads one; the MASE panel draws its "no better than persistence"
    line at 1 and the coverage panel shows the nominal gauge."""
    panels = _dashboard()["panels"]
    (row,) = [panel for panel in panels if panel["type"] == "row" and panel["title"] == "Live accuracy"]
    row_y = row["gridPos"]["y"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        names: set[str] = set()
        for target in panel["targets"]:
            names |= promql_metric_names(target["expr"])
        live = any(name.startswith("kronos_live_") for name in names)
        assert live == (panel["gridPos"]["y"] > row_y), panel["title"]
    by_title = {panel["title"].lower(): panel for panel in panels}
    (mase,) = [panel for title, panel in by_title.items() if "live mase" in title]
    steps = mase["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [step["value"] for step in steps] == [None, 1]
    assert mase["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"
    (coverage,) = [panel for title, panel in by_title.items() if "coverage vs nominal" in title]
    assert any("kronos_live_coverage_nominal" in target["expr"] for target in coverage["targets"])


# ------------------------------------------------------------------ metric names


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (job, le) (rate(kronos_request_seconds_bucket"
        '{outcome=~"ok|x", le!="1"}[$__rate_interval]))) > 6e9 and on (job) up == 1 '
        "unless time() - kronos_last_progress_timestamp_seconds offset 5m > 180"
    )
    assert promql_metric_names(expr) == {
        "kronos_request_seconds_bucket",
        "up",
        "kronos_last_progress_timestamp_seconds",
    }


def test_metric_names_file_is_current() -> None:
    listed = NAMES_PATH.read_text().split()
    assert listed == metric_names_used(), "refresh with: python -m serving.monitoring.metric_names --write"


def test_alerts_and_dashboard_use_only_exported_names() -> None:
    used = set(metric_names_used())
    assert alert_expressions() and dashboard_expressions()
    gateway = {name for name in used if name.startswith("kronos_gateway_")}
    unknown = used - RUNTIME_SERIES - gateway - {"up"}
    assert not unknown, f"not exported by anyone: {sorted(unknown)}"
    assert set(model_server_metric_names()) == used - gateway - {"up"}
    # the dashboard reads every metric of the runtime contract at least once
    dashboard_names: set[str] = set()
    for expr in dashboard_expressions():
        dashboard_names |= promql_metric_names(expr)
    bases = {
        name.removesuffix(s) for name in dashboard_names for s in ("_bucket", "_sum", "_count") if name.endswith(s)
    }
    missing = (RUNTIME_COUNTERS | RUNTIME_GAUGES | RUNTIME_HISTOGRAMS) - dashboard_names - bases
    assert not missing, f"no panel shows {sorted(missing)}"


def test_gateway_names_used_are_exported_by_the_gateway_exporter() -> None:
    metrics = GatewayLogMetrics()
    metrics.observe_line(json.dumps({"status": 200, "route": "grpc", "request_time": 0.1, "grpc_status": "0"}))
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    gateway = {name for name in metric_names_used() if name.startswith("kronos_gateway_")}
    assert gateway and gateway <= exported


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query (as a recording rule; Grafana's $__rate_interval
    becomes 5m), so a typo in a panel fails here instead of showing an empty panel."""
    exprs = dashboard_expressions()
    rules: dict[str, Any] = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", tmp_path / "dashboard-rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout
    # and the check bites: a broken query is reported
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(kronos_requests_total[5m])"
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", tmp_path / "dashboard-rules.yml").returncode != 0
