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

Rows of a batch may have different history lengths, horizons, sample counts and sampling
settings. Tokenizer encoding, prefill and final decoding run per series, so a series gets
the same tokens whether it is generated alone or in a batch (up to float rounding in the
batched steps, far below the logit margins of greedy decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .decoding import RowLayout, SharedPrefixKV, packed_weights, shared_prefix_attention
from .layers import KVCache
from .model import Kronos
from .sampling import draw_table, path_keys, sample_tokens, uniforms
from .tokenizer import KronosTokenizer

GenerationMode = Literal["fast", "reference", "rolling"]
GENERATION_MODES: tuple[str, ...] = ("fast", "reference", "rolling")


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


# Called after each step with the step index; returns indices of series to abandon.
StepHook = Callable[[int], Iterable[int]]


@dataclass
class _Rows:
    """Per path-row settings of a batch (N rows, series-major)."""

    series: torch.Tensor  # [N] int64 (cpu)
    path: torch.Tensor  # [N] index of the row among its series' paths (cpu)
    history_len: torch.Tensor  # [N]
    pred_len: torch.Tensor  # [N]
    temperature: torch.Tensor  # [N] on device
    top_k: torch.Tensor
    top_p: torch.Tensor
    keys: np.ndarray  # [N] uint64
    top_k_cpu: torch.Tensor  # [N] host copies, for decisions that must not wait on the device
    top_p_cpu: torch.Tensor

    @classmethod
    def build(cls, series: Sequence[SeriesInput], device: torch.device) -> _Rows:
        counts = [s.sample_count for s in series]

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).repeat_interleave(torch.tensor(counts))

        top_k = per_row([s.top_k for s in series], torch.long)
        top_p = per_row([s.top_p for s in series], torch.float32)
        return cls(
            series=per_row(list(range(len(series))), torch.long),
            path=torch.cat([torch.arange(c) for c in counts]),
            history_len=per_row([s.candles.shape[0] for s in series], torch.long),
            pred_len=per_row([s.pred_len for s in series], torch.long),
            temperature=per_row([s.temperature for s in series], torch.float32).to(device),
            top_k=top_k.to(device),
            top_p=top_p.to(device),
            keys=np.concatenate([path_keys(s.seed, s.sample_count) for s in series]),
            top_k_cpu=top_k,
            top_p_cpu=top_p,
        )

    def filter_flags(self, rows: torch.Tensor) -> dict:
        """Host-side summary of the filters `rows` (cpu ids) use: max_top_k, any_top_p."""
        top_k, top_p = self.top_k_cpu[rows], self.top_p_cpu[rows]
        return {"max_top_k": int(top_k.max()) if len(rows) else 0,
                "any_top_p": bool(((top_k == 0) & (top_p < 1.0)).any())}


def validate_series(series: Sequence[SeriesInput], d_in: int) -> None:
    for i, s in enumerate(series):
        L = s.candles.shape[0]
        if s.candles.dim() != 2 or s.candles.shape[1] != d_in:
            raise ValueError(f"series {i}: candles must be [L, {d_in}], got {tuple(s.candles.shape)}")
        if L < 1 or s.pred_len < 1 or s.sample_count < 1:
            raise ValueError(f"series {i}: need history >= 1, pred_len >= 1, sample_count >= 1")
        if tuple(s.stamps.shape) != (L + s.pred_len, 5):
            raise ValueError(
                f"series {i}: stamps must be [{L + s.pred_len}, 5] (history + horizon), "
                f"got {tuple(s.stamps.shape)}"
            )


@torch.inference_mode()
def generate(tokenizer: KronosTokenizer, model: Kronos, series: Sequence[SeriesInput],
             max_context: int, mode: GenerationMode = "fast", on_step: StepHook | None = None
             ) -> tuple[list[SeriesOutput | None], GenerationStats]:
    """Sample `sample_count` future paths for every series.

    Returns one SeriesOutput per series (None for a series abandoned through `on_step`)
    and statistics about the work done.
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
    validate_series(series, tokenizer.config.d_in)
    if mode == "reference":
        return _generate_reference(tokenizer, model, series, max_context)
    return _FastGenerator(tokenizer, model, series, max_context, mode == "rolling").run(on_step)


def _decode_window(tokenizer: KronosTokenizer, s1: torch.Tensor, s2: torch.Tensor,
                   pred_len: int) -> torch.Tensor:
    """Decode the final window (s1, s2) [S, W] and keep the last pred_len candles [S, P, d_in]."""
    return tokenizer.decode(s1, s2)[:, -pred_len:]


def _generate_reference(tokenizer: KronosTokenizer, model: Kronos,
                        series: Sequence[SeriesInput], W: int
                        ) -> tuple[list[SeriesOutput | None], GenerationStats]:
    """Upstream's loop, one series at a time: full-window recompute at every step."""
    device = next(model.parameters()).device
    rows = _Rows.build(series, device)
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
        outputs.append(SeriesOutput(
            paths=_decode_window(tokenizer, s1[:, start:], s2[:, start:], P),
            input_s1=s1[0, :L], input_s2=s2[0, :L],
            window_s1=s1[:, start:], window_s2=s2[:, start:],
        ))
    return outputs, stats


