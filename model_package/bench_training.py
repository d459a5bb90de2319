"""Benchmark of the training step: ours vs upstream Kronos's, same batch, same process.

    python -m model_package.bench_training                        # Kronos-small shape, CPU, 2 threads
    python -m model_package.bench_training --stages predictor --steps 2 --repeats 3
    python -m model_package.bench_training --device cuda --bf16   # on a GPU, bf16 autocast for both
    python -m model_package.bench_training --reference /path/to/kronos-upstream

A step is what upstream's fine-tuning scripts do with a batch: forward in training mode
(dropout with the config's probabilities; the predictor's s2 head conditioned on s1 ids
sampled from its own logits, no teacher forcing), loss, backward, clip_grad_norm_ (2.0
tokenizer, 3.0 predictor), AdamW step (betas 0.9/0.95, weight decay 0.1), zero_grad. Both
implementations start from the same random weights (upstream's network loads our state
dict) and train on the same batch of `--batch` windows of `--window` candles (upstream's
default window, lookback 90 + horizon 10 + 1): normalised N(0, 1) candles clipped at 5 for
the tokenizer, random tokens and valid calendar stamps for the predictor.

Before timing, a sanity check: eval mode (no dropout), float32, same weights, same batch,
the predictor teacher-forced (its deterministic path); the two losses must agree to
1e-5 relative, otherwise the benchmark stops (the ratio would compare unequal work).

Timed blocks of `--steps` steps alternate between the two implementations (which one goes
first alternates too), after `--warmup` untimed steps each; windows/s is the median over
`--repeats` blocks, and ours/upstream the ratio of the medians (above 1: ours is faster);
"range" is the spread of the per-repeat ratios. On CPUs the process CPU time per step is
printed too. On a CPU shared with other jobs, keep `--threads` at or below the idle cores:
oversubscribed OpenMP threads stall at every parallel op, which made both steps several
times slower here and turned the ratio into noise.

Upstream's code (MIT) is never imported by the project: `run` puts `--reference` on sys.path.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kronos import PRESETS, Kronos, KronosTokenizer
from .kronos.checkpoint import RECOMPUTED_BUFFER, random_init_
from .kronos.presets import Preset
from .kronos.training import predictor_loss, tokenizer_loss

STAGES = ("tokenizer", "predictor")
SHAPES = {"mini": "NeoQuasar/Kronos-mini", "small": "NeoQuasar/Kronos-small", "base": "NeoQuasar/Kronos-base"}
CLIP = {"tokenizer": 2.0, "predictor": 3.0}  # upstream's fine-tuning scripts
LEARNING_RATE = {"tokenizer": 2e-4, "predictor": 4e-5}  # upstream's defaults (speed does not depend on them)
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
WINDOW = 90 + 10 + 1  # upstream's default lookback + horizon + 1
LOSS_TOLERANCE = 1e-5  # relative difference of the eval-mode losses
DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "kronos-upstream"


@dataclass
class Row:
    stage: str
    windows_per_step: int
    ours_windows_s: float  # median over the repeats
    upstream_windows_s: float
    ratio: float  # ours / upstream, of the medians (> 1: ours faster)
    ratio_min: float  # per repeat (paired blocks), the spread
    ratio_max: float
    ours_ms_step: float  # median wall time
    upstream_ms_step: float
    ours_cpu_s_step: float | None  # median process CPU time (CPU devices only)
    upstream_cpu_s_step: float | None

    @property
    def cpu_ratio(self) -> float | None:
        """ours / upstream throughput by CPU time (> 1: ours needs less)."""
        if self.ours_cpu_s_step is None or self.upstream_cpu_s_step is None:
            return None
        return self.upstream_cpu_s_step / self.ours_cpu_s_step


@dataclass
class Check:
    stage: str
    path: str
    ours_loss: float
    upstream_loss: float
    loss_rel_diff: float
    grad_norm_rel_diff: float  # total gradient norm after backward, for information

    @property
    def ok(self) -> bool:
        return self.loss_rel_diff <= LOSS_TOLERANCE


@dataclass
class Batch:
    x: torch.Tensor  # [B, T, d_in] normalised candles (tokenizer)
    s1: torch.Tensor  # [B, T] token ids (predictor)
    s2: torch.Tensor  # [B, T]
    stamp: torch.Tensor  # [B, T, 5] minute, hour, weekday, day, month (float, as upstream's dataset)


@dataclass
class Contender:
    """One implementation of one stage: its network, optimizer and two forms of its loss."""

    name: str
    net: nn.Module
    train_loss: Callable[[], torch.Tensor]  # upstream's fine-tuning loss (training mode)
    check_loss: Callable[[], torch.Tensor]  # deterministic form for the eval-mode sanity check
    optimizer: torch.optim.Optimizer | None = None


def make_batch(preset: Preset, batch: int, window: int, seed: int, device: torch.device) -> Batch:
    """Random windows: candles N(0, 1) clipped at 5, 5-minute stamps from random starts, tokens."""
    g = torch.Generator().manual_seed(seed)
    tok, mod = preset.tokenizer_config, preset.model_config
    x = torch.randn(batch, window, tok.d_in, generator=g).clamp(-5, 5)
    start = torch.randint(0, 336 * 1440, (batch, 1), generator=g)  # minutes into a 12 x 28-day year
    t = start + torch.arange(window) * 5  # [B, T]
    day = t // 1440
    stamp = torch.stack([t % 60, (t // 60) % 24, day % 7, 1 + day % 28, 1 + (day // 28) % 12], dim=-1).float()
    s1 = torch.randint(0, 2**mod.s1_bits, (batch, window), generator=g)
    s2 = torch.randint(0, 2**mod.s2_bits, (batch, window), generator=g)
    return Batch(x.to(device), s1.to(device), s2.to(device), stamp.to(device))


def import_upstream(reference: Path) -> ModuleType:
    """Upstream's `model.kronos` from a checkout holding its `model/` package."""
    package = reference / "model"
    if not (package / "kronos.py").is_file() or not (package / "module.py").is_file():
        raise SystemExit(
            f"upstream Kronos not found: no {package / 'kronos.py'}. Pass --reference PATH, the directory "
            "that holds upstream's `model/` package (a checkout of github.com/shiyu-coder/Kronos)."
        )
    loaded = sys.modules.get("model")
    if loaded is not None and Path(str(getattr(loaded, "__file__", ""))).resolve().parent != package.resolve():
        raise SystemExit(f"a different top-level module `model` is already imported ({loaded!r})")
    saved_path = list(sys.path)
    sys.path.insert(0, str(reference))  # upstream imports itself as `model.*`
    try:
        return importlib.import_module("model.kronos")
    except ImportError as exc:
        raise SystemExit(
            f"cannot import upstream Kronos from {reference}: {exc} (it needs einops, huggingface_hub, pandas, tqdm)"
        ) from exc
    finally:
        sys.path[:] = saved_path  # upstream's modules are loaded; leave sys.path as it was


