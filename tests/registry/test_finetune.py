"""`kronos-registry finetune`: a registered (or directory) base fine-tuned on a small CSV in
one MLflow run, registered as the challenger with lineage tags; evaluated and promoted like
any version; interrupted with SIGTERM and resumed into the same run; the MLproject entry
point; one-line errors with their exit codes. Tiny random-weight checkpoints, tiny training.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from registry_helpers import CLI_TIMEOUT_S, ROOT, cli_env, one_line_error

from model_package.data import random_walk_candles
from model_package.finetune import WindowSpec
from model_package.windows import data_digest
from registry_scripts.cli import main
from registry_scripts.errors import CliError
from registry_scripts.finetune import (
    FinetuneRequest,
    check_same_options,
    default_work_dir,
    loss_curve,
    parse_models_uri,
)
from serving.local_server import tracking_uri

MODEL = "kronos"
# 160 daily candles, windows of 24 + 4: 101 training and 5 validation windows.
WINDOWS = ["--lookback", "24", "--horizon", "4"]
TINY_TRAINING = [*WINDOWS, "--epochs", "2", "--batch-size", "8", "--max-steps-per-epoch", "3", "--no-progress"]
TINY_EVAL = ["--windows", "2", "--context", "48", "--horizon", "4", "--samples", "3"]
STATE_WAIT_S = 300.0


def cli(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m registry_scripts ARGS`; one torch thread: a tiny model's steps are far
    slower with two threads fighting over a busy machine's cores."""
    return subprocess.run(
        [sys.executable, "-m", "registry_scripts", *args],
        env={**cli_env(uri), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def candles_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("finetune-data") / "candles.csv"
    random_walk_candles(160, 3, freq="D", series_id="A").to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pair_dir(tiny_checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pair directory (tokenizer/ + model/), as `python -m model_package.finetune` writes."""
    root = tmp_path_factory.mktemp("tiny-pair")
    shutil.copytree(tiny_checkpoints[0], root / "tokenizer")
    shutil.copytree(tiny_checkpoints[1], root / "model")
    return root


# -- the loop: registered base -> fine-tuned challenger -> evaluate -> promote -----------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("registry_uri", ["sqlite", "postgres"], indirect=True)
def test_finetune_registered_base_into_a_challenger_with_lineage(
    registry_uri: str, tiny_checkpoints: tuple[Path, Path], candles_csv: Path, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    tokenizer, model = tiny_checkpoints
    _ok(cli(registry_uri, "log", str(model), "--tokenizer", str(tokenizer), "--max-context", "64", "--promote"))
    assert _aliases(client) == {"champion": "1"}

    work = tmp_path / "work"
    tuned = cli(
        registry_uri,
        *("finetune", "--base", "models:/kronos@champion", "--data", str(candles_csv)),
        *TINY_TRAINING,
        *("--work-dir", str(work)),
    )
    _ok(tuned)
    line = tuned.stdout.strip().splitlines()[-1]
    assert line.startswith("fine-tuned kronos version 2 (alias challenger) run "), tuned.stdout
    run_id = line.rsplit(" ", 1)[-1]
    assert _aliases(client) == {"champion": "1", "challenger": "2"}
    assert not work.exists()  # emptied once the version is registered

    base, version = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
    assert version.run_id == run_id
    tags = version.tags
    digest = data_digest(pd.read_csv(candles_csv))
    assert {k: v for k, v in tags.items() if k.startswith("kronos.lineage.")} == {
        "kronos.lineage.base": "models:/kronos@champion",
        "kronos.lineage.base_model": MODEL,
        "kronos.lineage.base_version": "1",
        "kronos.lineage.base_run_id": base.run_id,
        "kronos.lineage.data": "file:candles.csv",
        "kronos.lineage.data_digest": digest,
        "kronos.lineage.finetune_run_id": run_id,
        "kronos.lineage.stage": "both",
    }
    assert tags["kronos.weights.source"] == f"finetune:{run_id}" and tags["kronos.demo"] == "false"
    assert tags["kronos.max_context"] == "64"  # carried over from the base
    assert tags["kronos.config_digest"] == base.tags["kronos.config_digest"]
    assert tags["kronos.weights.sha256"] != base.tags["kronos.weights.sha256"]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "kronos-finetune"
    assert run.data.tags["kronos.data_digest"] == digest
    params = run.data.params
    assert params["base"] == "models:/kronos@champion" and params["base_version"] == "1"
    assert params["data"] == "file:candles.csv" and params["data_digest"] == digest
    assert (params["stage"], params["lookback"], params["horizon"], params["epochs"]) == ("both", "24", "4", "2")
    assert (params["batch_size"], params["seed"], params["device"], params["world_size"]) == ("8", "0", "cpu", "1")
    assert (params["train_windows"], params["val_windows"]) == ("101", "5")
    for stage in ("tokenizer", "predictor"):
        assert _steps(client, run_id, f"{stage}_train_loss") == [1, 2, 3, 4, 5, 6]  # per optimizer step
        assert _steps(client, run_id, f"{stage}_val_loss") == [0, 1]  # per epoch
        assert _steps(client, run_id, f"{stage}_epoch_train_loss") == [0, 1]
        assert math.isfinite(run.data.metrics[f"{stage}_best_loss"])
    assert {"tokenizer_recon_all", "tokenizer_bsq_loss", "predictor_ce_s1", "predictor_ce_s2"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run_id)] == ["loss_curve.png"]
    png = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="loss_curve.png", dst_path=str(tmp_path), tracking_uri=registry_uri
        )
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with tracking_uri(registry_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/2")
    forecast = pyfunc.predict(random_walk_candles(40, 1, freq="D"), params={"pred_len": 3, "seed": 0})
    assert len(forecast) == 3
    assert forecast[["open", "high", "low", "close"]].map(math.isfinite).all().all()

    if registry_uri.startswith("http"):
        return  # the server run stops at the registered challenger; the loop goes on on sqlite
    evaluated = cli(registry_uri, "evaluate", "--data", str(candles_csv), *TINY_EVAL)
    _ok(evaluated)
    assert all(label in evaluated.stdout for label in ("persistence", "v1", "v2"))
    promoted = cli(registry_uri, "promote")
    assert promoted.returncode in (0, 3), promoted.stderr
    assert _aliases(client)["champion"] == ("2" if promoted.returncode == 0 else "1")
    if promoted.returncode == 3:  # random tiny weights rarely beat persistence
        _ok(cli(registry_uri, "promote", "--force", "--reason", "tests: tiny weights"))
    assert _aliases(client) == {"champion": "2"}


# -- interruption and resume ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_kills_the_run_and_resume_finishes_it(
    new_sqlite_uri: Callable[[str], str], tiny_checkpoints: tuple[Path, Path], candles_csv: Path, tmp_path: Path
) -> None:
    uri = new_sqlite_uri("finetune-resume")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tokenizer, model = tiny_checkpoints
    work = tmp_path / "work"
    # 25 steps an epoch, 3 epochs: the first state.pt appears after epoch 1, two epochs early.
    args = [
        *("finetune", "--base", str(model), "--tokenizer", str(tokenizer), "--data", str(candles_csv)),
        *(*WINDOWS, "--stage", "predictor", "--epochs", "3", "--batch-size", "4", "--work-dir", str(work)),
    ]
    child = subprocess.Popen(
        [sys.executable, "-m", "registry_scripts", *args],
        env={**cli_env(uri), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + STATE_WAIT_S
        while not (work / "predictor" / "state.pt").is_file() and child.poll() is None:
            assert time.monotonic() < deadline, "no state.pt after the first epoch"
            time.sleep(0.05)
        assert child.poll() is None, "finished before it could be interrupted"
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, f"{stdout}\n{stderr}"
    last = stderr.strip().splitlines()[-1]
    assert "interrupted" in last and f"--resume --work-dir {work}" in last and "Traceback" not in stderr
    run_id = json.loads((work / "run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.search_model_versions(f"name='{MODEL}'") == []  # nothing registered
    interrupted_at = max(_steps(client, run_id, "predictor_train_loss"))
    assert 25 <= interrupted_at < 75

    resumed = cli(uri, *args, "--resume", "--no-progress")
    _ok(resumed)
    assert resumed.stdout.strip().endswith(f"fine-tuned kronos version 1 (alias challenger) run {run_id}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, run_id, "predictor_train_loss") == list(range(1, 76))  # no gap, no repeat
    assert _steps(client, run_id, "predictor_val_loss") == [0, 1, 2]
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert version.run_id == run_id and version.tags["kronos.lineage.finetune_run_id"] == run_id
    assert version.tags["kronos.lineage.base"] == str(model) and "kronos.lineage.base_version" not in version.tags
    assert version.tags["kronos.lineage.stage"] == "predictor"
    assert version.tags["kronos.tokenizer.source"] == f"base:{tokenizer}"  # the predictor stage keeps it


# -- MLproject ---------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_mlproject_finetune_entry_point(
    new_sqlite_uri: Callable[[str], str], pair_dir: Path, candles_csv: Path, tmp_path: Path
) -> None:
    uri = new_sqlite_uri("finetune-mlproject")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("kronos-project", artifact_location=(tmp_path / "project").as_uri())
    env = {**cli_env(uri), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` of this venv
    params = {
        "base": str(pair_dir),
        "data": str(candles_csv),
        "stage": "predictor",
        "lookback": "24",
        "horizon": "4",
        "epochs": "1",
        "batch_size": "16",
        "work_dir": str(tmp_path / "work"),
    }
    result = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "finetune", "--env-manager", "local"]
        + ["--experiment-name", "kronos-project"]
        + [arg for key, value in params.items() for arg in ("-P", f"{key}={value}")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert version.tags["kronos.lineage.base"] == str(pair_dir)
    run = client.get_run(str(version.run_id))
    assert run.data.params["lr"] == "default" and run.data.params["epochs"] == "1"
    project_run = client.get_run(run.data.tags["kronos.mlproject_run_id"])
    assert project_run.data.tags["kronos.run.finetune"] == run.info.run_id
    assert not (tmp_path / "work").exists()


# -- log --demo: the shipped trained pair --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_log_demo_registers_the_trained_demo_pair(new_sqlite_uri: Callable[[str], str]) -> None:
    from model_package.demo import DEMO_MAX_CONTEXT, demo_checkpoints
    from model_package.log_model import weight_source

    uri = new_sqlite_uri("finetune-demo")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    logged = cli(uri, "log", "--demo", "--promote")
    _ok(logged)
    assert "RANDOM" not in logged.stderr and "trained on daily S&P 500 / NASDAQ" in logged.stderr
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["kronos.demo"] == "true" and tags["kronos.weights.source"] == "demo:kronos-demo"
    assert tags["kronos.max_context"] == str(DEMO_MAX_CONTEXT) and "kronos.warning" not in tags
    model_dir = demo_checkpoints()[1]
    assert tags["kronos.weights.sha256"] == weight_source(model_dir, None, model_dir)["weights_sha256"]
    assert _aliases(client) == {"champion": "1"}


# -- errors: one line, a distinct exit code (in-process: no weights are loaded) ---------------------------


@pytest.fixture(scope="module")
def bare_registry(new_sqlite_uri: Callable[[str], str]) -> str:
    uri = new_sqlite_uri("finetune-errors")
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model(MODEL)
    return uri


def _run_main(uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str):
    """The CLI in this process; MLflow's global URIs (which `connect` sets) restored after."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking_uri(uri):
        code = main(["finetune", "--no-progress", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_finetune_errors_are_one_line_with_their_exit_codes(
    bare_registry: str,
    tiny_checkpoints: tuple[Path, Path],
    candles_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frame = pd.read_csv(candles_csv)
    short, no_close = tmp_path / "short.csv", tmp_path / "no_close.csv"
    frame.head(30).to_csv(short, index=False)
    frame.drop(columns=["close"]).to_csv(no_close, index=False)
    base = ("--base", "models:/kronos@champion", "--work-dir", str(tmp_path / "work"))

    def failure(code: int, *args: str) -> str:
        return one_line_error(_run_main(bare_registry, monkeypatch, capsys, *base, *args), code)

    assert "missing.csv" in failure(6, "--data", str(tmp_path / "missing.csv"))
    line = failure(6, "--data", str(short), *WINDOWS)
    assert "needs at least 28 candles for one window of lookback+horizon (24+4)" in line
    assert "close: required column missing" in failure(6, "--data", str(no_close), *WINDOWS)
    assert "fewer training windows than --batch-size 500" in failure(
        6, "--data", str(candles_csv), *WINDOWS, "--batch-size", "500"
    )
    unknown = one_line_error(
        _run_main(
            bare_registry, monkeypatch, capsys, "--base", "models:/kronos@nosuch", "--data", str(candles_csv), *WINDOWS
        ),
        5,
    )
    assert "unknown alias 'nosuch'" in unknown
    assert "nothing to resume" in failure(5, "--data", str(candles_csv), *WINDOWS, "--resume")
    assert not (tmp_path / "work").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    tokenizer, model = tiny_checkpoints
    line = one_line_error(
        _run_main(
            bare_registry,
            monkeypatch,
            capsys,
            *("--base", str(model), "--tokenizer", str(tokenizer), "--data", str(candles_csv), *WINDOWS),
            *("--work-dir", str(foreign)),
        ),
        2,
    )
    assert "not empty and holds no fine-tune state" in line
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit) as usage:
        main(["finetune", *base, "--data", str(candles_csv), "--stage", "everything"])
    assert usage.value.code == 2
    assert "invalid choice: 'everything'" in capsys.readouterr().err


# -- pure parts ----------------------------------------------------------------------------------------------


def _request(base: str, data: str, stage: str) -> FinetuneRequest:
    return FinetuneRequest(base, data, None, stage, WindowSpec(), {})


def test_models_uris_work_dirs_and_resume_checks() -> None:
    assert parse_models_uri("models:/kronos@champion") == ("kronos", "champion")
    assert parse_models_uri("models:/my/model/3") == ("my/model", "3")
    for bad in ("models:/kronos", "models:/kronos/latest", "models:/@x"):
        with pytest.raises(CliError) as refused:
            parse_models_uri(bad)
        assert refused.value.code == 2
    one = default_work_dir("sqlite:///a.db", MODEL, _request("models:/kronos@champion", "arch:NASDAQ", "both"))
    assert one == default_work_dir("sqlite:///a.db", MODEL, _request("models:/kronos@champion", "arch:NASDAQ", "both"))
    assert one.name.startswith("both-") and one.parent == ROOT / ".state" / "finetune"
    assert one != default_work_dir("sqlite:///a.db", MODEL, _request("models:/kronos@champion", "arch:SP500", "both"))
    check_same_options({"epochs": "2"}, {"epochs": "2"})
    with pytest.raises(CliError, match="epochs was '2', now '3'") as changed:
        check_same_options({"epochs": "2", "seed": "0"}, {"epochs": "3", "seed": "0"})
    assert changed.value.code == 2


def test_loss_curve_has_one_panel_per_stage() -> None:
    curves = {
        stage: {
            "train_loss": [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.8)],
            "epoch_train_loss": [(0, 2.75), (1, 1.9)],
            "val_loss": [(0, 2.9), (1, 2.1)],
        }
        for stage in ("tokenizer", "predictor")
    }
    figure = loss_curve(curves, "test")
    assert [ax.get_title() for ax in figure.axes] == ["tokenizer stage", "predictor stage"]
    assert [np.asarray(line.get_xdata()).tolist() for line in figure.axes[0].lines] == [[1, 2, 3, 4], [2, 4], [2, 4]]
