"""The fine-tuning loop (`model_package.trainer`) on tiny random-weight networks, on the CPU:
determinism for a seed, learning, early stopping with the best weights kept, resuming after
SIGINT / SIGTERM equal to an uninterrupted run (in process and through the CLI), gradient
accumulation, the learning-rate schedules and the refusals.

Every run is a few dozen optimizer steps on windows cut from a few hundred random-walk
candles; the tests wait for events (a file, an exit), never for a duration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from model_package.data import random_walk_candles
from model_package.finetune import FINISHED_TOKENIZER, WindowSpec, finetune, from_scratch, main, stages_of
from model_package.kronos import Kronos, KronosTokenizer
from model_package.kronos.presets import TINY_MODEL_CONFIG, TINY_TOKENIZER_CONFIG
from model_package.trainer import (
    STATE_FILE,
    Dist,
    StageData,
    TrainingInterruptedError,
    TrainResult,
    TrainSettings,
    make_scheduler,
    train_stage,
    validation_loss,
)
from model_package.windows import WindowSplit, make_windows

REPO = Path(__file__).resolve().parents[2]
LOOKBACK, HORIZON = 24, 8  # windows of 32 candles
CANDLES = 300  # -> 209 training and 29 validation windows
# Dropout everywhere it exists: the predictor stage with sampled s2 conditioning then draws
# from the global RNG at every step (what resuming has to restore).
DROPOUT_TOKENIZER = dataclasses.replace(TINY_TOKENIZER_CONFIG, ffn_dropout_p=0.1, resid_dropout_p=0.1)
DROPOUT_MODEL = dataclasses.replace(TINY_MODEL_CONFIG, ffn_dropout_p=0.1, resid_dropout_p=0.1, token_dropout_p=0.1)
CPU = Dist(0, 1, torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny networks gain nothing from more, and OpenMP threads
    spinning for a share of a busy machine's cores cost ten times the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def split() -> WindowSplit:
    return make_windows(random_walk_candles(CANDLES, seed=0), LOOKBACK, HORIZON, val_fraction=0.2)


def train(
    split: WindowSplit,
    stage: str,
    *,
    dropout: bool = False,
    net_seed: int = 0,
    **kwargs: Any,
) -> tuple[KronosTokenizer | Kronos, KronosTokenizer, TrainResult]:
    """Build a fresh tiny pair (seeded), train `stage` on it; kwargs: TrainSettings fields plus
    train_stage's work_dir, resume, on_step. Returns (trained net, tokenizer, result)."""
    run_args = {k: kwargs.pop(k) for k in ("work_dir", "resume", "on_step") if k in kwargs}
    settings = TrainSettings(stage=stage, **kwargs)
    tokenizer, model = from_scratch(
        DROPOUT_TOKENIZER if dropout else TINY_TOKENIZER_CONFIG,
        DROPOUT_MODEL if dropout else TINY_MODEL_CONFIG,
        net_seed,
    )
    net: KronosTokenizer | Kronos = tokenizer if stage == "tokenizer" else model
    result = train_stage(net, split, settings, tokenizer=tokenizer if stage == "predictor" else None, **run_args)
    return net, tokenizer, result


def weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same_history(a: TrainResult, b: TrainResult) -> None:
    """Bit-identical histories (Python float equality)."""
    assert a.train_loss == b.train_loss
    assert a.val_loss == b.val_loss
    assert a.epoch_train_loss == b.epoch_train_loss
    assert (a.best_loss, a.best_epoch, a.epochs_run, a.steps) == (b.best_loss, b.best_epoch, b.epochs_run, b.steps)


# -- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["tokenizer", "predictor"])
def test_same_seed_gives_identical_weights_and_losses(split: WindowSplit, stage: str) -> None:
    """Dropout > 0 and (predictor) s2 heads conditioned on sampled s1 ids: every random draw
    comes from RNGs that train_stage seeds itself, whatever the global RNG held before."""
    run: dict[str, Any] = dict(
        epochs=2, batch_size=8, max_steps_per_epoch=5, lr=1e-3, patience=None, teacher_forcing=False
    )
    torch.manual_seed(1234)
    net_a, _, a = train(split, stage, dropout=True, seed=7, **run)
    torch.manual_seed(98765)  # a different global RNG state going in: no influence
    net_b, _, b = train(split, stage, dropout=True, seed=7, **run)
    assert_same_history(a, b)
    assert_same_weights(net_a, net_b)
    assert all(math.isfinite(v) for v in a.train_loss + a.val_loss)

    net_c, _, c = train(split, stage, dropout=True, seed=8, **run)
    assert c.train_loss != a.train_loss
    assert max_abs_diff(weights(net_a), weights(net_c)) > 0