@dataclass
class _Group:
    """Rows whose window keys/values are held per layer as shared prefixes plus suffixes.

    `kv` has one SharedPrefixKV per trunk layer followed by the s2 head's; `layout` tells
    the s2 head (and, in the cached group, the trunk) which keys each row sees.
    """

    rows: torch.Tensor  # [n] global row ids (cpu)
    series: list[int]  # series of each prefix slot
    layout: RowLayout
    kv: list[SharedPrefixKV]
    h_last: torch.Tensor  # [n, d]
    window_start: torch.Tensor | None = None  # [B] global column of each slot's position 0

    def __post_init__(self) -> None:
        self.device_rows = self.rows.to(self.h_last.device)

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the rows at positions `keep` [m] (cpu) of this group."""
        dev_keep = keep.to(self.h_last.device)
        self.rows = self.rows[keep]
        self.device_rows = self.rows.to(self.h_last.device)
        self.layout.keep(keep)
        for kv in self.kv:
            kv.keep_rows(dev_keep)
        self.h_last = self.h_last[dev_keep]

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in self.kv)


class _FastGenerator:
    """KV-cached generation for a batch of series (see the module docstring).

    Global columns: series b's token t sits at column Lmax - L_b + t, so the token generated
    at step k sits at column Lmax + k for every row.
    """

    def __init__(self, tokenizer: KronosTokenizer, model: Kronos,
                 series: Sequence[SeriesInput], max_context: int, rolling: bool) -> None:
        self.tokenizer, self.model, self.series = tokenizer, model, series
        self.W, self.rolling = max_context, rolling
        self.device = next(model.parameters()).device
        self.packed = packed_weights(model)
        self.rows = _Rows.build(series, self.device)
        self.row_series = self.rows.series.to(self.device)  # [N]
        steps = max(s.pred_len for s in series)
        self.draws = torch.from_numpy(draw_table(self.rows.keys, steps)).to(self.device)  # [N, P, 2]
        self.stats = GenerationStats(rows=len(self.rows.series))
        self.lengths = [s.candles.shape[0] for s in series]
        self.Lmax = max(self.lengths)
        self.Pmax = max(s.pred_len for s in series)
        B, N, C = len(series), len(self.rows.series), self.Lmax + self.Pmax
        self.tok1 = torch.zeros(N, C, dtype=torch.long, device=self.device)
        self.tok2 = torch.zeros_like(self.tok1)
        self.stamps = torch.zeros(B, C, 5, device=self.device)  # [B, C, 5]
        for b, s in enumerate(series):
            self.stamps[b, self.Lmax - self.lengths[b]: self.Lmax + s.pred_len] = s.stamps
        self.input_tokens: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- helpers ---------------------------------------------------------------------------

    def _layout(self, rows: torch.Tensor, series: list[int], **masks: torch.Tensor | None
                ) -> RowLayout:
        """Slots of `rows` in a group whose prefixes belong to `series` (in that order)."""
        slot_of_series = torch.full((len(self.series),), -1, dtype=torch.long)
        slot_of_series[torch.tensor(series)] = torch.arange(len(series))
        S = max(self.series[b].sample_count for b in series)
        slot = slot_of_series[self.rows.series[rows]] * S + self.rows.path[rows]
        return RowLayout(slot, len(series), S, self.device, **masks)

    def _embed_rows(self, dev_rows: torch.Tensor, cols: slice) -> torch.Tensor:
        """Embedding of the tokens of rows `dev_rows` (device ids) at global columns `cols`
        -> [n, T, d]."""
        return self.packed.embed(self.model, self.tok1[dev_rows, cols], self.tok2[dev_rows, cols],
                                 self.stamps[self.row_series[dev_rows], cols])

    def _history_trunk(self, series: list[int], start: int
                       ) -> tuple[torch.Tensor, list[KVCache]]:
        """Module-path causal pass over the history columns [start, Lmax) of `series`
        (one row each, same length) -> hidden [B, T, d] and the per-layer caches."""
        T = self.Lmax - start
        first_rows = torch.stack([(self.rows.series == b).nonzero()[0, 0] for b in series])
        dev_rows = first_rows.to(self.device)
        dev_series = torch.tensor(series, device=self.device)
        x = self.model.embed(self.tok1[dev_rows, start: self.Lmax], self.tok2[dev_rows, start: self.Lmax],
                             self.stamps[dev_series, start: self.Lmax])
        caches = self._new_caches(len(series), T)
        h = self.model.trunk(x, torch.arange(T, device=self.device), caches=caches)
        self.stats.full_window_passes += 1
        return h, caches

    def _new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        c = self.model.config
        dtype = next(self.model.parameters()).dtype
        return [KVCache(batch, c.n_heads, capacity, c.d_model // c.n_heads, dtype, self.device)
                for _ in range(c.n_layers)]

    # -- set-up: encode each series, prefill the cached ones --------------------------------

    def _encode(self) -> None:
        Lmax = self.Lmax
        for b, s in enumerate(self.series):
            s1, s2 = self.tokenizer.encode(s.candles.to(self.device).unsqueeze(0))  # [1, L]
            self.input_tokens.append((s1[0], s2[0]))
            row_ids = (self.rows.series == b).nonzero()[:, 0].to(self.device)
            self.tok1[row_ids, Lmax - s1.shape[1]: Lmax] = s1
            self.tok2[row_ids, Lmax - s2.shape[1]: Lmax] = s2

    def _prefill_cached(self, series: list[int]) -> _Group | None:
        """Prefill each series' first window alone; merge them as left-padded prefixes."""
        if not series:
            return None
        model, Lmax = self.model, self.Lmax
        spans = [min(self.lengths[b], self.W) for b in series]  # tokens in the first window
        Lp = max(spans)
        c0 = Lmax - Lp
        H, hd = model.config.n_heads, model.config.d_model // model.config.n_heads
        dep = model.dep_layer.cross_attn
        dtype = next(model.parameters()).dtype
        prefix = [torch.zeros(2, len(series), H, Lp, hd, dtype=dtype, device=self.device)
                  for _ in range(model.config.n_layers)]
        prefix.append(torch.zeros(2, len(series), dep.n_heads, Lp, dep.head_dim, dtype=dtype,
                                  device=self.device))
        h_last = []
        for slot, (b, E) in enumerate(zip(series, spans, strict=True)):
            h, caches = self._history_trunk([b], Lmax - E)  # [1, E, d]
            for layer, cache in enumerate(caches):
                prefix[layer][0, slot, :, Lp - E:] = cache.k[0]
                prefix[layer][1, slot, :, Lp - E:] = cache.v[0]
            dep_k, dep_v = model.dependency_keys_values(h)
            prefix[-1][0, slot, :, Lp - E:] = dep_k[0]
            prefix[-1][1, slot, :, Lp - E:] = dep_v[0]
            h_last.append(h[0, -1])
        rows = self._series_rows(series)
        window_start = torch.tensor([Lmax - E for E in spans], device=self.device)
        layout = self._layout(rows, series)
        kv = [SharedPrefixKV(p[0], p[1], len(rows), self.Pmax) for p in prefix]
        group = _Group(rows, series, layout, kv, torch.stack(h_last)[layout.series_slot], window_start)
        group.layout.prefix_mask = self._prefix_mask(group, c0, Lmax - 1)
        return group

    def _series_rows(self, series: list[int]) -> torch.Tensor:
        return torch.cat([(self.rows.series == b).nonzero()[:, 0] for b in series])

    # -- per-step advance ------------------------------------------------------------------

    def _prefix_mask(self, group: _Group, c0: int, last_col: int) -> torch.Tensor | None:
        """Visible prefix columns [B, Lp] once global column `last_col` is the newest token:
        each slot's own window start onwards and, when rolling, only the last W columns."""
        Lp = group.kv[0].prefix_k.shape[2]
        cols = torch.arange(c0, c0 + Lp, device=self.device)
        visible = cols[None, :] >= group.window_start[:, None]
        if self.rolling:
            visible &= cols[None, :] > last_col - self.W
        return None if bool(visible.all()) else visible

    def _advance_cached(self, group: _Group, col: int) -> None:
        """Feed the tokens at global column `col` through the cache; refresh h_last."""
        layout, kv = group.layout, group.kv
        c0 = self.Lmax - kv[0].prefix_k.shape[2]
        positions = (col - group.window_start[layout.series_slot])[:, None]  # [n, 1]
        if self.rolling:  # the window moves: recompute what each row still sees
            layout.prefix_mask = self._prefix_mask(group, c0, col)
            suffix_cols = torch.arange(self.Lmax, col + 1, device=self.device)
            visible = suffix_cols > col - self.W
            layout.suffix_mask = None if bool(visible.all()) else visible[None, :]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv[layer].append(k, v)
            return kv[layer].attend(q, layout)

        h = self.packed.trunk(self._embed_rows(group.device_rows, slice(col, col + 1)), positions,
                              self.model.rotary, attend)  # [n, 1, d]
        kv[-1].append(*self.packed.dependency_keys_values(h))
        group.h_last = h[:, 0]
        self.stats.incremental_steps += 1

    def _recompute_sliding(self, rows: torch.Tensor, col: int) -> _Group:
        """Exact window state for rows whose window [col + 1 - W, col] has slid.

        The history part of the window is identical for all paths of a series, so it is
        computed once per series; only the generated part is computed per path.
        """
        W, Lmax, model, packed = self.W, self.Lmax, self.model, self.packed
        series = sorted({int(b) for b in self.rows.series[rows]})
        generated = col + 1 - Lmax
        if generated and all(self.series[b].sample_count == 1 for b in series):
            return self._recompute_windows(rows, series, col)
        Lh = max(W - generated, 0)  # history tokens still in the window
        H, hd = model.config.n_heads, model.config.d_model // model.config.n_heads
        if Lh:
            h_hist, caches = self._history_trunk(series, Lmax - Lh)  # [B, Lh, d]
            prefix = [(c.k, c.v) for c in caches]
            dep_prefix = model.dependency_keys_values(h_hist)
        else:
            empty = torch.zeros(len(series), H, 0, hd, device=self.device)
            dep = model.dep_layer.cross_attn
            prefix = [(empty, empty)] * model.config.n_layers
            dep_prefix = (torch.zeros(len(series), dep.n_heads, 0, dep.head_dim, device=self.device),) * 2
        Tg = min(generated, W)
        dep_kv = SharedPrefixKV(*dep_prefix, len(rows), Tg)
        layout = self._layout(rows, series)
        if Tg:
            causal = torch.ones(Tg, Tg, dtype=torch.bool, device=self.device).tril()
            trunk_layout = RowLayout(layout.slot, layout.n_series, layout.slots_per_series,
                                     self.device, suffix_mask=causal)

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return shared_prefix_attention(q, *prefix[layer], k, v, trunk_layout)

            positions = torch.arange(Lh, W, device=self.device).expand(len(rows), -1)
            h = packed.trunk(self._embed_rows(rows.to(self.device), slice(col + 1 - Tg, col + 1)), positions,
                             model.rotary, attend)  # [n, Tg, d]
            dep_kv.append(*packed.dependency_keys_values(h))
            h_last = h[:, -1]
        else:  # the window is all history (first step of a series longer than W)
            h_last = h_hist[layout.series_slot, -1]
        self.stats.full_window_passes += 1
        return _Group(rows, series, layout, [dep_kv], h_last)

    def _recompute_windows(self, rows: torch.Tensor, series: list[int], col: int) -> _Group:
        """Sliding rows of single-path series: nothing to share, so each window ending at
        global column `col` is one causal pass of W tokens (upstream's own step)."""
        layout = self._layout(rows, series)
        dev_rows = rows.to(self.device)
        window = slice(col + 1 - self.W, col + 1)
        x = self.model.embed(self.tok1[dev_rows, window], self.tok2[dev_rows, window],
                             self.stamps[self.row_series[dev_rows], window])  # [n, W, d]
        h = self.model.trunk(x, torch.arange(self.W, device=self.device))  # [n, W, d]
        dep_k, dep_v = self.model.dependency_keys_values(h)  # [n, 4, W, hd], row order
        prefix_k, prefix_v = torch.empty_like(dep_k), torch.empty_like(dep_v)
        prefix_k[layout.device_slot], prefix_v[layout.device_slot] = dep_k, dep_v  # slot order
        self.stats.full_window_passes += 1
        return _Group(rows, series, layout, [SharedPrefixKV(prefix_k, prefix_v, len(rows), 0)], h[:, -1])

    # -- main loop -------------------------------------------------------------------------

    def _sample(self, group: _Group, step: int) -> None:
        rows, dev_rows = self.rows, group.device_rows
        settings = (rows.temperature[dev_rows], rows.top_k[dev_rows], rows.top_p[dev_rows])
        flags = rows.filter_flags(group.rows)
        draws = self.draws[dev_rows, step]  # [n, 2]
        s1 = sample_tokens(self.packed.s1_logits(group.h_last), *settings, draws[:, 0], **flags)
        dep = group.kv[-1]
        s2_logits = self.packed.s2_logits(self.model, group.h_last, s1,
                                          lambda q: dep.attend(q, group.layout))
        s2 = sample_tokens(s2_logits, *settings, draws[:, 1], **flags)
        col = self.Lmax + step
        self.tok1[dev_rows, col] = s1
        self.tok2[dev_rows, col] = s2

    def run(self, on_step: StepHook | None) -> tuple[list[SeriesOutput | None], GenerationStats]:
        self._encode()
        rows, W = self.rows, self.W
        start_cached = [b for b in range(len(self.series)) if self.rolling or self.lengths[b] <= W]
        start_sliding = [b for b in range(len(self.series)) if b not in start_cached]
        cached = self._prefill_cached(start_cached)
        sliding = (self._recompute_sliding(self._series_rows(start_sliding), self.Lmax - 1)
                   if start_sliding else None)
        abandoned: set[int] = set()
        for step in range(self.Pmax):
            col = self.Lmax + step
            for group in (cached, sliding):
                if group is not None and len(group.rows):
                    self._sample(group, step)
            self._track_memory(cached, sliding)
            if on_step is not None:
                abandoned.update(int(b) for b in on_step(step))
            sliding_rows = (sliding.rows[self._running(sliding.rows, step, abandoned)]
                            if sliding is not None else None)
            if cached is not None and len(cached.rows):
                keep = self._running(cached.rows, step, abandoned)
                if not self.rolling:  # rows whose next window slides leave the cache
                    slides = rows.history_len[cached.rows] + step + 1 > W
                    moving = cached.rows[keep & slides]
                    if len(moving):
                        sliding_rows = moving if sliding_rows is None else torch.cat((sliding_rows, moving))
                    keep &= ~slides
                if not bool(keep.all()):
                    cached.keep(keep.nonzero()[:, 0])
                if len(cached.rows):
                    self._advance_cached(cached, col)
            sliding = (self._recompute_sliding(sliding_rows, col)
                       if sliding_rows is not None and len(sliding_rows) else None)
            if (cached is None or not len(cached.rows)) and sliding is None:
                break
        return self._finish(abandoned), self.stats

    def _running(self, row_ids: torch.Tensor, step: int, abandoned: set[int]) -> torch.Tensor:
        """[n] bool: rows that still have tokens to generate after `step`."""
        alive = self.rows.pred_len[row_ids] > step + 1
        if abandoned:
            alive &= ~torch.isin(self.rows.series[row_ids], torch.tensor(sorted(abandoned)))
        return alive

    def _track_memory(self, *groups: _Group | None) -> None:
        held = sum(g.nbytes() for g in groups if g is not None)
        self.stats.kv_cache_bytes = max(self.stats.kv_cache_bytes, held)

    def _finish(self, abandoned: set[int]) -> list[SeriesOutput | None]:
        outputs: list[SeriesOutput | None] = []
        for b, s in enumerate(self.series):
            if b in abandoned:
                outputs.append(None)
                continue
            L, P = self.lengths[b], s.pred_len
            end = self.Lmax + P
            start = end - min(L + P, self.W)
            row_ids = (self.rows.series == b).nonzero()[:, 0].to(self.device)
            w1, w2 = self.tok1[row_ids, start:end], self.tok2[row_ids, start:end]
            outputs.append(SeriesOutput(
                paths=_decode_window(self.tokenizer, w1, w2, P),
                input_s1=self.input_tokens[b][0], input_s2=self.input_tokens[b][1],
                window_s1=w1, window_s2=w2,
            ))
        return outputs
