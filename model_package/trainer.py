"""The fine-tuning loop: one stage (tokenizer or predictor) on training windows.

- AdamW with upstream's betas (0.9, 0.95) and weight decay 0.1; learning rate 2e-4 for the
  tokenizer, 4e-5 for the predictor (upstream's defaults); a warm-up then either one-cycle
  (upstream: pct_start = warm-up share, div_factor 10) or cosine decay to zero.
- Gradient clipping (upstream: 2.0 tokenizer, 3.0 predictor), accumulation over micro-batches.
- Per epoch a validation loss; early stopping after `patience` epochs without a better one;
  the best weights are kept and loaded into the network at the end.
- Deterministic for a seed on CPU: the window order of epoch e is a permutation drawn from
  seed + e, dropout draws from the global RNG seeded with seed + rank.
- Optional bf16 autocast (CUDA only).
- Resumable: `state.pt` in `work_dir` after every epoch and when SIGINT / SIGTERM arrives (the
  step in progress finishes first); `resume=True` continues from it, and an interrupted run
  resumed to the end equals an uninterrupted one.
- Distributed: under `torchrun --nproc_per_node N` the same call trains with
  DistributedDataParallel (gloo on CPU, nccl on CUDA). `batch_size` is the global batch; each
  process takes an equal contiguous share, so the gradient equals one process's on the same
  global batch (the tokenizer's codebook-entropy term is a batch statistic: per process, as
  upstream).

Losses: `model_package.kronos.training`. Validation: the tokenizer's `recon_all` (upstream's
validation loss); the predictor's teacher-forced loss in eval mode with a causal s2 head
(deterministic, and free of the s2 head's eval-mode look-ahead at the targets).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .kronos.model import Kronos
from .kronos.tokenizer import KronosTokenizer
from .kronos.training import predictor_loss, tokenizer_loss
from .windows import Windows, WindowSplit

STAGES = ("tokenizer", "predictor")
SCHEDULES = ("onecycle", "cosine")
DEFAULT_LR = {"tokenizer": 2e-4, "predictor": 4e-5}
DEFAULT_CLIP = {"tokenizer": 2.0, "predictor": 3.0}
STATE_FILE = "state.pt"
ENCODE_CHUNK = 256  # windows per tokenizer pass when the predictor stage tokenises its data


class TrainingInterruptedError(RuntimeError):
    """SIGINT / SIGTERM arrived; the state was saved (resume with resume=True)."""


@dataclass
class TrainSettings:
    """One stage's training settings (batch_size is the global batch, all processes)."""

    stage: str
    epochs: int = 10
    batch_size: int = 32
    accumulation: int = 1
    lr: float | None = None  # None: DEFAULT_LR[stage]
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "onecycle"
    warmup: float = 0.03  # share of the optimizer steps spent warming up
    clip_grad: float | None = None  # None: DEFAULT_CLIP[stage]; 0 disables clipping
    patience: int | None = 3  # epochs without a better selection loss; None: never stop early
    teacher_forcing: bool = False  # predictor: s2 head on true s1 ids (else sampled: upstream)
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    max_steps_per_epoch: int | None = None  # cap (quick runs); None: every full batch

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "accumulation"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.bf16 and not self.device.startswith("cuda"):
            raise ValueError("bf16 autocast is for CUDA devices only")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def check_processes(self, world: int) -> None:
        """The global batch must split evenly over `world` processes x `accumulation` micro-batches."""
        micro = world * self.accumulation
        if self.batch_size % micro:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of processes x accumulation ({micro})")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    @property
    def max_grad_norm(self) -> float:
        return self.clip_grad if self.clip_grad is not None else DEFAULT_CLIP[self.stage]


@dataclass
class TrainResult:
    """What a finished stage reports; the network already holds the best weights."""

    best_loss: float  # best selection loss (validation, or the epoch's training loss without one)
    best_epoch: int  # 0-based
    epochs_run: int
    stopped_early: bool
    steps: int  # optimizer steps
    train_loss: list[float] = field(default_factory=list)  # per optimizer step
    val_loss: list[float] = field(default_factory=list)  # per epoch (empty without validation)
    epoch_train_loss: list[float] = field(default_factory=list)


StepCallback = Callable[[int, dict[str, float]], None]  # (global step, {loss terms, lr})
EpochCallback = Callable[[int, float, float | None], None]  # (epoch, train loss, val loss)


# -- distributed ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place: rank, world size, device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank, world, chosen)


def _all_sum(values: list[float], place: Dist) -> list[float]:
    """Sum of each value over processes (the identity in a world of one)."""
    if place.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=place.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# -- data ------------------------------------------------------------------------------------------