# -- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["tokenizer", "predictor"])
def test_training_lowers_the_loss(split: WindowSplit, stage: str) -> None:
    """Epoch averages, not single steps: the last epoch's mean training loss is clearly below the
    first's, and the validation loss went down too."""
    _, _, result = train(split, stage, epochs=3, batch_size=16, max_steps_per_epoch=8, lr=3e-3, patience=None)
    assert result.epochs_run == 3 and result.steps == 24 and len(result.train_loss) == 24
    first, last = result.epoch_train_loss[0], result.epoch_train_loss[-1]
    assert last < 0.9 * first, result.epoch_train_loss
    assert first == pytest.approx(sum(result.train_loss[:8]) / 8, rel=1e-12)
    assert result.val_loss[-1] < result.val_loss[0], result.val_loss


# -- early stopping and the best weights ---------------------------------------------------------


@pytest.mark.parametrize("stage", ["tokenizer", "predictor"])
def test_early_stopping_keeps_the_best_epoch(split: WindowSplit, stage: str) -> None:
    """A learning rate far too large makes the validation loss worse after a few epochs; with
    patience 1 the run stops there and the network holds the best epoch's weights: its
    validation loss, recomputed, is the reported best."""
    epochs, batch_size = 12, 8
    lr = 3e-2 if stage == "tokenizer" else 1e-1
    net, tokenizer, result = train(
        split,
        stage,
        epochs=epochs,
        batch_size=batch_size,
        max_steps_per_epoch=6,
        lr=lr,
        patience=1,
        schedule="cosine",
        warmup=0.0,
        teacher_forcing=True,
    )
    assert result.stopped_early
    assert result.epochs_run < epochs
    assert len(result.val_loss) == len(result.epoch_train_loss) == result.epochs_run
    assert result.best_epoch == min(range(result.epochs_run), key=result.val_loss.__getitem__)
    assert result.best_loss == result.val_loss[result.best_epoch]
    # patience 1: the last epoch was the first one without improvement
    assert result.best_epoch == result.epochs_run - 2
    assert result.val_loss[-1] >= result.best_loss

    assert not net.training  # handed back in eval mode
    val_data = StageData(stage, split.val, tokenizer if stage == "predictor" else None, CPU.device)
    recomputed = validation_loss(net, val_data, batch_size * 4, CPU)  # the loop's validation batch
    assert recomputed is not None
    assert recomputed == pytest.approx(result.best_loss, rel=1e-6)
    assert recomputed != pytest.approx(result.val_loss[-1], rel=1e-6)  # not the last epoch's weights


def test_no_patience_runs_every_epoch(split: WindowSplit) -> None:
    _, _, result = train(
        split, "predictor", epochs=4, batch_size=8, max_steps_per_epoch=3, lr=1e-1, patience=None, teacher_forcing=True
    )
    assert not result.stopped_early
    assert result.epochs_run == 4 and result.steps == 12 and len(result.val_loss) == 4
    assert result.best_epoch == min(range(4), key=result.val_loss.__getitem__)


# -- resuming after an interruption --------------------------------------------------------------

RESUME_RUN: dict[str, Any] = dict(
    epochs=3, batch_size=8, max_steps_per_epoch=8, lr=1e-3, patience=None, teacher_forcing=False, seed=3
)
_UNINTERRUPTED: dict[str, tuple[torch.nn.Module, TrainResult]] = {}


def uninterrupted(split: WindowSplit, stage: str, work_dir: Path) -> tuple[torch.nn.Module, TrainResult]:
    """Run A of a stage (computed once per module)."""
    if stage not in _UNINTERRUPTED:
        net, _, result = train(split, stage, dropout=True, work_dir=work_dir, **RESUME_RUN)
        _UNINTERRUPTED[stage] = (net, result)
    return _UNINTERRUPTED[stage]