def load_same_weights(upstream_net: nn.Module, ours: nn.Module) -> None:
    """Copy our weights into upstream's network; every key must match (recomputed buffers aside)."""
    result = upstream_net.load_state_dict(ours.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not RECOMPUTED_BUFFER.search(k)]
    if missing or result.unexpected_keys:
        raise SystemExit(
            f"state dicts differ: upstream lacks {result.unexpected_keys or 'nothing'}, "
            f"ours lacks {missing or 'nothing'}"
        )


def contenders(
    stage: str, preset: Preset, upstream: ModuleType, batch: Batch, device: torch.device
) -> tuple[Contender, Contender]:
    """Our and upstream's network for `stage`, same random weights, with their losses."""
    g = torch.Generator().manual_seed(0)
    b = batch
    if stage == "tokenizer":
        ours_tok = random_init_(KronosTokenizer(preset.tokenizer_config), g)
        up_tok = upstream.KronosTokenizer(**preset.tokenizer_config.to_dict())
        load_same_weights(up_tok, ours_tok)
        ours_tok.to(device)
        up_tok.to(device)

        def upstream_tokenizer_loss() -> torch.Tensor:
            (z_pre, z), bsq_loss, _, _ = up_tok(b.x)
            return (F.mse_loss(z_pre, b.x) + F.mse_loss(z, b.x) + bsq_loss) / 2

        def ours_tokenizer_loss() -> torch.Tensor:
            return tokenizer_loss(ours_tok, b.x)["loss"]

        return (
            Contender("ours", ours_tok, ours_tokenizer_loss, ours_tokenizer_loss),
            Contender("upstream", up_tok, upstream_tokenizer_loss, upstream_tokenizer_loss),
        )

    ours_mod = random_init_(Kronos(preset.model_config), g)
    up_mod = upstream.Kronos(**preset.model_config.to_dict())
    load_same_weights(up_mod, ours_mod)
    ours_mod.to(device)
    up_mod.to(device)

    def upstream_predictor_loss(teacher_forcing: bool) -> torch.Tensor:
        targets = b.s1[:, 1:]
        s1_logits, s2_logits = up_mod(
            b.s1[:, :-1],
            b.s2[:, :-1],
            b.stamp[:, :-1],
            use_teacher_forcing=teacher_forcing,
            s1_targets=targets if teacher_forcing else None,
        )
        loss, _, _ = up_mod.head.compute_loss(s1_logits, s2_logits, targets, b.s2[:, 1:])
        return loss

    def ours_predictor_loss(teacher_forcing: bool) -> torch.Tensor:
        return predictor_loss(ours_mod, b.s1, b.s2, b.stamp, teacher_forcing=teacher_forcing)["loss"]

    return (
        Contender("ours", ours_mod, lambda: ours_predictor_loss(False), lambda: ours_predictor_loss(True)),
        Contender("upstream", up_mod, lambda: upstream_predictor_loss(False), lambda: upstream_predictor_loss(True)),
    )


