"""`kronos-registry finetune`: fine-tune a Kronos pair on candles and register the result.

    kronos-registry finetune --base models:/kronos@champion --data arch:NASDAQ --epochs 2
    torchrun --nproc_per_node 4 -m registry_scripts finetune --base ... --device cuda   (DDP)

Base: a registered version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`: its tokenizer
and model artifacts are downloaded), a hub id (`NeoQuasar/Kronos-small`: the tokenizer of
its published pairing) or a directory: one checkpoint (with --tokenizer) or a pair holding
`tokenizer/` and `model/` (what `python -m model_package.finetune --out` writes).

Everything goes into ONE MLflow run of experiment `kronos-finetune`: params (base, data,
data digest, every window and training setting, world size), per-step losses
`{stage}_train_loss` and `{stage}_{term}` (step = global step of the stage), per-epoch
`{stage}_val_loss` and `{stage}_epoch_train_loss` (step = epoch), `{stage}_best_loss`, a
`loss_curve.png`, tag `kronos.data_digest`. The fine-tuned pair is then logged in the same
run as a new registered version with alias `challenger`, the usual version tags and
`kronos.lineage.*` tags (base, base version and run, data, data digest, run, stage).

The work dir (default `.state/finetune/<stage>-<digest of registry, model, base, data,
stage>`) holds `run.json` (the MLflow run and settings), `base/` (the base pair as resolved
at the start: an alias that moves later does not change a resumed run) and the trainer's
state. Ctrl-C / SIGTERM: the trainer finishes its step and saves its state, the run ends
KILLED, nothing is registered, exit 130; `--resume` with the same options (and --work-dir)
continues the same run. The work dir is emptied once the version is registered.

Under torchrun (WORLD_SIZE > 1) every process trains (DistributedDataParallel); only rank 0
talks to MLflow and writes the work dir's base/ and run.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch.distributed as dist
from matplotlib.figure import Figure  # the OO API: no pyplot, no GUI backend (Agg for PNG)
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from model_package.errors import KronosInputError
from model_package.finetune import FINISHED_TOKENIZER, FinetuneResult, WindowSpec, finetune, stages_of
from model_package.kronos import (
    Kronos,
    KronosTokenizer,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
    save_checkpoint,
)
from model_package.kronos.checkpoint import CONFIG_FILE, copy_checkpoint
from model_package.kronos.presets import preset_by_name
from model_package.log_model import log_kronos_model
from model_package.trainer import STAGES, TrainingInterruptedError, TrainSettings, setup_distributed
from model_package.windows import WindowSplit, data_digest, make_windows

from . import errors
from .errors import BadDataError, CliError, InterruptedRunError, NotFoundError
from .log_version import version_tags
from .registry import CHALLENGER, ROOT, Registry, connect, default_model_name, tracking_uri

FINETUNE_EXPERIMENT = "kronos-finetune"
STATE_ROOT = ROOT / ".state" / "finetune"
RUN_FILE = "run.json"
BASE_DIR = "base"
MARKER = ".kronos-finetune"  # marks a work dir as ours: only then are its entries deleted
WORK_ENTRIES = (RUN_FILE, BASE_DIR, *STAGES, FINISHED_TOKENIZER)  # what we may delete in a work dir
MODELS_PREFIX = "models:/"
LOSS_CURVE = "loss_curve.png"
WINDOW_FIELDS = ("lookback", "horizon", "stride", "val_fraction", "clip")  # KronosInputError fields = usage
FLUSH_METRICS = 500  # buffered metrics written in one log_batch call (MLflow's cap is 1000)
FLUSH_SECONDS = 10.0


@dataclass
class FinetuneRequest:
    """The command line of `kronos-registry finetune`, parsed."""

    base: str
    data: str
    tokenizer: str | None
    stage: str
    windows: WindowSpec
    settings: dict[str, Any]  # TrainSettings fields other than stage
    work_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    max_context: int | None = None


@dataclass
class BaseInfo:
    """Where the base pair came from (kept in run.json; its weights are in work_dir/base)."""

    spec: str  # the --base string
    kind: str  # registry, hub or path
    model_name: str | None = None  # registry: the registered model
    version: str | None = None  # registry: the version the alias / number resolved to
    run_id: str | None = None  # registry: the run that logged that version
    max_context: int | None = None  # the base's context (registered or published), if known
    tokenizer: str | None = None  # where the tokenizer came from


# -- data -----------------------------------------------------------------------------------------


def load_history(source: str) -> tuple[pd.DataFrame, str]:
    """(candles, description) of --data; unreadable or missing -> BadDataError (exit 6)."""
    from model_package.data import read_candles

    try:
        return read_candles(source)
    except (ValueError, ImportError) as exc:
        raise BadDataError(f"--data {source}: {exc}") from None


def cut_windows(history: pd.DataFrame, description: str, spec: WindowSpec, batch_size: int) -> WindowSplit:
    """The training / validation windows, or a one-line error: data problems exit 6 (the
    field and rule named), impossible window settings exit 2."""
    try:
        split = make_windows(
            history, spec.lookback, spec.horizon, val_fraction=spec.val_fraction, stride=spec.stride, clip=spec.clip
        )
    except KronosInputError as exc:
        if exc.field in WINDOW_FIELDS:
            raise CliError(f"--{exc.field.replace('_', '-')}: {exc.rule}", errors.USAGE) from None
        raise BadDataError(f"{description}: {exc}") from None
    if len(split.train) < batch_size:
        raise BadDataError(
            f"{description}: {split.describe()}: fewer training windows than --batch-size {batch_size}; "
            "use a smaller batch, a smaller --stride or more data"
        )
    return split


def check_settings(stage: str, settings: dict[str, Any], world: int) -> None:
    """Refuse bad training settings before any work (exit 2)."""
    try:
        for name in stages_of(stage):
            TrainSettings(stage=name, **settings).check_processes(world)
    except (ValueError, TypeError) as exc:
        raise CliError(f"bad training setting: {exc}", errors.USAGE) from None


# -- base ------------------------------------------------------------------------------------------


def parse_models_uri(spec: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS); `models:/NAME/VERSION` -> (NAME, VERSION)."""
    rest = spec[len(MODELS_PREFIX) :].strip("/")
    if "@" in rest:
        name, _, ref = rest.partition("@")
    else:
        name, _, ref = rest.rpartition("/")
        if not ref.isdigit():
            name = ""
    if not name or not ref or "/" in ref:
        raise CliError(f"--base {spec!r}: use models:/NAME@ALIAS or models:/NAME/VERSION", errors.USAGE)
    return name, ref