@pytest.mark.parametrize(
    ("stage", "kill_at"),
    [
        ("predictor", 13),  # step 5 of the second epoch (8 steps each)
        ("predictor", 7),  # stops after the last step of the first epoch: resumes at its validation
        ("tokenizer", 5),  # step 5 of the first epoch: no best weights yet
    ],
)
def test_resume_after_sigint_equals_an_uninterrupted_run(
    split: WindowSplit, tmp_path: Path, stage: str, kill_at: int
) -> None:
    net_a, a = uninterrupted(split, stage, tmp_path / "a")
    total = RESUME_RUN["epochs"] * RESUME_RUN["max_steps_per_epoch"]
    work_b = tmp_path / "b"
    seen: list[int] = []

    def interrupt(step: int, terms: dict[str, float]) -> None:
        seen.append(step)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterruptedError):
        train(split, stage, dropout=True, work_dir=work_b, on_step=interrupt, **RESUME_RUN)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    assert (work_b / STATE_FILE).is_file()
    assert not (work_b / "state.partial").exists()
    saved = torch.load(work_b / STATE_FILE, map_location="cpu", weights_only=False)
    stopped_at = saved["progress"]["global_step"]
    assert kill_at <= stopped_at < total  # the step in progress finished, then it stopped
    assert seen == list(range(1, stopped_at + 1))

    # a fresh network built the same way, resumed from the saved state
    net_b, _, b = train(split, stage, dropout=True, work_dir=work_b, resume=True, **RESUME_RUN)
    assert b.steps == total
    assert_same_history(a, b)
    assert_same_weights(net_a, net_b)

    # resuming a finished stage (killed before its result was written) trains nothing more
    net_c, _, c = train(split, stage, dropout=True, work_dir=work_b, resume=True, **RESUME_RUN)
    assert_same_history(a, c)
    assert_same_weights(net_a, net_c)


# -- both stages through finetune() ---------------------------------------------------------------


