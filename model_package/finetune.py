"""Fine-tune a Kronos pair (tokenizer, then predictor) on long-format candles.

`finetune()` is what `kronos-registry finetune` and `make demo-model` run; this module's CLI
runs it without MLflow and writes the result as two checkpoints (Hugging Face layout):

    python -m model_package.finetune --tokenizer DIR --model DIR --data arch:SP500 --out DIR
    torchrun --nproc_per_node 2 -m model_package.finetune ...   (DistributedDataParallel)

Stage `both` trains the tokenizer first, then the predictor on the fine-tuned tokenizer's
tokens (upstream's order). `work_dir` holds each stage's resumable state; a finished
tokenizer stage is kept there (`tokenizer-best/`) so that resuming goes straight on to the
predictor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .kronos.checkpoint import load_model, load_tokenizer, random_init_, save_checkpoint
from .kronos.config import KronosConfig, TokenizerConfig
from .kronos.model import Kronos
from .kronos.tokenizer import KronosTokenizer
from .trainer import (
    STAGES,
    EpochCallback,
    StepCallback,
    TrainingInterruptedError,
    TrainResult,
    TrainSettings,
    setup_distributed,
    train_stage,
)
from .windows import WindowSplit, make_windows

STAGE_CHOICES = (*STAGES, "both")
FINISHED_TOKENIZER = "tokenizer-best"

StageStep = Callable[[str, int, dict[str, float]], None]  # (stage, step, terms)
StageEpoch = Callable[[str, int, float, float | None], None]  # (stage, epoch, train, val)


@dataclass
class WindowSpec:
    """How training windows are cut (see model_package.windows)."""

    lookback: int = 64
    horizon: int = 16
    val_fraction: float = 0.2
    stride: int = 1
    clip: float = 5.0


@dataclass
class FinetuneResult:
    """The fine-tuned pair (eval mode) and each trained stage's history."""

    tokenizer: KronosTokenizer
    model: Kronos
    split: WindowSplit
    stages: dict[str, TrainResult] = field(default_factory=dict)


def stages_of(stage: str) -> tuple[str, ...]:
    if stage not in STAGE_CHOICES:
        raise ValueError(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
    return STAGES if stage == "both" else (stage,)


def finetune(
    tokenizer: KronosTokenizer,
    model: Kronos,
    history: pd.DataFrame,
    stage: str,
    windows: WindowSpec,
    settings: dict[str, Any],
    *,
    work_dir: Path | None = None,
    resume: bool = False,
    on_step: StageStep | None = None,
    on_epoch: StageEpoch | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Cut windows from `history`, train the chosen stages in order; `settings` are the
    TrainSettings fields other than `stage` (shared by both stages; lr and clip_grad default
    per stage). Raises TrainingInterruptedError (state saved) on SIGINT / SIGTERM."""
    order = stages_of(stage)
    split = make_windows(
        history,
        windows.lookback,
        windows.horizon,
        val_fraction=windows.val_fraction,
        stride=windows.stride,
        clip=windows.clip,
    )
    result = FinetuneResult(tokenizer, model, split)
    for name in order:
        stage_dir = work_dir / name if work_dir is not None else None
        if name == "tokenizer" and work_dir is not None and (work_dir / FINISHED_TOKENIZER).is_dir() and resume:
            result.tokenizer = load_tokenizer(work_dir / FINISHED_TOKENIZER)
            continue
        stage_resume = resume and stage_dir is not None and (stage_dir / "state.pt").is_file()
        net: KronosTokenizer | Kronos = result.tokenizer if name == "tokenizer" else result.model
        result.stages[name] = train_stage(
            net,
            split,
            TrainSettings(stage=name, **settings),
            tokenizer=result.tokenizer if name == "predictor" else None,
            work_dir=stage_dir,
            resume=stage_resume,
            on_step=_step_of(on_step, name),
            on_epoch=_epoch_of(on_epoch, name),
            progress=progress,
        )
        if name == "tokenizer" and work_dir is not None and "predictor" in order and is_main_process():
            partial = work_dir / f"{FINISHED_TOKENIZER}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            save_checkpoint(result.tokenizer, partial)
            shutil.rmtree(work_dir / FINISHED_TOKENIZER, ignore_errors=True)
            partial.replace(work_dir / FINISHED_TOKENIZER)  # whole or absent, for resume
    return result


def _step_of(callback: StageStep | None, stage: str) -> StepCallback | None:
    """The stage's step callback: `callback` with the stage name bound."""
    if callback is None:
        return None
    return lambda step, terms: callback(stage, step, terms)


def _epoch_of(callback: StageEpoch | None, stage: str) -> EpochCallback | None:
    """The stage's epoch callback: `callback` with the stage name bound."""
    if callback is None:
        return None
    return lambda epoch, train, val: callback(stage, epoch, train, val)


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def from_scratch(
    tokenizer_config: TokenizerConfig, model_config: KronosConfig, seed: int
) -> tuple[KronosTokenizer, Kronos]:
    """A new pair with upstream-style random initialisation (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return (
        random_init_(KronosTokenizer(tokenizer_config), generator),
        random_init_(Kronos(model_config), generator),
    )


# -- command line ------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Window and optimisation options shared by this CLI and `kronos-registry finetune`."""
    defaults = TrainSettings(stage="predictor")
    spec = WindowSpec()
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="both", help="what to train (default both)")
    parser.add_argument("--lookback", type=int, default=spec.lookback, help="history candles per window")
    parser.add_argument("--horizon", type=int, default=spec.horizon, help="future candles per window")
    parser.add_argument("--val-fraction", type=float, default=spec.val_fraction, help="last share of each series")
    parser.add_argument("--stride", type=int, default=spec.stride, help="candles between window starts")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch (all processes)")
    parser.add_argument("--accumulation", type=int, default=defaults.accumulation, help="micro-batches per step")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 tokenizer, 4e-5 predictor)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--schedule", choices=("onecycle", "cosine"), default=defaults.schedule)
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="share of steps warming up")
    parser.add_argument("--clip-grad", type=float, help="max gradient norm (default 2 tokenizer, 3 predictor)")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="epochs without improvement")
    parser.add_argument("--teacher-forcing", action="store_true", help="s2 head on true s1 ids (default: sampled)")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of an epoch")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")