def _registered_base(registry: Registry, spec: str, target: Path) -> tuple[BaseInfo, Path, Path]:
    """Download a registered version's tokenizer and model artifacts."""
    from mlflow.models import Model

    from model_package.pyfunc import MODEL_ARTIFACT, TOKENIZER_ARTIFACT

    name, ref = parse_models_uri(spec)
    version = Registry(registry.uri, registry.client, name).resolve(ref)
    with tempfile.TemporaryDirectory(prefix="kronos-base-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=tmp)
        )
        found = {a: local / "artifacts" / a for a in (TOKENIZER_ARTIFACT, MODEL_ARTIFACT)}
        missing = [a for a, path in found.items() if not (path / CONFIG_FILE).is_file()]
        if missing:
            raise NotFoundError(f"--base {spec}: version {version.version} has no {', '.join(missing)} artifact")
        metadata = Model.load(str(local / "MLmodel")).metadata or {}
        tokenizer = copy_checkpoint(found[TOKENIZER_ARTIFACT], target / "tokenizer")
        model = copy_checkpoint(found[MODEL_ARTIFACT], target / "model")
    context = metadata.get("max_context")
    info = BaseInfo(
        spec=spec,
        kind="registry",
        model_name=name,
        version=str(version.version),
        run_id=version.run_id,
        max_context=int(context) if context else None,
        tokenizer=f"models:/{name}/{version.version}",
    )
    return info, tokenizer, model


def _checkpoint_base(spec: str, tokenizer: str | None, target: Path) -> tuple[BaseInfo, Path, Path]:
    """A hub id or directory (a checkpoint, or a pair dir with tokenizer/ and model/)."""
    path = Path(spec).expanduser()
    preset = preset_by_name(spec)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / "model").is_dir():
        model_dir = path / "model"
        tokenizer = tokenizer or (str(path / "tokenizer") if (path / "tokenizer").is_dir() else None)
    else:
        model_dir = resolve_checkpoint(spec)
        tokenizer = tokenizer or (preset.tokenizer_id if preset is not None else None)
    if tokenizer is None:
        raise CliError(
            f"--base {spec} has no published tokenizer pairing: give --tokenizer DIR_OR_HUB_ID", errors.USAGE
        )
    tokenizer_dir = resolve_checkpoint(tokenizer)
    info = BaseInfo(
        spec=spec,
        kind="path" if path.is_dir() else "hub",
        max_context=preset.max_context if preset is not None and not path.is_dir() else None,
        tokenizer=tokenizer,
    )
    return info, copy_checkpoint(tokenizer_dir, target / "tokenizer"), copy_checkpoint(model_dir, target / "model")