def test_finetune_both_stages_then_resume_a_finished_run(tmp_path: Path) -> None:
    """Tokenizer, then predictor on the fine-tuned tokenizer's tokens; the callbacks name the
    stage; the finished tokenizer is kept in the work dir, and a resume of the finished run
    loads it and trains nothing more."""
    history = random_walk_candles(CANDLES, seed=0)
    spec = WindowSpec(lookback=LOOKBACK, horizon=HORIZON)
    settings: dict[str, Any] = dict(epochs=2, batch_size=8, max_steps_per_epoch=3, lr=1e-3, patience=None)
    steps: list[tuple[str, int]] = []
    epochs: list[tuple[str, int]] = []
    tokenizer, model = from_scratch(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 0)
    first = finetune(
        tokenizer,
        model,
        history,
        "both",
        spec,
        settings,
        work_dir=tmp_path,
        on_step=lambda stage, step, terms: steps.append((stage, step)),
        on_epoch=lambda stage, epoch, train, val: epochs.append((stage, epoch)),
    )
    assert list(first.stages) == ["tokenizer", "predictor"]
    assert steps == [(stage, step) for stage in ("tokenizer", "predictor") for step in range(1, 7)]
    assert epochs == [(stage, epoch) for stage in ("tokenizer", "predictor") for epoch in range(2)]
    assert first.tokenizer is tokenizer and first.model is model
    assert (tmp_path / FINISHED_TOKENIZER / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer" / STATE_FILE).is_file() and (tmp_path / "predictor" / STATE_FILE).is_file()

    fresh_tokenizer, fresh_model = from_scratch(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 0)
    again = finetune(fresh_tokenizer, fresh_model, history, "both", spec, settings, work_dir=tmp_path, resume=True)
    assert list(again.stages) == ["predictor"]  # the tokenizer came from tokenizer-best
    assert_same_weights(first.tokenizer, again.tokenizer)
    assert_same_weights(first.model, again.model)
    assert_same_history(first.stages["predictor"], again.stages["predictor"])


# -- the command line: SIGTERM, then --resume ----------------------------------------------------


def _write_inputs(root: Path) -> tuple[Path, Path]:
    configs = root / "configs.json"
    configs.write_text(
        json.dumps({"tokenizer_config": DROPOUT_TOKENIZER.to_dict(), "model_config": DROPOUT_MODEL.to_dict()})
    )
    data = root / "candles.csv"
    random_walk_candles(CANDLES, seed=0).to_csv(data, index=False)
    return configs, data


def _cli(configs: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "model_package.finetune",
        "--from-scratch",
        str(configs),
        "--data",
        str(data),
        "--out",
        str(out),
        "--stage",
        "predictor",  # sampled s2 conditioning (no --teacher-forcing), dropout > 0
        "--lookback",
        str(LOOKBACK),
        "--horizon",
        str(HORIZON),
        "--epochs",
        "10",  # far more epochs after the first than the signal needs to arrive
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "6",
        "--lr",
        "1e-3",
        "--patience",
        "0",  # never stop early
        "--seed",
        "5",
        *extra,
    ]


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as sink:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"{process.args!r} did not finish within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
def test_cli_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    configs, data = _write_inputs(tmp_path)
    out_ref, out = tmp_path / "reference", tmp_path / "interrupted"
    state = out / ".work" / "predictor" / STATE_FILE
    processes: list[subprocess.Popen[bytes]] = []
    try:
        reference = _start(_cli(configs, data, out_ref), tmp_path / "reference.log")
        processes.append(reference)
        child = _start(_cli(configs, data, out), tmp_path / "interrupted.log")
        processes.append(child)
        deadline = time.monotonic() + 300
        while not state.is_file():  # saved after the first epoch (atomically: complete once there)
            assert child.poll() is None, f"exited early:\n{(tmp_path / 'interrupted.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no state.pt within 300 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        log = (tmp_path / "interrupted.log").read_text
        assert _finish(child, tmp_path / "interrupted.log") == 130, log()
        assert "rerun with --resume" in log()
        assert state.is_file()
        assert not (out / "model" / "model.safetensors").exists()  # nothing half-trained written
        assert not (out / "result.json").exists()
        saved = torch.load(state, map_location="cpu", weights_only=False)
        assert 1 <= saved["progress"]["epoch"] < 10  # it stopped mid-run

        resumed = _start(_cli(configs, data, out, "--resume"), tmp_path / "resumed.log")
        processes.append(resumed)
        assert _finish(resumed, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
        assert _finish(reference, tmp_path / "reference.log") == 0, (tmp_path / "reference.log").read_text()
    finally:
        _stop(processes)

    for part in ("model", "tokenizer"):
        want = load_file(out_ref / part / "model.safetensors")
        got = load_file(out / part / "model.safetensors")
        assert want.keys() == got.keys()
        differing = [k for k in want if not torch.equal(want[k], got[k])]
        assert not differing, f"{part}: {differing[:3]}"
    want_stages = json.loads((out_ref / "result.json").read_text())["stages"]
    got_stages = json.loads((out / "result.json").read_text())["stages"]
    assert got_stages == want_stages
    assert len(want_stages["predictor"]["val_loss"]) == 10


# -- gradient accumulation -----------------------------------------------------------------------


def test_accumulation_gives_the_same_weights(split: WindowSplit) -> None:
    """Two micro-batches of 4 per step: the same mean gradient as one batch of 8 (teacher
    forcing, no dropout: nothing random), so the same weights up to float rounding."""
    run: dict[str, Any] = dict(
        epochs=2, batch_size=8, max_steps_per_epoch=6, lr=1e-4, patience=None, teacher_forcing=True
    )
    initial = weights(from_scratch(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 0)[1])
    one, _, r1 = train(split, "predictor", accumulation=1, **run)
    two, _, r2 = train(split, "predictor", accumulation=2, **run)
    assert max_abs_diff(weights(one), initial) > 1e-4  # the runs did move the weights
    assert max_abs_diff(weights(one), weights(two)) <= 1e-5
    assert r2.steps == r1.steps == 12
    assert r2.train_loss == pytest.approx(r1.train_loss, rel=1e-5)
    assert r2.val_loss == pytest.approx(r1.val_loss, rel=1e-5)


# -- refusals ------------------------------------------------------------------------------------


def test_settings_refusals() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        TrainSettings(stage="predictor", bf16=True)  # device cpu
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainSettings(stage="decoder")
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(stage="tokenizer", schedule="linear")
    for name in ("epochs", "batch_size", "accumulation"):
        zero: dict[str, Any] = {name: 0}
        with pytest.raises(ValueError, match=name):
            TrainSettings(stage="tokenizer", **zero)
    with pytest.raises(ValueError, match="warmup"):
        TrainSettings(stage="tokenizer", warmup=1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(stage="tokenizer", lr=0.0)
    assert TrainSettings(stage="tokenizer").learning_rate == 2e-4
    assert TrainSettings(stage="predictor").learning_rate == 4e-5
    assert TrainSettings(stage="predictor", clip_grad=0).max_grad_norm == 0


def test_stage_names() -> None:
    assert stages_of("both") == ("tokenizer", "predictor")
    assert stages_of("tokenizer") == ("tokenizer",)
    assert stages_of("predictor") == ("predictor",)
    with pytest.raises(ValueError, match="stage must be one of"):
        stages_of("all")


def test_train_stage_refusals(split: WindowSplit, tmp_path: Path) -> None:
    tokenizer, model = from_scratch(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 0)
    with pytest.raises(ValueError, match="multiple of processes x accumulation"):
        train_stage(tokenizer, split, TrainSettings(stage="tokenizer", batch_size=10, accumulation=4))
    with pytest.raises(ValueError, match="larger than the 209 training windows"):
        train_stage(tokenizer, split, TrainSettings(stage="tokenizer", batch_size=256))
    with pytest.raises(TypeError, match="trains a KronosTokenizer"):
        train_stage(model, split, TrainSettings(stage="tokenizer"))
    with pytest.raises(TypeError, match="trains a Kronos"):
        train_stage(tokenizer, split, TrainSettings(stage="predictor"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs the .*tokenizer"):
        train_stage(model, split, TrainSettings(stage="predictor"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_stage(tokenizer, split, TrainSettings(stage="tokenizer"), work_dir=tmp_path / "empty", resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_stage(tokenizer, split, TrainSettings(stage="tokenizer"), resume=True)  # no work_dir at all

    short: dict[str, Any] = dict(stage="tokenizer", epochs=1, batch_size=8, max_steps_per_epoch=2, patience=None)
    train_stage(tokenizer, split, TrainSettings(**short), work_dir=tmp_path / "w")
    assert (tmp_path / "w" / STATE_FILE).is_file()
    fresh = from_scratch(TINY_TOKENIZER_CONFIG, TINY_MODEL_CONFIG, 0)[0]
    with pytest.raises(ValueError, match="other settings"):
        train_stage(fresh, split, TrainSettings(**{**short, "epochs": 2}), work_dir=tmp_path / "w", resume=True)
    with pytest.raises(ValueError, match="other settings"):
        train_stage(fresh, split, TrainSettings(**{**short, "seed": 1}), work_dir=tmp_path / "w", resume=True)


def test_cli_needs_networks(tmp_path: Path) -> None:
    data = tmp_path / "candles.csv"
    random_walk_candles(100, seed=0).to_csv(data, index=False)
    assert main(["--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# -- learning-rate schedules ---------------------------------------------------------------------


def _lrs(schedule: str, lr: float, warmup: float, total: int) -> tuple[list[float], float]:
    """(the learning rate of each of `total` optimizer steps, the rate after the last)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(
        optimizer, TrainSettings(stage="predictor", lr=lr, schedule=schedule, warmup=warmup), total
    )
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used, optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedule_warms_up_peaks_and_decays(schedule: str) -> None:
    lr, total, warm = 1e-3, 100, 10
    used, after = _lrs(schedule, lr, warm / total, total)
    peak = max(range(total), key=used.__getitem__)
    assert used[peak] == pytest.approx(lr, rel=1e-9)
    assert peak in (warm - 1, warm)  # the end of the warm-up
    assert all(x < y for x, y in zip(used[:peak], used[1 : peak + 1], strict=True))  # rising
    assert all(x >= y for x, y in zip(used[peak:], used[peak + 1 :], strict=False))  # then decaying
    assert used[0] < lr / 5
    assert used[-1] < lr / 100
    if schedule == "cosine":
        assert after == 0.0
        assert used[0] == pytest.approx(lr / warm)
    else:
        assert used[0] == pytest.approx(lr / 10)  # upstream's div_factor
        assert after < lr / 100


def test_cosine_without_warmup_starts_at_the_peak() -> None:
    used, after = _lrs("cosine", 1e-3, 0.0, 50)
    assert used[0] == 1e-3
    assert all(x > y for x, y in zip(used, used[1:], strict=False))
    assert after == 0.0
