"""DistributedDataParallel fine-tuning on the CPU (gloo): `torchrun --nproc_per_node 2 -m
model_package.finetune` trains the same weights as one process on the same global batches
(teacher forcing, no dropout: nothing random), and a two-process tokenizer stage completes.

Each command is a real `torchrun` (next to this interpreter) with a bounded wait; the
rendezvous is `--standalone` (a free local port picked by torchrun).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_package.data import random_walk_candles
from model_package.finetune import from_scratch
from model_package.kronos.presets import TINY_MODEL_CONFIG, TINY_TOKENIZER_CONFIG

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600  # seconds, per command


def torchrun() -> list[str]:
    """This interpreter's torchrun (its `-m` module where the script is not installed)."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(configs JSON, candles CSV): the tiny zero-dropout shapes, 300 random-walk candles."""
    root = tmp_path_factory.mktemp("ddp-inputs")
    configs = root / "configs.json"
    configs.write_text(
        json.dumps({"tokenizer_config": TINY_TOKENIZER_CONFIG.to_dict(), "model_config": TINY_MODEL_CONFIG.to_dict()})
    )
    data = root / "candles.csv"
    random_walk_candles(300, seed=0).to_csv(data, index=False)
    return configs, data


def finetune_args(configs: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "model_package.finetune",
        "--from-scratch",
        str(configs),
        "--data",
        str(data),
        "--out",
        str(out),
        "--lookback",
        "24",
        "--horizon",
        "8",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "4",
        "--patience",
        "0",
        *extra,
    ]


def run_all(commands: dict[str, list[str]], logs: Path) -> dict[str, int]:
    """Start the commands side by side (one OpenMP thread each), wait for all (bounded);
    returns each one's exit code, kills whatever is left on the way out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    codes: dict[str, int] = {}
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("wb") as sink:
                processes[name] = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
        for name, process in processes.items():
            try:
                codes[name] = process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish within {TIMEOUT} s:\n{log_tail(logs, name)}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: the session it leads
                process.wait(timeout=30)
    return codes


def log_tail(logs: Path, name: str) -> str:
    return (logs / f"{name}.log").read_text(errors="replace")[-4000:]


def test_two_processes_train_the_same_predictor_as_one(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    configs, data = inputs
    extra = ("--stage", "predictor", "--teacher-forcing", "--lr", "1e-4")
    codes = run_all(
        {
            "single": [sys.executable, *finetune_args(configs, data, tmp_path / "single", *extra)],
            "ddp": [
                *torchrun(),
                "--standalone",
                "--nproc_per_node",
                "2",
                *finetune_args(configs, data, tmp_path / "ddp", *extra),
            ],
        },
        tmp_path,
    )
    for name, code in codes.items():
        assert code == 0, log_tail(tmp_path, name)

    single = load_file(tmp_path / "single" / "model" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    assert single.keys() == ddp.keys()
    initial = from_scratch(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 0)[1].state_dict()
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-4  # eight steps did change the weights: the comparison below means something
    diff = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    assert diff <= 1e-5, f"max abs weight difference {diff}"

    want = json.loads((tmp_path / "single" / "result.json").read_text())["stages"]["predictor"]
    got = json.loads((tmp_path / "ddp" / "result.json").read_text())["stages"]["predictor"]
    assert got["steps"] == want["steps"] == 8
    assert got["epochs_run"] == want["epochs_run"] == 2
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)


def test_two_process_tokenizer_stage_completes(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """The codebook-entropy term is a per-process batch statistic, so no equality with one
    process here: the run finishes, its losses and weights are finite."""
    configs, data = inputs
    out = tmp_path / "out"
    command = [
        *torchrun(),
        "--standalone",
        "--nproc_per_node",
        "2",
        *finetune_args(configs, data, out, "--stage", "tokenizer", "--lr", "1e-3"),
    ]
    codes = run_all({"ddp": command}, tmp_path)
    assert codes["ddp"] == 0, log_tail(tmp_path, "ddp")
    result = json.loads((out / "result.json").read_text())["stages"]["tokenizer"]
    assert result["steps"] == 8 and result["epochs_run"] == 2
    assert len(result["val_loss"]) == 2 and len(result["train_loss"]) == 8
    assert all(math.isfinite(v) for v in result["train_loss"] + result["val_loss"])
    tokenizer = load_file(out / "tokenizer" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tokenizer.values() if t.is_floating_point())
    assert (out / ".work" / "tokenizer" / "state.pt").is_file()