def grad_norm(net: nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in net.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def sanity_check(stage: str, ours: Contender, upstream: Contender) -> Check:
    """Eval mode (no dropout), float32: loss and gradient norm of both on the same batch."""
    losses, norms = [], []
    for c in (ours, upstream):
        c.net.eval()
        loss = c.check_loss()
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(grad_norm(c.net))
        c.net.zero_grad(set_to_none=True)
    path = "eval, float32" + (", teacher forcing" if stage == "predictor" else "")
    return Check(
        stage,
        path,
        losses[0],
        losses[1],
        abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-12),
        abs(norms[0] - norms[1]) / max(abs(norms[1]), 1e-12),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(c: Contender, clip: float, autocast: Callable[[], AbstractContextManager[Any]]) -> Callable[[], None]:
    """One fine-tuning step: forward (+ loss) under autocast, backward, clip, AdamW, zero_grad."""
    assert c.optimizer is not None
    optimizer = c.optimizer
    params = [p for p in c.net.parameters() if p.requires_grad]

    def step() -> None:
        with autocast():
            loss = c.train_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed_block(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """Wall time and process CPU time (all threads) of `steps` steps, the device idle at both
    clock reads. On a shared CPU the CPU time is the steadier of the two: time slices lost
    to other processes do not count."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_stage(
    stage: str, preset: Preset, upstream: ModuleType, args: argparse.Namespace, device: torch.device
) -> tuple[Row, Check]:
    batch = make_batch(preset, args.batch, args.window, args.seed, device)
    ours, theirs = contenders(stage, preset, upstream, batch, device)
    check = sanity_check(stage, ours, theirs)
    print_check(check)
    if not check.ok:
        raise SystemExit(
            f"{stage}: the eval-mode losses differ by {check.loss_rel_diff:.1e} (relative, tolerance "
            f"{LOSS_TOLERANCE:.0e}): the two implementations do not compute the same thing; no timing"
        )

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()

    steps: dict[str, Callable[[], None]] = {}
    torch.manual_seed(args.seed)  # dropout and the s1 samples draw from the global RNG
    for c in (ours, theirs):
        c.net.train()
        c.optimizer = torch.optim.AdamW(
            c.net.parameters(), lr=LEARNING_RATE[stage], betas=BETAS, weight_decay=WEIGHT_DECAY
        )
        steps[c.name] = make_step(c, CLIP[stage], autocast)
        for _ in range(args.warmup):
            steps[c.name]()
    seconds: dict[str, list[float]] = {"ours": [], "upstream": []}
    cpu_seconds: dict[str, list[float]] = {"ours": [], "upstream": []}
    for r in range(args.repeats):
        for name in ("ours", "upstream") if r % 2 == 0 else ("upstream", "ours"):
            wall, cpu = timed_block(steps[name], args.steps, device)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    windows = args.batch * args.steps
    ours_wps = [windows / s for s in seconds["ours"]]
    up_wps = [windows / s for s in seconds["upstream"]]
    paired = [a / b for a, b in zip(ours_wps, up_wps, strict=True)]
    row = Row(
        stage,
        args.batch,
        statistics.median(ours_wps),
        statistics.median(up_wps),
        statistics.median(ours_wps) / statistics.median(up_wps),
        min(paired),
        max(paired),
        1000 * statistics.median(seconds["ours"]) / args.steps,
        1000 * statistics.median(seconds["upstream"]) / args.steps,
        statistics.median(cpu_seconds["ours"]) / args.steps if device.type == "cpu" else None,
        statistics.median(cpu_seconds["upstream"]) / args.steps if device.type == "cpu" else None,
    )
    return row, check


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark; the only place upstream's code is put on sys.path and imported."""
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise SystemExit(f"--stages: choose from {', '.join(STAGES)} (comma-separated), got {args.stages!r}")
    if min(args.batch, args.steps, args.repeats) < 1 or args.warmup < 0 or args.window < 3:
        raise SystemExit("--batch, --steps and --repeats must be >= 1, --warmup >= 0, --window >= 3")
    device = torch.device(args.device)
    if args.bf16 and device.type != "cuda":
        raise SystemExit("--bf16 is CUDA autocast: use it with --device cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    upstream = import_upstream(Path(args.reference).expanduser())
    preset = PRESETS[SHAPES[args.shape]]
    load_before = os.getloadavg()
    print(f"{preset.model_id} shape, tokenizer {preset.tokenizer_id} shape; sanity checks, then timings", flush=True)
    rows: list[Row] = []
    checks: list[Check] = []
    for stage in stages:
        row, check = bench_stage(stage, preset, upstream, args, device)
        rows.append(row)
        checks.append(check)
        gc.collect()  # the stage's networks and optimizer states go before the next stage's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_header()
    for row in rows:
        print_row(row)
    load_after = os.getloadavg()
    environment = (
        f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, batch {args.batch} x {args.window} candles, "
        f"{args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per implementation and stage, "
        f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(f"\n{environment}")
    result = {
        "settings": dict(vars(args)),
        "environment": environment,
        "rows": [asdict(r) | {"cpu_ratio": r.cpu_ratio} for r in rows],
        "checks": [asdict(c) | {"ok": c.ok} for c in checks],
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def print_check(c: Check) -> None:
    print(
        f"sanity {c.stage:<9} ({c.path}): loss ours {c.ours_loss:.6f} upstream {c.upstream_loss:.6f} "
        f"rel diff {c.loss_rel_diff:.1e} {'ok' if c.ok else 'MISMATCH'} (<= {LOSS_TOLERANCE:.0e}); "
        f"grad norm rel diff {c.grad_norm_rel_diff:.1e}",
        flush=True,
    )


def print_header() -> None:
    print(
        f"\n{'stage':<10} {'windows/step':>12} {'ours win/s':>10} {'upstream win/s':>14} {'ours/upstream':>13} "
        f"{'range':>11} {'ours ms/step':>12} {'upstream ms/step':>16} {'CPU s/step ours':>15} "
        f"{'upstream':>8} {'by CPU time':>11}",
        flush=True,
    )


def print_row(r: Row) -> None:
    cpu = (
        f"{r.ours_cpu_s_step:>15.2f} {r.upstream_cpu_s_step:>8.2f} {r.cpu_ratio:>10.2f}x"
        if r.ours_cpu_s_step is not None and r.upstream_cpu_s_step is not None and r.cpu_ratio is not None
        else f"{'-':>15} {'-':>8} {'-':>11}"
    )
    print(
        f"{r.stage:<10} {r.windows_per_step:>12} {r.ours_windows_s:>10.2f} {r.upstream_windows_s:>14.2f} "
        f"{r.ratio:>12.2f}x {f'{r.ratio_min:.2f}-{r.ratio_max:.2f}':>11} {r.ours_ms_step:>12.0f} "
        f"{r.upstream_ms_step:>16.0f} {cpu}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--batch", type=int, default=32, help="windows per step")
    parser.add_argument("--window", type=int, default=WINDOW, help="candles per window (lookback + horizon + 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per implementation (median)")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation and stage")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: tokenizer,predictor")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="Kronos preset shape")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both (CUDA only)")
    parser.add_argument("--seed", type=int, default=0, help="batch and dropout seed")
    parser.add_argument(
        "--reference",
        default=str(DEFAULT_REFERENCE),
        help="directory holding upstream Kronos's `model/` package (default: ../shared/reference/"
        "kronos-upstream next to the repository root)",
    )
    parser.add_argument("--json", help="also write the settings, rows and checks to this JSON file")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
