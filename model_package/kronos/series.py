"""What generation takes and gives: series inputs and outputs, per-row settings, checks.

Shapes: L history candles, P horizon, S sample paths, N rows (paths of all series).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sampling import path_keys
from .tokenizer import KronosTokenizer


@dataclass
class SeriesInput:
    """One series to forecast, already normalised and clipped.

    candles: [L, d_in] float32; stamps: [L + pred_len, 5] calendar fields of the history
    candles followed by the future candles (minute, hour, weekday, day, month).
    """

    candles: torch.Tensor
    stamps: torch.Tensor
    pred_len: int
    sample_count: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class SeriesOutput:
    """paths [S, pred_len, d_in] in normalised space; tokens for debugging parity."""

    paths: torch.Tensor
    input_s1: torch.Tensor  # [L] history codes
    input_s2: torch.Tensor
    window_s1: torch.Tensor  # [S, W_dec] codes the final decode ran over
    window_s2: torch.Tensor


@dataclass
class GenerationStats:
    kv_cache_bytes: int = 0  # peak bytes held by KV caches (trunk + s2 head)
    full_window_passes: int = 0  # trunk passes over a whole window (prefill or recompute)
    incremental_steps: int = 0  # trunk passes over one new position per row
    rows: int = 0  # sample-path rows generated


def require_eval(tokenizer: KronosTokenizer, model: torch.nn.Module) -> None:
    """Generation is defined in eval mode only (no dropout, full-window s2 attention)."""
    if tokenizer.training or model.training:
        raise ValueError("generation needs both networks in eval mode (call .eval() after training)")


# Called after each step with the step index; returns indices of series to abandon.
StepHook = Callable[[int], Iterable[int]]


@dataclass
class Rows:
    """Per path-row settings of a batch for the reference loop (N rows, series-major)."""

    series: torch.Tensor  # [N] int64 (cpu)
    temperature: torch.Tensor  # [N] on device
    top_k: torch.Tensor
    top_p: torch.Tensor
    keys: np.ndarray  # [N] uint64

    @classmethod
    def build(cls, series: Sequence[SeriesInput], device: torch.device) -> Rows:
        counts = torch.tensor([s.sample_count for s in series])

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).repeat_interleave(counts)

        return cls(
            series=per_row(list(range(len(series))), torch.long),
            temperature=per_row([s.temperature for s in series], torch.float32).to(device),
            top_k=per_row([s.top_k for s in series], torch.long).to(device),
            top_p=per_row([s.top_p for s in series], torch.float32).to(device),
            keys=np.concatenate([path_keys(s.seed, s.sample_count) for s in series]),
        )


def validate_series(series: Sequence[SeriesInput], d_in: int) -> None:
    for i, s in enumerate(series):
        L = s.candles.shape[0]
        if s.candles.dim() != 2 or s.candles.shape[1] != d_in:
            raise ValueError(f"series {i}: candles must be [L, {d_in}], got {tuple(s.candles.shape)}")
        if L < 1 or s.pred_len < 1 or s.sample_count < 1:
            raise ValueError(f"series {i}: need history >= 1, pred_len >= 1, sample_count >= 1")
        if tuple(s.stamps.shape) != (L + s.pred_len, 5):
            raise ValueError(
                f"series {i}: stamps must be [{L + s.pred_len}, 5] (history + horizon), got {tuple(s.stamps.shape)}"
            )


def decode_window(tokenizer: KronosTokenizer, s1: torch.Tensor, s2: torch.Tensor, pred_len: int) -> torch.Tensor:
    """Decode the final window (s1, s2) [S, W] and keep the last pred_len candles [S, P, d_in]."""
    return tokenizer.decode(s1, s2)[:, -pred_len:]
