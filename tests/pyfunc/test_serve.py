"""A real `mlflow models serve -m models:/kronos@champion` process, started with the
command the README documents (read from README.md), from a shell whose PATH does not hold
the venv: forecasts over /invocations, and HTTP 400 naming the problem for bad requests."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from pyfunc_helpers import MODEL_NAME, TINY_MAX_CONTEXT, clean_env
from support import HttpProcess, start_models_serve

from model_package import KronosForecaster
from model_package.data import load_index
from serving.local_server import free_port

pytestmark = pytest.mark.integration  # starts a real `mlflow models serve`

README = Path(__file__).resolve().parents[2] / "README.md"
README_PORT = "-p 5001"
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60


def readme_serve_command() -> str:
    """The `mlflow models serve` command of the README's "Local serving" block, with its
    backslash continuations joined: exactly what a user pastes into a shell."""
    text = README.read_text()
    start = text.index("Local serving:")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.DOTALL)
    assert block, "README: no bash block after 'Local serving:'"
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    commands = [line for line in joined.splitlines() if "mlflow models serve" in line]
    assert len(commands) == 1, f"README: expected one `mlflow models serve` line: {commands}"
    return commands[0].strip()


def _path_without_venv(path: str) -> str:
    """PATH with this venv's bin directory removed, as in a shell that never activated it."""
    venv_bins = {Path(sys.executable).parent.resolve(), (Path(sys.prefix) / "bin").resolve()}
    kept = [entry for entry in path.split(os.pathsep) if entry and Path(entry).resolve() not in venv_bins]
    return os.pathsep.join(kept)


def test_readme_command_is_the_local_serving_form() -> None:
    command = readme_serve_command()
    # mlflow starts the scoring server as `bash -c "exec uvicorn ..."`: uvicorn is found
    # on PATH only, so the documented command puts the venv's bin first itself
    assert command.startswith('PATH="$PWD/.venv/bin:$PATH" '), command
    assert "--env-manager local" in command and f"models:/{MODEL_NAME}@champion" in command
    assert README_PORT in command


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory) -> Iterator[HttpProcess]:
    """The README's command, run by bash in a directory laid out like the checkout after
    `make serve`: `.venv` (this interpreter's venv) and `.state/mlflow` (the test registry),
    with a PATH that does not hold the venv. Only the port is changed (a free one)."""
    workdir = tmp_path_factory.mktemp("serve")
    (workdir / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (workdir / ".state").mkdir()
    (workdir / ".state" / "mlflow").symlink_to(registry.root, target_is_directory=True)
    assert (workdir / ".state" / "mlflow" / "mlflow.db").exists()
    port = free_port()
    command = readme_serve_command().replace(README_PORT, f"-p {port}")
    env = clean_env()
    env["PATH"] = _path_without_venv(env["PATH"])
    env.pop("VIRTUAL_ENV", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the command sets its own
    found = shutil.which("uvicorn", path=env["PATH"])
    assert found is None or not Path(found).resolve().is_relative_to(Path(sys.prefix).resolve())
    with start_models_serve(command, port, workdir / "server.log", workdir, env, timeout_s=START_TIMEOUT_S) as server:
        yield server


def _invoke(server: HttpProcess, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _split(frame: pd.DataFrame) -> dict:
    """A frame as the `dataframe_split` JSON a client sends (timestamps as ISO strings)."""
    frame = frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    return json.loads(frame.to_json(orient="split", index=False))


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return load_index("SP500", last=40)


def test_forecast_over_invocations(server, history, tiny_checkpoints):
    params = {"pred_len": 3, "top_k": 1, "quantiles": [0.5]}
    status, body = _invoke(server, {"dataframe_split": _split(history), "params": params})
    assert status == 200, body
    forecast = pd.DataFrame(body["predictions"])
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=TINY_MAX_CONTEXT, device="cpu")
    expected = forecaster.predict(history, 3, top_k=1, quantiles=[0.5])
    assert list(forecast.columns) == list(expected.columns)
    assert pd.to_datetime(forecast["timestamp"]).tolist() == [
        pd.Timestamp("2019-01-01"),
        pd.Timestamp("2019-01-02"),
        pd.Timestamp("2019-01-03"),
    ]
    pd.testing.assert_frame_equal(forecast.drop(columns="timestamp"), expected.drop(columns="timestamp"), rtol=1e-6)


def test_integer_prices_in_json_are_accepted(server, history):
    as_ints = history.assign(
        **{c: history[c].round().astype("int64") for c in ("open", "high", "low", "close", "volume")}
    )
    body = _split(as_ints)
    assert isinstance(body["data"][0][2], int)  # `open` travels as 2531 rather than 2531.0
    status, answer = _invoke(server, {"dataframe_split": body, "params": {"pred_len": 2}})
    assert status == 200, answer
    assert len(answer["predictions"]) == 2


def test_defaults_apply_without_params(server, history):
    status, body = _invoke(server, {"dataframe_split": _split(history)})
    assert status == 200, body
    assert len(body["predictions"]) == 10


@pytest.mark.parametrize(
    ("change", "params", "needle"),
    [
        (None, {"pred_len": 0}, "pred_len: must be >= 1"),
        (None, {"top_p": 1.5}, "top_p: must be in (0, 1]"),
        (None, {"pred_len": "many"}, "pred_len"),
        (None, {"sample_count": 10_000}, "sample_count: must be <= 64 (max_sample_count)"),
        ("drop_close", {}, "missing inputs ['close']"),  # MLflow's schema check
        ("nan_low", {}, "low: must not contain NaN"),
        ("unsorted", {}, "timestamp: must be strictly increasing"),
    ],
)
def test_bad_requests_get_400_naming_the_problem(server, history, change, params, needle):
    frame = history
    if change == "drop_close":
        frame = history.drop(columns="close")
    elif change == "nan_low":
        frame = history.assign(low=history["low"].where(history.index != 5))
    elif change == "unsorted":
        frame = history.iloc[[1, 0, *range(2, len(history))]]
    status, body = _invoke(server, {"dataframe_split": _split(frame), "params": params})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert needle in body["message"], body["message"]
