"""Autoregressive generation of candle sequences from normalised histories.

Three modes, all producing the same kind of result:

- "reference": upstream's algorithm literally: the history is replicated per sample path
  and tokenized, then every step recomputes the whole context window from scratch and
  evaluates the s2 head over every window position. Kept for tests and benchmarks.
- "fast" (default, exact): the history is tokenized and the trunk prefilled once per series,
  the KV cache is copied to the sample paths, and each step runs one new position per row.
  Rows whose window starts to slide (history + generated > max_context) switch to a full
  recompute of their window, which keeps results identical to the reference.
- "rolling" (opt-in, approximate): like "fast", but sliding rows keep their cache and just
  stop attending to keys that left the window. Hidden states of the older positions were
  computed with context the reference no longer sees, so results deviate once the window
  slides (the benchmark reports by how much).

Fast and rolling generations run in the row pool of `engine.Engine`: here one call adds its
series to a pool of its own and steps until they are done; a server keeps one pool per
model and adds requests while others generate (continuous batching).

Rows of a batch may have different history lengths, horizons, sample counts and sampling
settings. Tokenizer encoding, prefill and final decoding run per series, so a series gets
the same tokens whether it is generated alone or in a batch (up to float rounding in the
batched steps, far below the logit margins of greedy decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import Engine
from .model import Kronos
from .sampling import sample_tokens, uniforms
from .series import (
    GenerationStats,
    Rows,
    SeriesInput,
    SeriesOutput,
    StepHook,
    decode_window,
    require_eval,
    validate_series,
)
from .tokenizer import KronosTokenizer

GENERATION_MODES: tuple[str, ...] = ("fast", "reference", "rolling")


@torch.inference_mode()
def generate(
    tokenizer: KronosTokenizer,
    model: Kronos,
    series: Sequence[SeriesInput],
    max_context: int,
    mode: str = "fast",  # one of GENERATION_MODES
    on_step: StepHook | None = None,
) -> tuple[list[SeriesOutput | None], GenerationStats]:
    """Sample `sample_count` future paths for every series.

    Returns one SeriesOutput per series (None for a series abandoned through `on_step`)
    and statistics about the work done.
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
    validate_series(series, tokenizer.config.d_in)
    if mode == "reference":
        require_eval(tokenizer, model)  # the engine checks it for the fast modes
        return _generate_reference(tokenizer, model, series, max_context)
    engine = Engine(tokenizer, model, max_context, rolling=mode == "rolling")
    admission = engine.add(series, on_step)
    while admission.outputs is None:
        engine.step()
    return admission.outputs, engine.stats


def _generate_reference(
    tokenizer: KronosTokenizer, model: Kronos, series: Sequence[SeriesInput], W: int
) -> tuple[list[SeriesOutput | None], GenerationStats]:
    """Upstream's loop, one series at a time: full-window recompute at every step."""
    device = next(model.parameters()).device
    rows = Rows.build(series, device)
    stats = GenerationStats(rows=len(rows.series))
    outputs: list[SeriesOutput | None] = []
    for b, s in enumerate(series):
        S, L, P = s.sample_count, s.candles.shape[0], s.pred_len
        row_ids = (rows.series == b).nonzero()[:, 0]  # [S]
        x = s.candles.to(device).unsqueeze(0).repeat(S, 1, 1)  # [S, L, d_in]
        stamps = s.stamps.to(device)  # [L + P, 5]
        s1, s2 = tokenizer.encode(x)  # [S, L] each
        for i in range(P):
            cur = L + i
            start = max(0, cur - W)
            window_stamp = stamps[start:cur].unsqueeze(0).expand(S, -1, -1)  # [S, T, 5]
            logits, h = model.decode_s1(s1[:, start:cur], s2[:, start:cur], window_stamp)
            settings = (rows.temperature[row_ids], rows.top_k[row_ids], rows.top_p[row_ids])
            keys = rows.keys[row_ids.numpy()]
            next_s1 = sample_tokens(logits[:, -1], *settings, uniforms(keys, i, 0))  # [S]
            s2_logits = model.decode_s2(h, next_s1[:, None])[:, -1]  # [S, V2]
            next_s2 = sample_tokens(s2_logits, *settings, uniforms(keys, i, 1))
            s1 = torch.cat((s1, next_s1[:, None]), dim=1)
            s2 = torch.cat((s2, next_s2[:, None]), dim=1)
            stats.full_window_passes += 1
        start = max(0, L + P - W)
        outputs.append(
            SeriesOutput(
                paths=decode_window(tokenizer, s1[:, start:], s2[:, start:], P),
                input_s1=s1[0, :L],
                input_s2=s2[0, :L],
                window_s1=s1[:, start:],
                window_s2=s2[:, start:],
            )
        )
    return outputs, stats
