"""KRONOS_ALIAS_POLL_S: the runtime follows the alias by itself (real MLServer process)."""

from __future__ import annotations

import time

import httpx
import pytest
from serving_helpers import history, metric_value, start_server

pytestmark = pytest.mark.integration


def test_runtime_follows_the_alias_when_polling(serving_registry, tmp_path):
    server = start_server(tmp_path / "mlserver", serving_registry.tracking_uri, env={"KRONOS_ALIAS_POLL_S": "0.5"})
    frame = history(["Q"], seed=2)
    try:
        with httpx.Client(timeout=60) as client:

            def served_version() -> str:
                reply = server.infer(client, frame, {"pred_len": 2, "top_k": 1})
                assert reply.status_code == 200, reply.text
                return reply.json()["parameters"]["model_version"]

            def metadata_version() -> str:
                reply = client.get(f"{server.url}/v2/models/kronos")
                assert reply.status_code == 200, reply.text
                return reply.json()["parameters"]["model_version"]

            assert served_version() == "1"
            assert metadata_version() == "1"  # MLServer would keep this answer from now on
            serving_registry.set_champion("2")
            deadline = time.monotonic() + 60
            while served_version() != "2":
                assert time.monotonic() < deadline, "the runtime never swapped to v2"
                time.sleep(0.3)
            assert metadata_version() == "2"  # the metadata names the version being served
            text = server.metrics()
            assert metric_value(text, "kronos_model_version") == 2
            assert metric_value(text, "kronos_model_info", model_version="2") == 1
            assert metric_value(text, "kronos_model_info", model_version="1") == 0
    finally:
        serving_registry.set_champion("1")
        server.stop()