def resolve_base(registry: Registry, request: FinetuneRequest, target: Path) -> BaseInfo:
    """Put the base pair into `target` (tokenizer/, model/) and check that it loads and fits."""
    if request.base.startswith(MODELS_PREFIX):
        if request.tokenizer:
            raise CliError("a registered --base brings its own tokenizer: drop --tokenizer", errors.USAGE)
        info, tokenizer_dir, model_dir = _registered_base(registry, request.base, target)
    else:
        info, tokenizer_dir, model_dir = _checkpoint_base(request.base, request.tokenizer, target)
    tokenizer, model = load_tokenizer(tokenizer_dir), load_model(model_dir)  # CheckpointError: exit 5
    check_pair(tokenizer, model, request.base)
    return info


def check_pair(tokenizer: KronosTokenizer, model: Kronos, base: str) -> None:
    """The predictor must read the tokenizer's codes."""
    t, m = tokenizer.config, model.config
    if (t.s1_bits, t.s2_bits) != (m.s1_bits, m.s2_bits):
        raise NotFoundError(
            f"checkpoint not usable: --base {base}: tokenizer codes (s1_bits, s2_bits) = "
            f"({t.s1_bits}, {t.s2_bits}) != the model's ({m.s1_bits}, {m.s2_bits})"
        )


# -- the work dir ------------------------------------------------------------------------------------


def default_work_dir(uri: str, model_name: str, request: FinetuneRequest) -> Path:
    """`.state/finetune/<stage>-<digest>`: the same command finds the same dir again."""
    key = json.dumps([uri, model_name, request.base, request.data, request.stage])
    return STATE_ROOT / f"{request.stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def clear_work_dir(work_dir: Path) -> None:
    """Remove what a previous fine-tune left there (only our own entries)."""
    for name in WORK_ENTRIES:
        path = work_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def claim_work_dir(work_dir: Path) -> None:
    """A fresh start: the dir must be new, empty or one of ours (whose old state goes)."""
    if work_dir.exists() and not work_dir.is_dir():
        raise CliError(f"--work-dir {work_dir} is not a directory", errors.USAGE)
    if work_dir.is_dir() and any(work_dir.iterdir()) and not (work_dir / MARKER).is_file():
        raise CliError(
            f"--work-dir {work_dir} is not empty and holds no fine-tune state: give a new or empty directory",
            errors.USAGE,
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / MARKER).write_text("work dir of `kronos-registry finetune`: resumable training state\n")
    clear_work_dir(work_dir)


def release_work_dir(work_dir: Path) -> None:
    """After registration: the state is of no further use."""
    clear_work_dir(work_dir)
    (work_dir / MARKER).unlink(missing_ok=True)
    if work_dir.is_dir() and not any(work_dir.iterdir()):
        work_dir.rmdir()


def read_record(work_dir: Path) -> dict[str, Any]:
    """run.json of an interrupted fine-tune, or NotFoundError (exit 5)."""
    path = work_dir / RUN_FILE
    if not path.is_file():
        raise NotFoundError(f"nothing to resume in {work_dir} (no {RUN_FILE}): start without --resume")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NotFoundError(f"nothing to resume: {path} is unreadable ({exc})") from None


def write_record(work_dir: Path, record: dict[str, Any]) -> None:
    """run.json, written atomically."""
    partial = work_dir / f"{RUN_FILE}.partial"
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    partial.replace(work_dir / RUN_FILE)


