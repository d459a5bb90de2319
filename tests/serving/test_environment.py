"""KRONOS_* variables: a name no settings class reads (a typo) stops the server at start-up
instead of being ignored."""

from __future__ import annotations

import json

import pytest
from serving_helpers import start_server

from model_package.settings import ModelSettings, check_environment, settings_variables
from serving.settings import OTHER_NAMESPACES, ServingSettings, check_server_environment


def test_known_variables_pass_and_a_typo_is_named_with_a_hint():
    known = {"KRONOS_QUEUE_BUDGET_MB": "10", "KRONOS_DEVICE": "cpu", "KRONOS_GATEWAY_HTTP_PORT": "1", "OTHER": "x"}
    check_environment(ModelSettings, ServingSettings, other_namespaces=OTHER_NAMESPACES, environ=known)
    with pytest.raises(ValueError, match=r"KRONOS_QUEUE_BUDGET_M \(did you mean KRONOS_QUEUE_BUDGET_MB\?\)"):
        check_environment(
            ModelSettings,
            ServingSettings,
            other_namespaces=OTHER_NAMESPACES,
            environ={**known, "KRONOS_QUEUE_BUDGET_M": "10"},
        )


def test_every_serving_setting_is_a_known_variable(monkeypatch):
    for name in settings_variables(ModelSettings, ServingSettings):
        monkeypatch.setenv(name, "1" if not name.endswith(("_URI", "_MODE", "_DEVICE", "_LEVEL")) else "x")
    monkeypatch.setenv("KRONOS_LOG_LEVE", "DEBUG")
    with pytest.raises(ValueError, match="KRONOS_LOG_LEVE "):
        check_server_environment()


@pytest.mark.integration
def test_a_server_with_a_mistyped_variable_refuses_to_start(serving_registry, tmp_path):
    with pytest.raises(RuntimeError) as caught:
        start_server(tmp_path / "mlserver", serving_registry.tracking_uri, env={"KRONOS_QUEUE_BUDGET_M": "10"})
    assert "mlserver exited with 1" in str(caught.value)
    lines = [
        json.loads(line) for line in (tmp_path / "mlserver" / "mlserver.log").read_text().splitlines() if line.strip()
    ]
    assert any("KRONOS_QUEUE_BUDGET_M (did you mean KRONOS_QUEUE_BUDGET_MB?)" in json.dumps(line) for line in lines)
