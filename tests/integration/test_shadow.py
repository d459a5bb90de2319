"""Shadow challenger, end to end: a real nginx gateway sends every inference request (REST
and gRPC) to the champion's MLServer and a copy to the challenger's; the client gets the
champion's answer only, the challenger's answer is recorded in the shared live store (a
real PostgreSQL, as in the compose stack), a stalled challenger never holds up the
champion's clients, and `kronos-registry promote --evidence live` gates on the forecasts
both answered for the same requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from integration_helpers import ADMIN, CLIENT
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from serving_helpers import (
    TINY_MAX_CONTEXT,
    Server,
    grpc_request,
    history,
    response_frame,
    start_server,
    v2_request,
    wait_for,
)
from support import Postgres

from model_package import KronosForecaster
from model_package.kronos import load_model, write_random_checkpoint
from serving.gateway.process import GatewayProcess
from serving.live.accuracy import paired_accuracy
from serving.live.store import LiveStore
from serving.local_server import MODEL_NAME, LocalRegistry, local_gateway_settings

pytestmark = pytest.mark.integration

PARAMS = {"pred_len": 4, "top_k": 1}  # greedy: each version's answer is known exactly
TIMEOUT_S = 120.0


@dataclass
class ShadowStack:
    registry: LocalRegistry
    champion: Server
    challenger: Server
    gateway: GatewayProcess
    store_uri: str
    challenger_forecaster: KronosForecaster

    def infer(self, client: httpx.Client, frame: pd.DataFrame, request_id: str) -> httpx.Response:
        return client.post(
            f"{self.gateway.http_url}/v2/models/{MODEL_NAME}/infer",
            json=v2_request(frame, PARAMS),
            headers={"X-Request-ID": request_id},
        )

    def paired(self) -> pd.DataFrame:
        with LiveStore.open(self.store_uri) as store:
            return paired_accuracy(store.matched(), "1", "2")


@pytest.fixture(scope="module")
def shadow(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]) -> Iterator[ShadowStack]:
    """kronos v1 (champion) and v2 (challenger: other predictor weights), each on its own
    MLServer, one PostgreSQL live store for both, and a gateway copying all inference to v2."""
    root = tmp_path_factory.mktemp("shadow")
    tokenizer_dir, model_dir = tiny_checkpoints
    other = write_random_checkpoint(load_model(model_dir).config, root / "model-v2", seed=7)
    registry = LocalRegistry.create(root / "registry", "kronos-shadow-tests")
    registry.log_version(tokenizer_dir, model_dir, max_context=TINY_MAX_CONTEXT, champion=True, example_rows=16)
    registry.log_version(tokenizer_dir, other, max_context=TINY_MAX_CONTEXT, example_rows=16)
    registry.client().set_registered_model_alias(MODEL_NAME, "challenger", "2")
    postgres = Postgres.start()  # the live store of both servers, as in the compose stack
    store_uri = postgres.url
    live_env = {"KRONOS_LIVE_STORE_URI": store_uri}
    champion = challenger = None
    try:
        champion = start_server(root / "champion", registry.tracking_uri, env=live_env)
        challenger = start_server(
            root / "challenger",
            registry.tracking_uri,
            env={**live_env, "KRONOS_MODEL_URI": "models:/kronos@challenger"},
        )
        settings = local_gateway_settings(
            champion,
            challenger,
            allow_cidrs=[f"{CLIENT}/32", f"{ADMIN}/32"],
            admin_cidrs=[f"{ADMIN}/32"],
            shadow_grpc=[f"127.0.0.1:{challenger.grpc_port}"],
        )
        forecaster = KronosForecaster.from_pretrained(tokenizer_dir, other, max_context=TINY_MAX_CONTEXT, device="cpu")
        with GatewayProcess(settings, prefix=root / "gateway") as gateway:
            yield ShadowStack(registry, champion, challenger, gateway, store_uri, forecaster)
    finally:
        if challenger is not None:
            os.killpg(challenger.process.pid, signal.SIGCONT)  # never leave a stopped group behind
            challenger.stop()
        if champion is not None:
            champion.stop()
        postgres.stop()


def realised(stack: ShadowStack, frame: pd.DataFrame) -> None:
    """Post the challenger's own greedy forecast as the realised candles (admin network):
    the challenger is then exact, the champion is not."""
    truth = stack.challenger_forecaster.predict(frame, **PARAMS)
    rows = [
        [sid, ts.isoformat(), float(close)] for sid, ts, close in truth[["series_id", "timestamp", "close"]].to_numpy()
    ]
    body = {"dataframe_split": {"columns": ["series_id", "timestamp", "close"], "data": rows}}
    with httpx.Client(timeout=TIMEOUT_S, transport=httpx.HTTPTransport(local_address=ADMIN)) as client:
        reply = client.post(f"{stack.gateway.http_url}/kronos/live/actuals", json=body)
    assert reply.status_code == 200, reply.text


def shared_forecasts(stack: ShadowStack) -> int:
    """Realised candles answered by both versions for the same requests (the challenger's
    copies are written after the champion's answer: wait for them)."""
    table = stack.paired()
    return int(table.loc[table["model_version"] == "2", "forecasts"].iloc[0])


def test_the_client_gets_the_champion_and_the_challenger_records_a_copy(shadow: ShadowStack) -> None:
    frame = history([f"sh-{uuid.uuid4().hex[:6]}", f"sh-{uuid.uuid4().hex[:6]}"], seed=12)
    with httpx.Client(timeout=TIMEOUT_S) as client:  # one keep-alive connection
        replies = [shadow.infer(client, frame, f"shadow-{i}-{uuid.uuid4().hex}") for i in range(3)]
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["parameters"]["model_version"] == "1"  # never the challenger's answer
    champion_answer = response_frame(replies[0].json())
    direct = shadow.challenger_forecaster.predict(frame, **PARAMS)
    assert not np.allclose(champion_answer["close"], direct["close"])  # the versions differ
    realised(shadow, frame)
    want = 3 * len(direct)
    wait_for(lambda: shared_forecasts(shadow) >= want, "the challenger's recorded copies", timeout_s=120)
    table = shadow.paired().set_index("model_version")
    assert table.loc["2", "mae"] == pytest.approx(0.0, abs=1e-6)  # recorded = the challenger's own forecast
    assert table.loc["1", "forecasts"] == table.loc["2", "forecasts"] >= want
    assert table.loc["1", "mae"] > 0


def test_a_stalled_challenger_never_holds_up_the_champions_clients(shadow: ShadowStack) -> None:
    """The challenger's process group is stopped (SIGSTOP): its copies cannot be answered,
    yet keep-alive clients of the champion get every answer; once it resumes, the copies
    that waited in the relay are answered and recorded."""
    before = shared_forecasts(shadow)
    frame = history([f"st-{uuid.uuid4().hex[:6]}"], seed=30)
    os.killpg(shadow.challenger.process.pid, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=60) as client:  # a mirror that blocked the connection would time out here
            replies = [shadow.infer(client, frame, f"stalled-{i}-{uuid.uuid4().hex}") for i in range(3)]
    finally:
        os.killpg(shadow.challenger.process.pid, signal.SIGCONT)
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    realised(shadow, frame)
    wait_for(lambda: shared_forecasts(shadow) >= before + 3 * PARAMS["pred_len"], "copies after the stall", 120)


def test_grpc_calls_are_copied_too_and_a_stalled_challenger_holds_up_none(shadow: ShadowStack) -> None:
    """ModelInfer through the gateway: the champion answers, the challenger records a copy;
    with the challenger stopped, calls on one channel (one HTTP/2 connection) still return."""
    before = shared_forecasts(shadow)
    frame = history([f"gr-{uuid.uuid4().hex[:6]}"], seed=44)
    stub_call = pb_grpc.GRPCInferenceServiceStub
    with grpc.insecure_channel(shadow.gateway.grpc_target) as channel:
        reply = stub_call(channel).ModelInfer(grpc_request(frame, PARAMS), timeout=TIMEOUT_S)
        assert reply.parameters["model_version"].string_param == "1"
        os.killpg(shadow.challenger.process.pid, signal.SIGSTOP)
        try:
            replies = [stub_call(channel).ModelInfer(grpc_request(frame, PARAMS), timeout=60) for _ in range(3)]
        finally:
            os.killpg(shadow.challenger.process.pid, signal.SIGCONT)
    assert [r.parameters["model_version"].string_param for r in replies] == ["1"] * 3
    realised(shadow, frame)
    want = before + 4 * PARAMS["pred_len"]  # every call's copy, the stalled ones included
    wait_for(lambda: shared_forecasts(shadow) >= want, "the challenger's gRPC copies", 120)


def promote_live(shadow: ShadowStack, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "registry_scripts", "promote", "2", "--evidence", "live", "--store", shadow.store_uri]
        + list(extra),
        env={**os.environ, "MLFLOW_TRACKING_URI": shadow.registry.tracking_uri},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_promote_on_live_evidence_needs_enough_shared_forecasts(shadow: ShadowStack) -> None:
    count = shared_forecasts(shadow)
    assert count >= 12, "the tests above left shared forecasts"
    refused = promote_live(shadow, "--min-forecasts", str(count + 1))
    assert refused.returncode == 3, refused.stderr
    assert f"{count} realised forecast candles answered by both" in refused.stderr
    assert str(shadow.registry.client().get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    done = promote_live(shadow, "--min-forecasts", str(count))
    assert done.returncode == 0, done.stderr
    assert "live MASE" in done.stdout
    client = shadow.registry.client()
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "2"
    events = [
        json.loads(value)
        for key, value in client.get_registered_model(MODEL_NAME).tags.items()
        if key.startswith("kronos.event.")
    ]
    last = max(events, key=lambda e: e["seq"])
    assert last["action"] == "promote" and last["version"] == "2"
    assert last["gate"]["evidence"] == "live" and last["gate"]["matched_forecasts"] == count
    assert last["gate"]["candidate_mase"] < last["gate"]["champion_mase"]