def check_same_options(saved: dict[str, str], now: dict[str, str]) -> None:
    """--resume continues the interrupted run only with the same options and data (exit 2)."""
    keys = sorted(saved.keys() | now.keys())
    changed = [f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if changed:
        raise CliError(
            f"--resume needs the options and data of the interrupted run: {'; '.join(changed)}", errors.USAGE
        )


# -- MLflow ----------------------------------------------------------------------------------------


def run_params(
    request: FinetuneRequest,
    base: BaseInfo,
    history: pd.DataFrame,
    description: str,
    digest: str,
    split: WindowSplit,
    world: int,
) -> dict[str, str]:
    """Everything that defines the fine-tune, as MLflow params (strings; unset: "default"
    where a default applies, else "none")."""
    values: dict[str, Any] = {
        "base": request.base,
        "base_kind": base.kind,
        "base_version": base.version,
        "base_run_id": base.run_id,
        "base_tokenizer": base.tokenizer,
        "data": description,
        "data_digest": digest,
        "data_rows": len(history),
        "stage": request.stage,
        **asdict(request.windows),
        "train_windows": len(split.train),
        "val_windows": len(split.val),
        **request.settings,
        "world_size": world,
        "max_context": request.max_context or base.max_context,
    }
    defaulted = ("lr", "clip_grad", "max_context")  # None: the stage's / checkpoint's default
    return {k: str(v) if v is not None else "default" if k in defaulted else "none" for k, v in values.items()}


@contextmanager
def no_project_run() -> Iterator[str | None]:
    """Under `mlflow run` (MLFLOW_RUN_ID set) our run is our own, not the project's: yield
    the project run's id, with the variable unset meanwhile (else start_run resumes it)."""
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield project_run
    finally:
        if project_run:
            os.environ["MLFLOW_RUN_ID"] = project_run


class MetricLog:
    """Buffers metrics and writes them in batches: one request per optimizer step would cost
    more than a small model's step. A failed write during training is retried at the next
    flush (training goes on); the final flush must succeed."""

    def __init__(self, registry: Registry, run_id: str) -> None:
        self.client, self.run_id = registry.client, run_id
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()
        self.warned = False

    def add(self, key: str, value: float, step: int) -> None:
        if math.isfinite(value):
            self.pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def on_step(self, stage: str, step: int, terms: dict[str, float]) -> None:
        for term, value in terms.items():
            self.add(f"{stage}_train_loss" if term == "loss" else f"{stage}_{term}", value, step)
        if len(self.pending) >= FLUSH_METRICS or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush(strict=False)

    def on_epoch(self, stage: str, epoch: int, train: float, val: float | None) -> None:
        self.add(f"{stage}_epoch_train_loss", train, epoch)
        if val is not None:
            self.add(f"{stage}_val_loss", val, epoch)
        self.flush(strict=False)

    def flush(self, strict: bool = True) -> None:
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                del self.pending[:1000]
        except Exception as exc:
            if strict:
                raise
            if not self.warned:
                print(f"warning: metrics not written yet ({type(exc).__name__}); retrying", file=sys.stderr)
                self.warned = True
        self.last_flush = time.monotonic()


def metric_series(registry: Registry, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, sorted by step; a step logged twice (resumed after a hard
    kill) keeps its latest value."""
    latest: dict[int, tuple[int, float]] = {}
    for m in registry.client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def loss_curve(curves: dict[str, dict[str, list[tuple[int, float]]]], title: str) -> Figure:
    """One panel per stage: training loss per optimizer step, and per epoch (at the step that
    ends it) the epoch's mean training loss and the validation loss."""
    fig = Figure(figsize=(6 * len(curves), 4))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (stage, series) in zip(axes, curves.items(), strict=True):
        steps = series["train_loss"]
        if steps:
            ax.plot(*zip(*steps, strict=True), color="tab:blue", lw=0.8, alpha=0.7, label="train loss (step)")
        epochs = series["epoch_train_loss"] or series["val_loss"]
        per_epoch = max(1, round(max((s for s, _ in steps), default=0) / max(len(epochs), 1)))
        for key, style, label in (
            ("epoch_train_loss", {"color": "tab:blue", "marker": "s", "ls": "--"}, "train loss (epoch mean)"),
            ("val_loss", {"color": "tab:orange", "marker": "o"}, "validation loss (epoch)"),
        ):
            points = series[key]
            if points:
                ax.plot([(e + 1) * per_epoch for e, _ in points], [v for _, v in points], label=label, **style)
        ax.set_title(f"{stage} stage", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def stage_summary(registry: Registry, run_id: str, result: FinetuneResult, stage: str) -> dict[str, float]:
    """Final metrics of a stage: from its TrainResult, or (a tokenizer stage finished before a
    resume, so not trained again) from the run's metric history."""
    if stage in result.stages:
        r = result.stages[stage]
        return {
            f"{stage}_best_loss": r.best_loss,
            f"{stage}_best_epoch": r.best_epoch,
            f"{stage}_epochs_run": r.epochs_run,
            f"{stage}_steps": r.steps,
            f"{stage}_stopped_early": float(r.stopped_early),
        }
    selection = metric_series(registry, run_id, f"{stage}_val_loss") or metric_series(
        registry, run_id, f"{stage}_epoch_train_loss"
    )
    if not selection:
        return {}
    best_epoch, best = min(selection, key=lambda point: point[1])
    return {f"{stage}_best_loss": best, f"{stage}_best_epoch": best_epoch, f"{stage}_epochs_run": len(selection)}


# -- the command -------------------------------------------------------------------------------------


@dataclass
class Started:
    """What rank 0 set up before training: the run, the work dir, the base."""

    registry: Registry
    run_id: str
    base: BaseInfo
    description: str
    digest: str
    max_context: int | None


def _share_outcome(code: int, world: int) -> int:
    """Rank 0's outcome of the set-up (0 ok, else its exit code) to every process."""
    if world == 1:
        return code
    box = [code]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _start(
    request: FinetuneRequest,
    model_name: str | None,
    work_dir: Path,
    history: pd.DataFrame,
    description: str,
    split: WindowSplit,
    world: int,
) -> Started:
    """Rank 0: connect, resolve (or reload) the base, start (or reopen) the MLflow run."""
    registry = connect(model_name)
    record: dict[str, Any] = {}
    if request.resume:
        record = read_record(work_dir)
        if record.get("tracking_uri") != registry.uri or record.get("model_name") != registry.model_name:
            raise CliError(
                f"{work_dir} belongs to a fine-tune of {record.get('model_name')!r} at {record.get('tracking_uri')}",
                errors.USAGE,
            )
        base = BaseInfo(**record["base"])
        if not (work_dir / BASE_DIR / "model").is_dir():
            raise NotFoundError(f"nothing to resume: {work_dir / BASE_DIR} is gone; start without --resume")
    else:  # the base is staged first: a base that fails leaves the work dir as it was
        with tempfile.TemporaryDirectory(prefix="kronos-base-") as staging:
            base = resolve_base(registry, request, Path(staging))
            claim_work_dir(work_dir)
            (work_dir / BASE_DIR).mkdir()
            for part in ("tokenizer", "model"):
                shutil.move(Path(staging) / part, work_dir / BASE_DIR / part)
    digest = data_digest(history)
    params = run_params(request, base, history, description, digest, split, world)
    if request.resume:
        check_same_options(record["params"], params)
        mlflow.start_run(run_id=record["run_id"])
    else:
        short = base.spec.rstrip("/").rsplit("/", 1)[-1].replace("@", "-")
        mlflow.start_run(
            experiment_id=registry.experiment_id(FINETUNE_EXPERIMENT), run_name=f"finetune-{request.stage}-{short}"
        )
    run = mlflow.active_run()
    assert run is not None
    run_id = run.info.run_id
    if not request.resume:
        mlflow.log_params(params)
        mlflow.set_tags(
            {
                "kronos.data_digest": digest,
                "kronos.data": description,
                "kronos.base": request.base,
                "kronos.stage": request.stage,
                "kronos.model_name": registry.model_name,
                **({"kronos.base_version": base.version} if base.version else {}),
            }
        )
        record = {
            "run_id": run_id,
            "tracking_uri": registry.uri,
            "model_name": registry.model_name,
            "base": asdict(base),
            "params": params,
        }
        write_record(work_dir, record)
    return Started(registry, run_id, base, description, digest, request.max_context or base.max_context)


def _lineage_tags(request: FinetuneRequest, started: Started) -> dict[str, str]:
    base = started.base
    tags = {
        "kronos.lineage.base": request.base,
        "kronos.lineage.data": started.description,
        "kronos.lineage.data_digest": started.digest,
        "kronos.lineage.finetune_run_id": started.run_id,
        "kronos.lineage.stage": request.stage,
    }
    if base.kind == "registry":
        tags.update(
            {
                "kronos.lineage.base_model": str(base.model_name),
                "kronos.lineage.base_version": str(base.version),
                "kronos.lineage.base_run_id": str(base.run_id),
            }
        )
    return tags


def _register(request: FinetuneRequest, started: Started, result: FinetuneResult) -> str:
    """Rank 0, inside the run: final metrics, loss curve, the new version + tags + alias."""
    registry, run_id = started.registry, started.run_id
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for stage in stages_of(request.stage):
        mlflow.log_metrics(stage_summary(registry, run_id, result, stage))
        curves[stage] = {
            key: metric_series(registry, run_id, f"{stage}_{key}")
            for key in ("train_loss", "epoch_train_loss", "val_loss")
        }
    mlflow.log_figure(loss_curve(curves, f"fine-tune of {request.base} on {started.description}"), LOSS_CURVE)
    with tempfile.TemporaryDirectory(prefix="kronos-finetuned-") as tmp:
        tokenizer_dir = save_checkpoint(result.tokenizer, Path(tmp) / "tokenizer")
        model_dir = save_checkpoint(result.model, Path(tmp) / "model")
        info = log_kronos_model(
            tokenizer_dir, model_dir, registered_model_name=registry.model_name, max_context=started.max_context
        )
    version, name = str(info.registered_model_version), registry.model_name
    source = f"finetune:{run_id}"
    tokenizer_source = source if "tokenizer" in stages_of(request.stage) else f"base:{started.base.tokenizer}"
    tags = version_tags(info.metadata or {}, source=source, tokenizer_source=tokenizer_source)
    tags.update(_lineage_tags(request, started))
    for key, value in tags.items():
        registry.client.set_model_version_tag(name, version, key, value)
    registry.client.set_registered_model_alias(name, CHALLENGER, version)
    mlflow.set_tags({"kronos.registered_model": name, "kronos.registered_version": version})
    return version


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_finetune(request: FinetuneRequest, model_name: str | None) -> str | None:
    """The whole command; returns the new version number (None on ranks other than 0)."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # outside the trainer's own handling
    try:
        with no_project_run() as project_run:
            return _run(request, model_name, project_run)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(request: FinetuneRequest, model_name: str | None, project_run: str | None) -> str | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_settings(request.stage, request.settings, world)
    history, description = load_history(request.data)
    split = cut_windows(history, description, request.windows, int(request.settings["batch_size"]))
    place = setup_distributed(str(request.settings["device"]))
    work_dir = (
        request.work_dir or default_work_dir(tracking_uri(), model_name or default_model_name(), request)
    ).resolve()
    started: Started | None = None
    if place.main:
        try:
            started = _start(request, model_name, work_dir, history, description, split, place.world)
        except BaseException as exc:
            if mlflow.active_run() is not None:
                mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            _share_outcome(exc.code if isinstance(exc, CliError) else errors.UNEXPECTED, place.world)
            raise
        _share_outcome(errors.OK, place.world)
    else:
        code = _share_outcome(errors.OK, place.world)
        if code != errors.OK:
            raise SystemExit(code)  # rank 0 reports the error
    metrics = MetricLog(started.registry, started.run_id) if started is not None else None
    try:
        if started is not None:
            if project_run:
                mlflow.set_tag("kronos.mlproject_run_id", project_run)
                started.registry.client.set_tag(project_run, "kronos.run.finetune", started.run_id)
            print(
                f"fine-tuning {request.base} ({request.stage}) on {description}: {split.describe()}; "
                f"run {started.run_id}, work dir {work_dir}",
                file=sys.stderr,
                flush=True,
            )
        result = finetune(
            load_tokenizer(work_dir / BASE_DIR / "tokenizer"),
            load_model(work_dir / BASE_DIR / "model"),
            history,
            request.stage,
            request.windows,
            request.settings,
            work_dir=work_dir,
            resume=request.resume,
            on_step=metrics.on_step if metrics else None,
            on_epoch=metrics.on_epoch if metrics else None,
            progress=request.progress,
        )
        if started is None or metrics is None:
            return None
        metrics.flush()
        version = _register(request, started, result)
    except (TrainingInterruptedError, KeyboardInterrupt) as exc:
        if started is None or metrics is None:
            raise SystemExit(errors.INTERRUPTED) from None
        _end_run(metrics, "KILLED")
        where = str(exc) if isinstance(exc, TrainingInterruptedError) else f"interrupted; state in {work_dir}"
        raise InterruptedRunError(
            f"{where}; run {started.run_id} ended KILLED, nothing registered; "
            f"continue with the same command plus --resume --work-dir {work_dir}"
        ) from None
    except BaseException:
        if metrics is not None:
            _end_run(metrics, "FAILED")
        raise
    mlflow.end_run("FINISHED")
    release_work_dir(work_dir)
    name = started.registry.model_name
    print(f"fine-tuned {name} version {version} (alias {CHALLENGER}) run {started.run_id}")
    return version


def _end_run(metrics: MetricLog, status: str) -> None:
    """End the active run with `status`, writing what metrics we can first."""
    try:
        metrics.flush(strict=False)
    finally:
        with suppress(MlflowException):
            mlflow.end_run(status)
