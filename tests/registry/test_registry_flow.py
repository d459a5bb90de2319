"""The whole registry workflow through the CLI (subprocesses), on sqlite and on a real
`mlflow server` backed by PostgreSQL with proxied artifacts."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from registry_helpers import one_line_error, run_cli

MODEL = "kronos"
TINY_EVAL = ["--windows", "2", "--context", "48", "--horizon", "4", "--samples", "3"]


def _ok(result) -> None:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"


def _aliases(client: MlflowClient) -> dict[str, str]:
    """Aliases as strings (sqlite returns int versions, HTTP returns str)."""
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("registry_uri", ["sqlite", "postgres"], indirect=True)
def test_log_promote_evaluate_gate_rollback_history(registry_uri: str) -> None:
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)

    # log v1 (demo weights, loudly tagged) as champion: the bootstrap path `log --promote`
    logged = run_cli(registry_uri, "log", "--demo", "--demo-seed", "1", "--promote", "--reason", "bootstrap")
    _ok(logged)
    assert "RANDOM WEIGHTS" in logged.stderr
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["kronos.demo"] == "true"
    assert tags["kronos.weights.source"] == "demo:random(seed=1)"
    assert len(tags["kronos.config_digest"]) == 16 and tags["kronos.code_version"].startswith("0.")
    assert _aliases(client) == {"champion": "1"}

    # log v2, evaluate challenger (v2) vs champion (v1) vs persistence
    _ok(run_cli(registry_uri, "log", "--demo", "--demo-seed", "7"))
    assert _aliases(client) == {"champion": "1", "challenger": "2"}
    evaluated = run_cli(registry_uri, "evaluate", *TINY_EVAL)
    _ok(evaluated)
    assert all(label in evaluated.stdout for label in ("persistence", "v1", "v2"))
    for version in ("1", "2"):
        tags = client.get_model_version(MODEL, version).tags
        assert {"eval.mae", "eval.rmse", "eval.mase", "eval.crps", "eval.coverage"} <= set(tags)
        run = client.get_run(tags["eval.run_id"])
        assert run.data.tags["kronos.model_version"] == version
        assert {"mae", "mase", "crps", "coverage", "persistence_mae"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"windows.csv", "fan_chart.png"}
        if registry_uri.startswith("http"):
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    # demo weights lose to persistence: the default gate refuses, champion stays
    mase = float(client.get_model_version(MODEL, "2").tags["eval.mase"])
    assert mase > 1.0
    refused = one_line_error(run_cli(registry_uri, "promote"), 3)
    assert "does not beat persistence" in refused and f"{mase:.4f}" in refused
    assert _aliases(client)["champion"] == "1"

    # a gate loose enough passes (sqlite), --force overrides it (server); then roll back
    if registry_uri.startswith("sqlite"):
        _ok(run_cli(registry_uri, "promote", "--max-mase", "1000", "--tolerance", "1000"))
    else:
        _ok(run_cli(registry_uri, "promote", "--force", "--reason", "accepted risk"))
    assert _aliases(client) == {"champion": "2"}
    _ok(run_cli(registry_uri, "rollback", "--reason", "tests"))
    assert _aliases(client) == {"champion": "1"}

    history = run_cli(registry_uri, "history")
    _ok(history)
    events = [line.split() for line in history.stdout.splitlines() if line[:4].isdigit() and len(line) > 30]
    assert [(e[0], e[2], e[3]) for e in events] == [
        ("0001", "promote", "1"),
        ("0002", "promote", "2"),
        ("0003", "rollback", "1"),
    ]
    assert all("registry-tests" in e for e in events)
    assert ("yes" in events[1]) == registry_uri.startswith("http")  # forced promotions are marked