def settings_from_args(args: argparse.Namespace) -> tuple[WindowSpec, dict[str, Any]]:
    windows = WindowSpec(args.lookback, args.horizon, args.val_fraction, args.stride)
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "accumulation": args.accumulation,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "warmup": args.warmup,
        "clip_grad": args.clip_grad,
        "patience": args.patience if args.patience and args.patience > 0 else None,
        "teacher_forcing": args.teacher_forcing,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "seed": args.seed,
        "device": args.device,
        "bf16": args.bf16,
    }
    return windows, settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_package.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="base tokenizer checkpoint directory")
    parser.add_argument("--model", type=Path, help="base predictor checkpoint directory")
    parser.add_argument("--from-scratch", type=Path, metavar="CONFIGS_JSON", help="{tokenizer_config, model_config}")
    parser.add_argument("--data", required=True, help="arch:SP500, arch:NASDAQ, arch:ALL or a .csv / .parquet file")
    parser.add_argument("--out", type=Path, required=True, help="where the two checkpoints are written")
    parser.add_argument("--work-dir", type=Path, help="resumable state (default OUT/.work)")
    parser.add_argument("--resume", action="store_true", help="continue from the state in the work dir")
    parser.add_argument("--progress", action="store_true", help="progress bar with ETA on stderr")
    add_training_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import read_candles

    args = _parser().parse_args(argv)
    if args.from_scratch:
        configs = json.loads(args.from_scratch.read_text())
        tokenizer, model = from_scratch(
            TokenizerConfig.from_dict(configs["tokenizer_config"]),
            KronosConfig.from_dict(configs["model_config"]),
            args.seed,
        )
    elif args.tokenizer and args.model:
        tokenizer, model = load_tokenizer(args.tokenizer), load_model(args.model)
    else:
        print("give --tokenizer and --model, or --from-scratch", file=sys.stderr)
        return 2
    history, description = read_candles(args.data)
    windows, settings = settings_from_args(args)
    setup_distributed(settings["device"])
    try:
        result = finetune(
            tokenizer,
            model,
            history,
            args.stage,
            windows,
            settings,
            work_dir=args.work_dir or args.out / ".work",
            resume=args.resume,
            progress=args.progress,
        )
    except TrainingInterruptedError as exc:
        print(f"finetune: {exc}; rerun with --resume", file=sys.stderr)
        return 130
    if is_main_process():
        save_checkpoint(result.tokenizer, args.out / "tokenizer")
        save_checkpoint(result.model, args.out / "model")
        summary = {
            "data": description,
            "windows": result.split.describe(),
            "stages": {name: dataclasses.asdict(r) for name, r in result.stages.items()},
        }
        (args.out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"finetune: wrote {args.out}/tokenizer and {args.out}/model ({result.split.describe()})")
    if torch.distributed.is_initialized():
        # Leave together: a rank that tore its gloo group down while rank 0 was still writing
        # the checkpoints aborted ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