@torch.no_grad()
def tokenize(tokenizer: KronosTokenizer, windows: Windows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows x [N, T, 6] -> (s1, s2) [N, T] int64 on CPU, with the tokenizer in eval mode."""
    was_training = tokenizer.training
    tokenizer.eval()
    parts = [tokenizer.encode(windows.x[i : i + ENCODE_CHUNK].to(device)) for i in range(0, len(windows), ENCODE_CHUNK)]
    tokenizer.train(was_training)
    if not parts:
        T = windows.x.shape[1]
        return torch.zeros(0, T, dtype=torch.long), torch.zeros(0, T, dtype=torch.long)
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


class StageData:
    """The tensors one stage trains on: x (tokenizer) or s1, s2, stamp (predictor)."""

    def __init__(self, stage: str, windows: Windows, tokenizer: KronosTokenizer | None, device: torch.device):
        self.stage = stage
        self.tensors: tuple[torch.Tensor, ...]
        if stage == "tokenizer":
            self.tensors = (windows.x,)
        else:
            if tokenizer is None:
                raise ValueError("the predictor stage needs the (frozen) tokenizer to tokenise its windows")
            s1, s2 = tokenize(tokenizer, windows, device)
            self.tensors = (s1, s2, windows.stamp)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def rows(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(t[index].to(device, non_blocking=True) for t in self.tensors)


class LossModule(nn.Module):
    """The network plus its loss, so that DistributedDataParallel sees the loss's forward."""

    def __init__(self, net: KronosTokenizer | Kronos, stage: str, teacher_forcing: bool) -> None:
        super().__init__()
        self.net = net
        self.stage = stage
        self.teacher_forcing = teacher_forcing

    def forward(self, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage == "tokenizer":
            assert isinstance(self.net, KronosTokenizer)
            return tokenizer_loss(self.net, batch[0])
        assert isinstance(self.net, Kronos)
        s1, s2, stamp = batch
        return predictor_loss(self.net, s1, s2, stamp, teacher_forcing=self.teacher_forcing)


@torch.no_grad()
def validation_loss(net: KronosTokenizer | Kronos, data: StageData, batch_size: int, place: Dist) -> float | None:
    """Mean validation loss over every window (each process a share, summed), eval mode."""
    if len(data) == 0:
        return None
    was_training = net.training
    net.eval()
    share = torch.arange(place.rank, len(data), place.world)
    total, count = 0.0, 0
    for i in range(0, len(share), batch_size):
        batch = data.rows(share[i : i + batch_size], place.device)
        if isinstance(net, KronosTokenizer):
            loss = tokenizer_loss(net, batch[0])["recon_all"]
        else:
            s1, s2, stamp = batch
            loss = predictor_loss(net, s1, s2, stamp, teacher_forcing=True, causal_s2=True)["loss"]
        total += float(loss) * batch[0].shape[0]
        count += batch[0].shape[0]
    net.train(was_training)
    total, count_f = _all_sum([total, float(count)], place)
    return total / count_f


# -- schedule --------------------------------------------------------------------------------------


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (upstream) or linear warm-up then cosine decay to zero, over total_steps."""
    if settings.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=settings.learning_rate,
            total_steps=max(total_steps, 2),
            pct_start=max(settings.warmup, 1e-6),
            div_factor=10,
        )
    warm = max(1, round(settings.warmup * total_steps)) if settings.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- interruption ----------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT / SIGTERM while the loop runs; the loop stops after its current step."""

    def __init__(self) -> None:
        self.raised: int | None = None

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            self.raised = signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Everything that resuming needs besides the network, optimizer and scheduler."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    epoch_train_loss: list[float] = field(default_factory=list)
    epoch_loss_sum: float = 0.0


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in net.state_dict().items()}


def train_stage(
    net: KronosTokenizer | Kronos,
    split: WindowSplit,
    settings: TrainSettings,
    *,
    tokenizer: KronosTokenizer | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train `net` (the stage's network) on split.train, select on split.val; returns the
    history, and leaves the best weights in `net` (eval mode). `tokenizer` (predictor stage)
    tokenises the windows and stays frozen. Raises TrainingInterruptedError after saving the state
    to work_dir when SIGINT / SIGTERM arrives: from the start of the stage (a signal during
    data preparation stops the run after its first step), not only inside the loop."""
    stop = StopFlag()
    with stop.installed():
        return _run_stage(net, split, settings, stop, tokenizer, work_dir, resume, on_step, on_epoch, progress)


def _run_stage(
    net: KronosTokenizer | Kronos,
    split: WindowSplit,
    settings: TrainSettings,
    stop: StopFlag,
    tokenizer: KronosTokenizer | None,
    work_dir: Path | None,
    resume: bool,
    on_step: StepCallback | None,
    on_epoch: EpochCallback | None,
    progress: bool,
) -> TrainResult:
    """The body of `train_stage`, with the stop flag already installed."""
    expected = KronosTokenizer if settings.stage == "tokenizer" else Kronos
    if not isinstance(net, expected):
        raise TypeError(f"stage {settings.stage} trains a {expected.__name__}, got {type(net).__name__}")
    place = setup_distributed(settings.device)
    settings.check_processes(place.world)
    net.to(place.device)
    if settings.stage == "predictor" and tokenizer is not None:
        tokenizer.to(place.device)  # it tokenises the windows there (a CPU tokenizer would meet CUDA inputs)
    train_data = StageData(settings.stage, split.train, tokenizer, place.device)
    val_data = StageData(settings.stage, split.val, tokenizer, place.device)
    steps_per_epoch = len(train_data) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {settings.batch_size} is larger than the {len(train_data)} training windows")
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    total_steps = steps_per_epoch * settings.epochs

    torch.manual_seed(settings.seed + place.rank)
    module: nn.Module = LossModule(net, settings.stage, settings.teacher_forcing)
    if place.world > 1:
        ids = [place.device.index] if place.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay
    )
    scheduler = make_scheduler(optimizer, settings, total_steps)
    state = _Progress()
    best = _snapshot(net)
    state_path = work_dir / STATE_FILE if work_dir is not None else None
    if resume:
        if state_path is None or not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: no {STATE_FILE} in {work_dir}")
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["settings"] != asdict(settings):
            raise ValueError(f"{state_path} was saved with other settings; resume with the same ones")
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = _Progress(**saved["progress"])
        best = saved["best"]
        torch.set_rng_state(saved["rng"][place.rank] if place.rank < len(saved["rng"]) else saved["rng"][0])

    def save() -> None:
        rng = [torch.get_rng_state()]
        if place.world > 1:
            gathered: list[Any] = [None] * place.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if state_path is None or not place.main:
            return
        state_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": asdict(settings),
            "net": _snapshot(net),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": asdict(state),
            "best": best,
            "rng": rng,
        }
        partial = state_path.with_suffix(".partial")
        torch.save(payload, partial)
        partial.replace(state_path)  # atomic: a kill while saving leaves the previous state

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if settings.bf16 and place.device.type == "cuda" else nullcontext()
    )
    share = settings.batch_size // place.world
    micro_size = share // settings.accumulation
    bar = _progress_bar(total_steps, state.global_step, progress and place.main)
    while state.epoch < settings.epochs and not state.stopped_early:
        net.train()
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(settings.seed + state.epoch))
        while state.step_in_epoch < steps_per_epoch:
            batch_rows = order[state.step_in_epoch * settings.batch_size :][: settings.batch_size]
            mine = batch_rows[place.rank * share : (place.rank + 1) * share]
            optimizer.zero_grad(set_to_none=True)
            terms_sum: dict[str, float] = {}
            for j in range(settings.accumulation):
                batch = train_data.rows(mine[j * micro_size : (j + 1) * micro_size], place.device)
                last = j == settings.accumulation - 1
                sync = nullcontext() if last or place.world == 1 else module.no_sync()  # type: ignore[operator]
                with sync:
                    with autocast:
                        terms = module(*batch)
                    (terms["loss"] / settings.accumulation).backward()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / settings.accumulation
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            values = _all_sum(list(terms_sum.values()) + [float(stop.raised is not None)], place)
            logged = {k: v / place.world for k, v in zip(terms_sum, values, strict=False)}
            logged["lr"] = optimizer.param_groups[0]["lr"]
            state.train_loss.append(logged["loss"])
            state.epoch_loss_sum += logged["loss"]
            state.step_in_epoch += 1
            state.global_step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=state.epoch + 1, loss=f"{logged['loss']:.4f}")
            if on_step is not None and place.main:
                on_step(state.global_step, logged)
            if values[-1] > 0:  # some process was asked to stop
                save()
                if bar is not None:
                    bar.close()
                raise TrainingInterruptedError(f"interrupted at step {state.global_step}; state saved in {work_dir}")
        epoch_train = state.epoch_loss_sum / steps_per_epoch
        val = validation_loss(net, val_data, max(micro_size, 1) * 4, place)
        selection = val if val is not None else epoch_train
        state.epoch_train_loss.append(epoch_train)
        if val is not None:
            state.val_loss.append(val)
        if selection < state.best_loss:
            state.best_loss, state.best_epoch, state.bad_epochs = selection, state.epoch, 0
            best = _snapshot(net)
        else:
            state.bad_epochs += 1
            if settings.patience is not None and state.bad_epochs >= settings.patience:
                state.stopped_early = True
        if on_epoch is not None and place.main:
            on_epoch(state.epoch, epoch_train, val)
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sum = 0.0
        save()
    if bar is not None:
        bar.close()
    net.load_state_dict(best)
    net.eval()
    return TrainResult(
        best_loss=state.best_loss,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=state.stopped_early,
        steps=state.global_step,
        train_loss=state.train_loss,
        val_loss=state.val_loss,
        epoch_train_loss=state.epoch_train_loss,
    )


def _progress_bar(total: int, done: int, enabled: bool) -> Any:
    """A tqdm bar with ETA on stderr (main process only), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
