"""KV-cached generation, step by step: the "fast" (exact) and "rolling" modes.

A `Generation` tokenizes and prefills its series (`start`), then each `step_together`
call generates one token per row of every generation it is given: their rows sample in
one pass through the heads and their cached rows go through one shared trunk pass.
`Generation.admit` merges a newly started generation into a running one, which is how a
server lets new requests join a batch that is already running (continuous batching).

Shapes: n rows in a group, B prefix slots (series), H heads, hd head size, d model size,
W max_context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoding import PackedKronos, RowLayout, SharedPrefixKV, packed_weights, shared_prefix_attention
from .layers import KVCache
from .model import Kronos
from .sampling import draw_table, sample_tokens
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


@torch.inference_mode()
def step_together(runs: Sequence[Generation]) -> None:
    """One step of every unfinished generation in `runs` (all of the same model).

    The rows of all of them sample together (one pass through the heads), then their
    cached rows go through one shared trunk pass (the weights are read once for everybody;
    attention stays per generation), then each recomputes its own sliding windows.
    """
    runs = [run for run in runs if not run.done]
    if not runs:
        return
    packed, model = runs[0].packed, runs[0].model
    if any(run.model is not model for run in runs):
        raise ValueError("generations stepped together must share one model")
    _sample_together(packed, model, [(run, g) for run in runs for g in run.sampling_groups()])
    for run in runs:
        run.plan()
    moving = [run for run in runs if run.advancing]
    if moving:
        inputs = [run.cached_step_input() for run in moving]
        sizes = [s1.shape[0] for s1, *_ in inputs]
        s1, s2, stamps, positions = (_cat(parts) for parts in zip(*inputs, strict=True))

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if len(moving) == 1:
                return moving[0].cached_attend(layer, q, k, v)
            parts = zip(moving, q.split(sizes), k.split(sizes), v.split(sizes), strict=True)
            return torch.cat([run.cached_attend(layer, *qkv) for run, *qkv in parts])

        x = packed.embed(model, s1, s2, stamps)  # [n, 1, d]
        h = packed.trunk(x, positions, model.rotary, attend)  # [n, 1, d]
        for run, part in zip(moving, h.split(sizes), strict=True):
            run.cached_step_done(part)
    for run in runs:
        run.end_step()


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _sample_together(packed: PackedKronos, model: Kronos, parts: list[tuple[Generation, _Group]]) -> None:
    """Sample s1 then s2 for the rows of every (generation, group) in `parts` at once; each
    row keeps its own settings and draws, and the s2 head attends to its own group's keys."""
    if not parts:
        return
    h, temperature, top_k, top_p, draws = (
        _cat(x) for x in zip(*[run.sampling_inputs(g) for run, g in parts], strict=True)
    )
    flag_sets = [run.rows.filter_flags(g.rows) for run, g in parts]
    flags = {"max_top_k": max(f["max_top_k"] for f in flag_sets), "any_top_p": any(f["any_top_p"] for f in flag_sets)}
    settings = (temperature, top_k, top_p)
    sizes = [len(g.rows) for _, g in parts]

    def attend(q: torch.Tensor) -> torch.Tensor:  # q [n, 4, 1, hd]
        return _cat([g.kv[-1].attend(qi, g.layout) for (_, g), qi in zip(parts, q.split(sizes), strict=True)])

    s1 = sample_tokens(packed.s1_logits(h), *settings, draws[:, 0], **flags)
    s2 = sample_tokens(packed.s2_logits(model, h, s1, attend), *settings, draws[:, 1], **flags)
    for (run, g), t1, t2 in zip(parts, s1.split(sizes), s2.split(sizes), strict=True):
        run.store_tokens(g, t1, t2)


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
        self._drop_empty_slots()

    def _drop_empty_slots(self) -> None:
        """Forget the prefixes no row reads any more, once they are a quarter of them (every
        step's attention reads all prefixes)."""
        layout = self.layout
        S = layout.slots_per_series
        used = torch.unique(layout.slot // S)  # sorted, cpu
        if 4 * (layout.n_series - len(used)) < layout.n_series:
            return
        dev_used = used.to(self.h_last.device)
        for kv in self.kv:
            kv.prefix_k, kv.prefix_v = kv.prefix_k[dev_used], kv.prefix_v[dev_used]
        new_index = torch.full((layout.n_series,), -1, dtype=torch.long)
        new_index[used] = torch.arange(len(used))
        layout.slot = new_index[layout.slot // S] * S + layout.slot % S
        layout.n_series = len(used)
        if layout.prefix_mask is not None:
            layout.prefix_mask = layout.prefix_mask[dev_used]
        layout.keep(torch.arange(len(layout.slot)))
        self.series = [self.series[i] for i in used.tolist()]
        if self.window_start is not None:
            self.window_start = self.window_start[dev_used]

    def rebase(self, row_offset: int, series_offset: int, column_shift: int) -> None:
        """Renumber rows, series and columns for a merge into a generation that already has
        `row_offset` rows and `series_offset` series."""
        self.rows = self.rows + row_offset
        self.device_rows = self.device_rows + row_offset
        self.series = [b + series_offset for b in self.series]
        if self.window_start is not None:
            self.window_start = self.window_start + column_shift

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in self.kv)


def _join_groups(a: _Group | None, b: _Group | None, steps_left: int) -> _Group | None:
    """One group holding a's rows then b's (both one path per series; b's suffix is empty).

    Prefixes are left-padded to a common width; b's rows cannot see the suffix columns a
    filled before they came. The suffix gets room for `steps_left` more columns.
    """
    if b is None or not len(b.rows):
        return a
    if a is None or not len(a.rows):
        return b
    filled = a.kv[0].length
    width = max(a.kv[0].prefix_k.shape[2], b.kv[0].prefix_k.shape[2])
    device = a.h_last.device

    def visible(group: _Group) -> torch.Tensor:  # [B, width] bool
        mask = group.layout.prefix_mask
        if mask is None:
            mask = torch.ones(group.layout.n_series, group.kv[0].prefix_k.shape[2], dtype=torch.bool, device=device)
        return F.pad(mask, (width - mask.shape[1], 0), value=False)

    def left_pad(t: torch.Tensor) -> torch.Tensor:  # [B, H, Lp, hd] -> [B, H, width, hd]
        return F.pad(t, (0, 0, width - t.shape[2], 0))

    kv = []
    for kv_a, kv_b in zip(a.kv, b.kv, strict=True):
        joined = SharedPrefixKV(
            torch.cat((left_pad(kv_a.prefix_k), left_pad(kv_b.prefix_k))),
            torch.cat((left_pad(kv_a.prefix_v), left_pad(kv_b.prefix_v))),
            len(a.rows) + len(b.rows),
            filled + steps_left,
        )
        joined.suffix_k[: len(a.rows), :, :filled] = kv_a.suffix_k[:, :, :filled]
        joined.suffix_v[: len(a.rows), :, :filled] = kv_a.suffix_v[:, :, :filled]
        joined.length = filled
        kv.append(joined)
    mask = torch.cat((visible(a), visible(b)))
    suffix_from = torch.cat(
        (
            a.layout.suffix_from
            if a.layout.suffix_from is not None
            else torch.zeros(len(a.rows), dtype=torch.long, device=device),
            torch.full((len(b.rows),), filled, dtype=torch.long, device=device),
        )
    )
    layout = RowLayout(
        torch.cat((a.layout.slot, b.layout.slot + a.layout.n_series)),
        a.layout.n_series + b.layout.n_series,
        1,
        device,
        prefix_mask=None if bool(mask.all()) else mask,
        suffix_from=suffix_from if bool(suffix_from.any()) else None,
    )
    window_start = (
        torch.cat((a.window_start, b.window_start))
        if a.window_start is not None and b.window_start is not None
        else None
    )
    return _Group(
        torch.cat((a.rows, b.rows)), a.series + b.series, layout, kv, torch.cat((a.h_last, b.h_last)), window_start
    )


@dataclass(eq=False)
class Part:
    """Series [first, first + count) of a generation that joined it at step `join`, with
    their own hook; `outputs` is set (decoded) once all of them are finished."""

    first: int
    count: int
    join: int
    on_step: StepHook | None
    outputs: list[SeriesOutput | None] | None = None


# A generation takes new series only during its first steps, so its token columns and
# suffix caches stay bounded (at most this many steps + one horizon).
JOIN_WINDOW_STEPS = 128


class Generation:
    """A KV-cached ("fast" or "rolling") generation of a batch of series, run step by step.

    `start()` tokenizes and prefills; each `step_together([...])` call then generates one
    token per row; `done` turns True after the longest horizon (or when every series was
    abandoned) and `result()` decodes. Several generations of the same model step together
    (continuous batching): their cached rows share one trunk pass per step, while each keeps
    its own keys/values, columns, hook and sampling. `admit` merges a newly started
    generation into a running one (single-path, exact mode), so that their rows also share
    the attention and head calls; each admitted batch stays a `Part` with its own hook and
    is decoded as soon as it is finished (`finished_parts`).

    Global columns: series b's token t sits at column Lmax - L_b + t, so the token generated
    at step k sits at column Lmax + k for every row. A series that joins at step j keeps its
    last min(L, W) history tokens right before column Lmax + j, where its first token goes.
    """

    def __init__(
        self,
        tokenizer: KronosTokenizer,
        model: Kronos,
        series: Sequence[SeriesInput],
        max_context: int,
        rolling: bool,
        on_step: StepHook | None = None,
    ) -> None:
        require_eval(tokenizer, model)
        validate_series(series, tokenizer.config.d_in)
        self.tokenizer, self.model, self.series = tokenizer, model, list(series)
        self.W, self.rolling = max_context, rolling
        self.parts = [Part(0, len(series), 0, on_step)]
        self.series_join = [0] * len(series)  # step at which each series joined
        self.step, self.done = 0, False
        self.abandoned: set[int] = set()
        self.cached: _Group | None = None
        self.sliding: _Group | None = None
        self.sliding_next: torch.Tensor | None = None  # rows recomputed at the end of the step
        self.device = next(model.parameters()).device
        self.packed = packed_weights(model)
        self.rows = Rows.build(series, self.device)
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
            self.stamps[b, self.Lmax - self.lengths[b] : self.Lmax + s.pred_len] = s.stamps
        self.input_tokens: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- admitting a newly started generation ----------------------------------------------

    def can_admit(self, other: Generation) -> bool:
        """True when `other` (started, not stepped) can merge into this running generation:
        same model and window, exact mode, one sample path per series on both sides, and
        this generation still in its first JOIN_WINDOW_STEPS steps."""
        single = all(s.sample_count == 1 for s in [*self.series, *other.series])
        return (
            other.model is self.model
            and other.W == self.W
            and not self.rolling
            and not other.rolling
            and single
            and not self.done
            and other.step == 0
            and self.step <= JOIN_WINDOW_STEPS
        )

    @torch.inference_mode()
    def admit(self, other: Generation) -> Part:
        """Merge `other` into this generation: from the next step on, its rows sample, pass
        the trunk and attend together with these. Returns its part (with its series'
        indices here). `other` must not be used afterwards."""
        if not self.can_admit(other):
            raise ValueError("this generation cannot admit that one")
        k0, B1, N1 = self.step, len(self.series), len(self.rows.series)
        kept = max(min(L, self.W) for L in other.lengths)  # history tokens the newcomers keep
        if kept > self.Lmax + k0:
            self._grow_left(kept - (self.Lmax + k0))
        shift = self.Lmax + k0 - other.Lmax  # other's column c is column c + shift here
        horizon = max(self.Pmax, k0 + other.Pmax)
        self._grow_right(horizon)
        C = self.Lmax + horizon
        first = max(0, -shift)  # other's columns that land left of column 0 are not needed
        src = slice(first, other.tok1.shape[1])
        dst = slice(first + shift, other.tok1.shape[1] + shift)

        def placed(t: torch.Tensor) -> torch.Tensor:  # other's [x, C_other, ...] -> [x, C, ...]
            out = t.new_zeros(t.shape[0], C, *t.shape[2:])
            out[:, dst] = t[:, src]
            return out

        self.tok1 = torch.cat((self.tok1, placed(other.tok1)))
        self.tok2 = torch.cat((self.tok2, placed(other.tok2)))
        self.stamps = torch.cat((self.stamps, placed(other.stamps)))
        draws = other.draws.new_zeros(other.draws.shape[0], horizon, 2)
        draws[:, k0 : k0 + other.Pmax] = other.draws
        self.draws = torch.cat((self.draws, draws))
        self.rows = self.rows.joined(other.rows, B1, k0)
        self.row_series = self.rows.series.to(self.device)
        self.series += other.series
        self.lengths += other.lengths
        self.input_tokens += other.input_tokens
        self.series_join += [k0 + j for j in other.series_join]
        self.abandoned |= {B1 + b for b in other.abandoned}
        parts = [Part(B1 + p.first, p.count, k0 + p.join, p.on_step) for p in other.parts]
        self.parts += parts
        for group in (other.cached, other.sliding):
            if group is not None:
                group.rebase(N1, B1, shift)
        self.cached = _join_groups(self.cached, other.cached, horizon - k0)
        self.sliding = _join_groups(self.sliding, other.sliding, 0)
        self.stats.rows += other.stats.rows
        self.stats.full_window_passes += other.stats.full_window_passes
        self.stats.kv_cache_bytes = max(self.stats.kv_cache_bytes, other.stats.kv_cache_bytes)
        return parts[0]

    def _grow_left(self, pad: int) -> None:
        """Add `pad` empty columns before column 0 (every column index moves up by pad)."""
        self.tok1 = F.pad(self.tok1, (pad, 0))
        self.tok2 = F.pad(self.tok2, (pad, 0))
        self.stamps = F.pad(self.stamps, (0, 0, pad, 0))
        self.Lmax += pad
        if self.cached is not None and self.cached.window_start is not None:
            self.cached.window_start = self.cached.window_start + pad

    def _grow_right(self, horizon: int) -> None:
        """Make room for steps up to `horizon` (columns, draws)."""
        extra = horizon - self.Pmax
        if extra > 0:
            self.tok1 = F.pad(self.tok1, (0, extra))
            self.tok2 = F.pad(self.tok2, (0, extra))
            self.stamps = F.pad(self.stamps, (0, 0, 0, extra))
            self.draws = F.pad(self.draws, (0, 0, 0, extra))
            self.Pmax = horizon

    # -- helpers ---------------------------------------------------------------------------

    def _layout(self, rows: torch.Tensor, series: list[int], **masks: torch.Tensor | None) -> RowLayout:
        """Slots of `rows` in a group whose prefixes belong to `series` (in that order)."""
        slot_of_series = torch.full((len(self.series),), -1, dtype=torch.long)
        slot_of_series[torch.tensor(series)] = torch.arange(len(series))
        S = max(self.series[b].sample_count for b in series)
        slot = slot_of_series[self.rows.series[rows]] * S + self.rows.path[rows]
        return RowLayout(slot, len(series), S, self.device, **masks)

    def _embed_rows(self, dev_rows: torch.Tensor, cols: slice) -> torch.Tensor:
        """Embedding of the tokens of rows `dev_rows` (device ids) at global columns `cols`
        -> [n, T, d]."""
        return self.packed.embed(
            self.model,
            self.tok1[dev_rows, cols],
            self.tok2[dev_rows, cols],
            self.stamps[self.row_series[dev_rows], cols],
        )

    def _history_trunk(self, series: list[int], start: int) -> tuple[torch.Tensor, list[KVCache]]:
        """Module-path causal pass over the history columns [start, Lmax) of `series`
        (one row each, same length) -> hidden [B, T, d] and the per-layer caches."""
        T = self.Lmax - start
        first_rows = torch.stack([(self.rows.series == b).nonzero()[0, 0] for b in series])
        dev_rows = first_rows.to(self.device)
        dev_series = torch.tensor(series, device=self.device)
        x = self.model.embed(
            self.tok1[dev_rows, start : self.Lmax],
            self.tok2[dev_rows, start : self.Lmax],
            self.stamps[dev_series, start : self.Lmax],
        )
        caches = self._new_caches(len(series), T)
        h = self.model.trunk(x, torch.arange(T, device=self.device), caches=caches)
        self.stats.full_window_passes += 1
        return h, caches

    def _new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        c = self.model.config
        dtype = next(self.model.parameters()).dtype
        return [
            KVCache(batch, c.n_heads, capacity, c.d_model // c.n_heads, dtype, self.device) for _ in range(c.n_layers)
        ]

    # -- set-up: encode each series, prefill the cached ones --------------------------------

    def _encode(self) -> None:
        Lmax = self.Lmax
        for b, s in enumerate(self.series):
            s1, s2 = self.tokenizer.encode(s.candles.to(self.device).unsqueeze(0))  # [1, L]
            self.input_tokens.append((s1[0], s2[0]))
            row_ids = (self.rows.series == b).nonzero()[:, 0].to(self.device)
            self.tok1[row_ids, Lmax - s1.shape[1] : Lmax] = s1
            self.tok2[row_ids, Lmax - s2.shape[1] : Lmax] = s2

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
        prefix = [
            torch.zeros(2, len(series), H, Lp, hd, dtype=dtype, device=self.device)
            for _ in range(model.config.n_layers)
        ]
        prefix.append(torch.zeros(2, len(series), dep.n_heads, Lp, dep.head_dim, dtype=dtype, device=self.device))
        h_last = []
        for slot, (b, E) in enumerate(zip(series, spans, strict=True)):
            h, caches = self._history_trunk([b], Lmax - E)  # [1, E, d]
            for layer, cache in enumerate(caches):
                prefix[layer][0, slot, :, Lp - E :] = cache.k[0]
                prefix[layer][1, slot, :, Lp - E :] = cache.v[0]
            dep_k, dep_v = model.dependency_keys_values(h)
            prefix[-1][0, slot, :, Lp - E :] = dep_k[0]
            prefix[-1][1, slot, :, Lp - E :] = dep_v[0]
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
        assert group.window_start is not None  # cached groups know their windows
        visible = cols[None, :] >= group.window_start[:, None]
        if self.rolling:
            visible &= cols[None, :] > last_col - self.W
        return None if bool(visible.all()) else visible

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
            trunk_layout = RowLayout(
                layout.slot, layout.n_series, layout.slots_per_series, self.device, suffix_mask=causal
            )

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return shared_prefix_attention(q, *prefix[layer], k, v, trunk_layout)

            positions = torch.arange(Lh, W, device=self.device).expand(len(rows), -1)
            h = packed.trunk(
                self._embed_rows(rows.to(self.device), slice(col + 1 - Tg, col + 1)), positions, model.rotary, attend
            )  # [n, Tg, d]
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
        x = self.model.embed(
            self.tok1[dev_rows, window], self.tok2[dev_rows, window], self.stamps[self.row_series[dev_rows], window]
        )  # [n, W, d]
        h = self.model.trunk(x, torch.arange(self.W, device=self.device))  # [n, W, d]
        dep_k, dep_v = self.model.dependency_keys_values(h)  # [n, 4, W, hd], row order
        prefix_k, prefix_v = torch.empty_like(dep_k), torch.empty_like(dep_v)
        prefix_k[layout.device_slot], prefix_v[layout.device_slot] = dep_k, dep_v  # slot order
        self.stats.full_window_passes += 1
        return _Group(rows, series, layout, [SharedPrefixKV(prefix_k, prefix_v, len(rows), 0)], h[:, -1])

    # -- main loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self) -> None:
        """Tokenize every series, prefill the ones that fit the window, recompute the others."""
        self._encode()
        W = self.W
        start_cached = [b for b in range(len(self.series)) if self.rolling or self.lengths[b] <= W]
        start_sliding = [b for b in range(len(self.series)) if b not in start_cached]
        self.cached = self._prefill_cached(start_cached)
        self.sliding = (
            self._recompute_sliding(self._series_rows(start_sliding), self.Lmax - 1) if start_sliding else None
        )

    def sampling_groups(self) -> list[_Group]:
        """The groups whose rows sample a token this step."""
        return [g for g in (self.cached, self.sliding) if g is not None and len(g.rows)]

    def sampling_inputs(self, group: _Group) -> tuple[torch.Tensor, ...]:
        """h_last [n, d], temperature/top_k/top_p [n] and this step's draws [n, 2] of `group`."""
        rows, dev_rows = self.rows, group.device_rows
        return (
            group.h_last,
            rows.temperature[dev_rows],
            rows.top_k[dev_rows],
            rows.top_p[dev_rows],
            self.draws[dev_rows, self.step],
        )

    def store_tokens(self, group: _Group, s1: torch.Tensor, s2: torch.Tensor) -> None:
        """Write the tokens sampled for `group`'s rows [n] at this step's column."""
        col = self.Lmax + self.step
        self.tok1[group.device_rows, col] = s1
        self.tok2[group.device_rows, col] = s2

    def plan(self) -> None:
        """After sampling: ask the hook which series to drop, and decide which rows advance
        through the cache and which recompute a sliding window."""
        step, rows, W = self.step, self.rows, self.W
        self._track_memory(self.cached, self.sliding)
        for part in self.parts:
            if part.on_step is not None and part.outputs is None and step >= part.join:
                self.abandoned.update(part.first + int(b) for b in part.on_step(step - part.join))
        sliding = self.sliding
        sliding_rows = sliding.rows[self._running(sliding.rows, step)] if sliding is not None else None
        cached = self.cached
        if cached is not None and len(cached.rows):
            keep = self._running(cached.rows, step)
            if not self.rolling:  # rows whose next window slides leave the cache
                slides = rows.history_len[cached.rows] + (step - rows.join[cached.rows]) + 1 > W
                moving = cached.rows[keep & slides]
                if len(moving):
                    sliding_rows = moving if sliding_rows is None else torch.cat((sliding_rows, moving))
                keep &= ~slides
            if not bool(keep.all()):
                cached.keep(keep.nonzero()[:, 0])
        self.sliding_next = sliding_rows

    @property
    def advancing(self) -> bool:
        """True when cached rows take part in this step's shared trunk pass."""
        return self.cached is not None and len(self.cached.rows) > 0

    def cached_step_input(self) -> tuple[torch.Tensor, ...]:
        """Newest tokens s1, s2 [n, 1], their stamps [n, 1, 5] and rotary positions [n, 1]
        of the cached rows."""
        group, col = self.cached, self.Lmax + self.step
        assert group is not None
        layout = group.layout
        if self.rolling:  # the window moves: recompute what each row still sees
            c0 = self.Lmax - group.kv[0].prefix_k.shape[2]
            layout.prefix_mask = self._prefix_mask(group, c0, col)
            suffix_cols = torch.arange(self.Lmax, col + 1, device=self.device)
            visible = suffix_cols > col - self.W
            layout.suffix_mask = None if bool(visible.all()) else visible[None, :]
        assert group.window_start is not None
        positions = (col - group.window_start[layout.series_slot])[:, None]  # [n, 1]
        rows = group.device_rows
        return (
            self.tok1[rows, col : col + 1],
            self.tok2[rows, col : col + 1],
            self.stamps[self.row_series[rows], col : col + 1],
            positions,
        )

    def cached_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the cached rows' new keys/values of `layer` and attend [n, H, 1, hd]."""
        group = self.cached
        assert group is not None
        group.kv[layer].append(k, v)
        return group.kv[layer].attend(q, group.layout)

    def cached_step_done(self, h: torch.Tensor) -> None:
        """Take the cached rows' new final hidden states h [n, 1, d]."""
        group = self.cached
        assert group is not None
        group.kv[-1].append(*self.packed.dependency_keys_values(h))
        group.h_last = h[:, 0]
        self.stats.incremental_steps += 1

    def end_step(self) -> None:
        """Recompute the windows of the sliding rows and move to the next step."""
        sliding_rows = self.sliding_next
        self.sliding = (
            self._recompute_sliding(sliding_rows, self.Lmax + self.step)
            if sliding_rows is not None and len(sliding_rows)
            else None
        )
        self.step += 1
        self.done = self.step >= self.Pmax or (not self.advancing and self.sliding is None)

    @torch.inference_mode()
    def result(self) -> tuple[list[SeriesOutput | None], GenerationStats]:
        """Decode the finished generation: one output per series (None if abandoned)."""
        return [self._decode_series(b) for b in range(len(self.series))], self.stats

    @torch.inference_mode()
    def finished_parts(self) -> list[Part]:
        """Parts whose series all finished by now and were not reported yet, decoded."""
        done = []
        for part in self.parts:
            series = range(part.first, part.first + part.count)
            if part.outputs is None and all(
                b in self.abandoned or self.series_join[b] + self.series[b].pred_len <= self.step for b in series
            ):
                part.outputs = [self._decode_series(b) for b in series]
                done.append(part)
        return done

    def _running(self, row_ids: torch.Tensor, step: int) -> torch.Tensor:
        """[n] bool: rows that still have tokens to generate after `step`."""
        alive = self.rows.last_step[row_ids] > step + 1
        if self.abandoned:
            alive &= ~torch.isin(self.rows.series[row_ids], torch.tensor(sorted(self.abandoned)))
        return alive

    def _track_memory(self, *groups: _Group | None) -> None:
        held = sum(g.nbytes() for g in groups if g is not None)
        self.stats.kv_cache_bytes = max(self.stats.kv_cache_bytes, held)

    def _decode_series(self, b: int) -> SeriesOutput | None:
        """Decode series b's final window (None when it was abandoned)."""
        if b in self.abandoned:
            return None
        L, P = self.lengths[b], self.series[b].pred_len
        end = self.Lmax + self.series_join[b] + P
        start = end - min(L + P, self.W)
        row_ids = (self.rows.series == b).nonzero()[:, 0].to(self.device)
        w1, w2 = self.tok1[row_ids, start:end], self.tok2[row_ids, start:end]
        return SeriesOutput(
            paths=decode_window(self.tokenizer, w1, w2, P),
            input_s1=self.input_tokens[b][0],
            input_s2=self.input_tokens[b][1],
            window_s1=w1,
            window_s2=w2,
        )
