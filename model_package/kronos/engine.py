"""The generation engine: one pool of rows in which every KV-cached generation runs.

A row is one sample path of one series. Rows join the pool after their series' prefill and
leave it at a step boundary when they are finished or abandoned; a server adds requests
while others are generating (continuous batching) and every request is its own
`Admission`, answered as soon as its rows are done. There is one scheduling rule: a new
admission joins when the pool has room for it (`Engine.can_take`, bytes of the pool's own
layout against `budget_bytes`).

Life of a series (all its paths move together):

    add()   tokenize the whole history; prefill its last Lk = min(L, W) tokens alone (the
            module path, as upstream; int8: the int8 layers); its rows join a lane, whose
            prefix slot keeps those keys/values once for all the series' paths.
    step()  1. every row of the pool samples s1 then s2 (one pass through the heads);
            2. hooks may abandon series; finished and abandoned rows leave (slots free at
               once); in exact mode ("fast") a row whose window would slide past W leaves
               its lane for the sliding set;
            3. the rows in lanes take one trunk pass together (one new position per row);
            4. the sliding rows' windows are recomputed in full, batched (exact mode);
            5. admissions whose series are all done are decoded.

In "rolling" mode nothing slides: rows stay in their lane and stop attending to keys
older than W (approximate once the window is full, see `generation`).

Lanes: a lane holds the series with the same path bucket S (the sample count rounded up
to a power of two) and the same prefix width Wp (Lk rounded up to a multiple of 64, at most
W), so that padding wastes at most 63 prefix columns and attention over a lane is one call
per layer: a fused `scaled_dot_product_attention` over each row's joint prefix + suffix in
one-path lanes (S = 1), `grid_attention` (the prefix read once for a slot's S paths)
otherwise. Row r = b * S + p of a lane is path p of prefix slot b. A lane's caches are in
the engine's cache dtype (`precision.cache_dtype`: the model's, or bfloat16 for int8 on a
CPU with native bfloat16), and its attention runs in it.

Token columns: a row's tokens live in the pool's row table, width W + Pcap, with its kept
history right-aligned to column W: history token i (of Lk) at column W - Lk + i and
generated token g at column W + g. With g tokens generated, the window of the last W
tokens is columns [g, W + g).

Shapes and counts: n rows in a call; R = B * S row slots of a lane, B prefix slots, S paths
per slot; H heads, hd head size (trunk layers and the s2 head, which has 4 heads of d/4);
Wp prefix columns, Ts suffix columns (generated keys, one per step); Tq query positions;
d model size; W max_context; L history candles of a series, Lk = min(L, W) of them kept,
g tokens generated so far, P horizon (pred_len); Rcap, Pcap the row table's row and
horizon capacities; C columns per head of a cache tensor (Wp + Ts joint, or Ts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cost import (
    NetworkShape,
    SeriesWork,
    lane_bytes,
    lane_key,
    pow2_at_least,
    row_capacity,
    row_table_bytes,
    window_bytes,
)
from .decoding import PackedKronos, packed_weights
from .host_memory import reuse_freed_memory
from .layers import KVCache
from .model import Kronos
from .precision import cache_dtype, model_precision
from .sampling import draw_table, path_keys, sample_tokens
from .series import (
    GenerationStats,
    SeriesInput,
    SeriesOutput,
    StepHook,
    decode_window,
    require_eval,
    validate_series,
)
from .tokenizer import KronosTokenizer


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat of `parts` along dim 0; a single part as it is (no copy, no operator)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _split(x: torch.Tensor, sizes: list[int]) -> Sequence[torch.Tensor]:
    """x split along dim 0 into parts of `sizes`; x itself when there is one part."""
    return (x,) if len(sizes) == 1 else x.split(sizes)


# -- attention over a lane's grid ------------------------------------------------------------


def grid_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor | None,
    suffix_v: torch.Tensor | None,
    visible: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of q [R, H, Tq, hd] (R = B * S rows in grid order) over each row's
    prefix slot (prefix_k/v [B, H, Wp, hd], read once for the slot's S rows) followed by
    its own suffix (suffix_k/v [R, H, Ts, hd], or None) -> [R, H, Tq, hd].

    visible [R, Tq, Wp + Ts] (True = the key is seen; None = all) hides padding, empty
    columns, out-of-window and future keys. One softmax spans both parts.
    """
    R, H, Tq, hd = q.shape
    B, Wp = prefix_k.shape[0], prefix_k.shape[2]
    S = R // B
    scale = hd**-0.5
    q_slots = q.view(B, S, H, Tq, hd).transpose(1, 2).reshape(B, H, S * Tq, hd)
    prefix_scores = q_slots @ prefix_k.transpose(-1, -2) * scale  # [B, H, S*Tq, Wp]
    scores = prefix_scores.view(B, H, S, Tq, Wp).transpose(1, 2).reshape(R, H, Tq, Wp)
    if suffix_k is not None:
        scores = torch.cat((scores, q @ suffix_k.transpose(-1, -2) * scale), dim=-1)  # [R, H, Tq, Wp+Ts]
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    prefix_probs = probs[..., :Wp].reshape(B, S, H, Tq, Wp).transpose(1, 2).reshape(B, H, S * Tq, Wp)
    out = (prefix_probs @ prefix_v).view(B, H, S, Tq, hd).transpose(1, 2).reshape(R, H, Tq, hd)
    if suffix_v is not None:
        out = out + probs[..., Wp:] @ suffix_v
    return out


# -- the pool's row table --------------------------------------------------------------------


def _work(s: SeriesInput) -> SeriesWork:
    return SeriesWork(int(s.candles.shape[0]), s.pred_len, s.sample_count)


class RowTable:
    """Per-row tokens, calendar stamps, draws and sampling settings of the pool, by row id.

    tok1/tok2 [Rcap, W + Pcap] int64, stamps [Rcap, W + Pcap, 5], draws [Rcap, Pcap, 2]
    float64, kept/generated [Rcap] int64, settings [Rcap]. Ids are reused once freed.
    """

    def __init__(self, W: int, device: torch.device) -> None:
        self.W, self.device = W, device
        self.capacity, self.horizon = 0, 0
        self.free: list[int] = []
        self._allocate(0, 0)

    def _allocate(self, capacity: int, horizon: int) -> None:
        dev, C = self.device, self.W + horizon
        self.tok1 = torch.zeros(capacity, C, dtype=torch.long, device=dev)
        self.tok2 = torch.zeros(capacity, C, dtype=torch.long, device=dev)
        self.stamps = torch.zeros(capacity, C, 5, device=dev)
        self.draws = torch.zeros(capacity, horizon, 2, dtype=torch.float64, device=dev)
        self.kept = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.generated = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.temperature = torch.ones(capacity, device=dev)
        self.top_k = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.top_p = torch.ones(capacity, device=dev)

    def held_bytes(self) -> int:
        """Bytes of its layout (`cost.row_table_bytes`)."""
        return row_table_bytes(self.capacity, self.horizon, self.W)

    def allocated_bytes(self) -> int:
        """Bytes of its tensors (<= held_bytes)."""
        return _tensor_bytes(
            self.tok1, self.tok2, self.stamps, self.draws, self.kept, self.generated,
            self.temperature, self.top_k, self.top_p,
        )  # fmt: skip

    def grown(self, rows: int, horizon: int) -> tuple[int, int]:
        """(capacity, horizon) after taking `rows` more rows of horizon up to `horizon`."""
        capacity = self.capacity
        need = rows - len(self.free)
        if need > 0:
            capacity = row_capacity(self.capacity + need)
        return capacity, max(self.horizon, horizon)

    def take(self, rows: int, horizon: int) -> list[int]:
        """`rows` free row ids (the table grows when needed)."""
        capacity, new_horizon = self.grown(rows, horizon)
        if (capacity, new_horizon) != (self.capacity, self.horizon):
            old = (self.tok1, self.tok2, self.stamps, self.draws, self.kept, self.generated)
            old_settings = (self.temperature, self.top_k, self.top_p)
            n, C = self.capacity, self.W + self.horizon
            self._allocate(capacity, new_horizon)
            self.tok1[:n, :C], self.tok2[:n, :C], self.stamps[:n, :C] = old[0], old[1], old[2]
            self.draws[:n, : self.horizon] = old[3]
            self.kept[:n], self.generated[:n] = old[4], old[5]
            self.temperature[:n], self.top_k[:n], self.top_p[:n] = old_settings
            self.free += list(range(self.capacity, capacity))
            self.capacity, self.horizon = capacity, new_horizon
        ids, self.free = self.free[:rows], self.free[rows:]
        return ids

    def release(self, ids: list[int]) -> None:
        self.free += ids


# -- a series in the pool ---------------------------------------------------------------------


@dataclass(eq=False)
class SeriesState:
    """One series' place in the pool; its `paths` rows have ids `row_ids` in the row table."""

    input: SeriesInput
    row_ids: list[int]
    rows: torch.Tensor  # [S] row ids on the device
    history_len: int  # L
    kept: int  # Lk = min(L, W) history tokens in the row table
    input_s1: torch.Tensor  # [L] history codes
    input_s2: torch.Tensor
    generated: int = 0
    lane: Lane | None = None
    slot: int = -1
    sliding: bool = False
    abandoned: bool = False
    done: bool = False

    @property
    def paths(self) -> int:
        return self.input.sample_count

    @property
    def pred_len(self) -> int:
        return self.input.pred_len


@dataclass(eq=False)
class Admission:
    """Series added together, with one hook; `outputs` (one per series, None when
    abandoned) is set once all of them are done."""

    series: list[SeriesState]
    on_step: StepHook | None
    stats: GenerationStats
    steps: int = 0  # steps taken since it joined
    outputs: list[SeriesOutput | None] | None = None

    @property
    def done(self) -> bool:
        return self.outputs is not None


# -- lanes: KV-cached rows ---------------------------------------------------------------------


@dataclass
class KeyView:
    """What a lane's rows attend over in one phase of a step: visible [R, 1, Wp' + Ts']
    over its first Wp' prefix and Ts' suffix columns; for the fused attention of a one-path
    lane also as an additive mask [R, 1, 1, Wp' + Ts'] (0 seen, -inf hidden: what
    `scaled_dot_product_attention` would make of the boolean mask at every call)."""

    visible: torch.Tensor
    prefix_width: int
    suffix_width: int
    additive: torch.Tensor | None = None


class Lane:
    """KV-cached rows of series with up to S paths and a prefix of at most Wp columns.

    Per layer (the trunk's, then the s2 head's): prefix_k/v [B, H, Wp, hd] (history keys,
    left-aligned; slot b holds prefix_len[b] columns, 0 when free) and suffix_k/v
    [R, H, Ts, hd] (generated keys; row r holds as many as its row generated).
    """

    def __init__(
        self,
        S: int,
        Wp: int,
        shape: NetworkShape,
        heads: list[tuple[int, int]],
        dtype: torch.dtype,
        dev: torch.device,
        kv_dtype: torch.dtype,
    ) -> None:
        """dtype: the hidden states'; kv_dtype: the caches' (`precision.cache_dtype`);
        attention runs in kv_dtype."""
        self.S, self.Wp, self.shape, self.heads, self.dtype, self.device = S, Wp, shape, heads, dtype, dev
        self.kv_dtype = kv_dtype
        self.d = shape.d_model
        self.B, self.Ts = 0, 0
        self.slots: list[SeriesState | None] = []
        self._allocate(0, 0)
        self.prefix_len = torch.zeros(0, dtype=torch.long, device=dev)  # [B]
        self.row_id = torch.zeros(0, dtype=torch.long, device=dev)  # [R] row table id (0 when free)
        self.h_last = torch.zeros(0, self.d, dtype=dtype, device=dev)  # [R, d]
        self.live: torch.Tensor = torch.zeros(0, dtype=torch.long, device=dev)  # [n] live grid rows
        self.live_ids: torch.Tensor = self.live
        self.full = False  # every grid row is live
        # The view of the last trunk pass: the rows' next draws see the same keys (the newest
        # included, no count changed since), unless a series joined or left (refresh).
        self.carried_view: KeyView | None = None

    def _allocate(self, B: int, Ts: int) -> None:
        """Zeroed caches for B slots and Ts suffix columns. A one-path lane (S = 1) keeps
        each layer's prefix and suffix as the two halves of one joint [B, H, Wp + Ts, hd]
        tensor, so that a step attends over both with one fused attention call."""
        dtype, dev = self.kv_dtype, self.device
        self.joint_k: list[torch.Tensor] = []
        self.joint_v: list[torch.Tensor] = []
        self.prefix_k: list[torch.Tensor] = []
        self.prefix_v: list[torch.Tensor] = []
        self.suffix_k: list[torch.Tensor] = []
        self.suffix_v: list[torch.Tensor] = []
        for H, hd in self.heads:
            if self.S == 1:
                for joint, prefix, suffix in (
                    (self.joint_k, self.prefix_k, self.suffix_k),
                    (self.joint_v, self.prefix_v, self.suffix_v),
                ):
                    joint.append(torch.zeros(B, H, self.Wp + Ts, hd, dtype=dtype, device=dev))
                    prefix.append(joint[-1][:, :, : self.Wp])
                    suffix.append(joint[-1][:, :, self.Wp :])
            else:
                for prefix, suffix in ((self.prefix_k, self.suffix_k), (self.prefix_v, self.suffix_v)):
                    prefix.append(torch.zeros(B, H, self.Wp, hd, dtype=dtype, device=dev))
                    suffix.append(torch.zeros(B * self.S, H, Ts, hd, dtype=dtype, device=dev))

    # -- bytes ----------------------------------------------------------------------------

    def bytes_for(self, B: int, Ts: int) -> int:
        """Bytes of its layout with B slots and Ts suffix columns (`cost.lane_bytes`)."""
        return lane_bytes(self.shape, B, self.S, self.Wp, Ts)

    def held_bytes(self) -> int:
        return self.bytes_for(self.B, self.Ts)

    def allocated_bytes(self) -> int:
        """Bytes of its tensors (<= held_bytes)."""
        caches = [*self.prefix_k, *self.prefix_v, *self.suffix_k, *self.suffix_v]
        return _tensor_bytes(*caches, self.prefix_len, self.row_id, self.h_last)

    def grown(self, new_series: int, pred_len: int) -> tuple[int, int]:
        """(B, Ts) after `new_series` more series of horizon up to `pred_len` join."""
        free = sum(s is None for s in self.slots)
        B = self.B if new_series <= free else pow2_at_least(self.B - free + new_series)
        return B, max(self.Ts, pred_len)

    @property
    def n_series(self) -> int:
        return sum(s is not None for s in self.slots)

    # -- joining and leaving --------------------------------------------------------------

    def _resize(self, B: int, Ts: int, keep: list[int]) -> None:
        """New capacity (B slots, Ts suffix columns) holding the slots `keep` in order."""
        S, dev = self.S, self.device
        slot_idx = torch.tensor(keep, dtype=torch.long, device=dev)
        row_idx = (slot_idx[:, None] * S + torch.arange(S, device=dev)).reshape(-1)
        n, cols = len(keep), min(self.Ts, Ts)

        def moved(t: torch.Tensor, rows: int, index: torch.Tensor) -> torch.Tensor:
            """t's entries `index` (dim 0) at the front of a zeroed tensor of `rows` entries."""
            out = t.new_zeros(rows, *t.shape[1:])
            out[: len(index)] = t.index_select(0, index)
            return out

        old_caches = (self.prefix_k, self.prefix_v, self.suffix_k, self.suffix_v)
        self._allocate(B, Ts)
        for new, old in zip(self.prefix_k + self.prefix_v, old_caches[0] + old_caches[1], strict=True):
            new[:n] = old.index_select(0, slot_idx)
        for new, old in zip(self.suffix_k + self.suffix_v, old_caches[2] + old_caches[3], strict=True):
            new[: len(row_idx), :, :cols] = old.index_select(0, row_idx)[:, :, :cols]
        self.prefix_len = moved(self.prefix_len, B, slot_idx)
        self.row_id = moved(self.row_id, B * S, row_idx)
        self.h_last = moved(self.h_last, B * S, row_idx)
        slots = [self.slots[b] for b in keep]
        for b, state in enumerate(slots):
            if state is not None:
                state.slot = b
        self.slots = slots + [None] * (B - n)
        self.B, self.Ts = B, Ts

    def join(self, state: SeriesState, prefix: list[tuple[torch.Tensor, torch.Tensor]], h_last: torch.Tensor) -> None:
        """Place a prefilled series: prefix[i] = keys, values [H, Lk, hd] of layer i, h_last [d]."""
        B, Ts = self.grown(1, state.pred_len)
        if (B, Ts) != (self.B, self.Ts):
            self._resize(B, Ts, list(range(self.B)))
        b = self.slots.index(None)
        Lk, S = state.kept, self.S
        for i, (k, v) in enumerate(prefix):
            self.prefix_k[i][b].zero_()
            self.prefix_v[i][b].zero_()
            self.prefix_k[i][b, :, :Lk] = k
            self.prefix_v[i][b, :, :Lk] = v
        self.prefix_len[b] = Lk
        rows = slice(b * S, b * S + state.paths)
        self.row_id[b * S : (b + 1) * S] = 0
        self.row_id[rows] = state.rows
        self.h_last[rows] = h_last
        self.slots[b] = state
        state.lane, state.slot = self, b
        self.refresh()

    def leave(self, state: SeriesState) -> None:
        """Free the series' slot; compact when a quarter or less of the slots is in use."""
        self.slots[state.slot] = None
        self.prefix_len[state.slot] = 0
        state.lane, state.slot = None, -1
        used = [b for b, s in enumerate(self.slots) if s is not None]
        if used and 4 * len(used) <= self.B:
            Ts = max(s.pred_len for s in self.slots if s is not None)
            self._resize(pow2_at_least(len(used)), Ts, used)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the live grid rows [n] and their row ids (after joins and leaves)."""
        live = [b * self.S + p for b, s in enumerate(self.slots) if s is not None for p in range(s.paths)]
        self.full = len(live) == self.B * self.S
        self.live = torch.tensor(live, dtype=torch.long, device=self.device)
        self.live_ids = self.row_id[self.live]
        self.carried_view = None

    # -- attention ------------------------------------------------------------------------

    def visible(self, table: RowTable, W: int, rolling: bool) -> KeyView:
        """The keys each row sees, given the row table's generated counts g: its slot's Lk
        prefix columns and its first g suffix columns; rolling: only the last W positions
        up to the newest (position Lk + g - 1). Only the columns some live row uses are
        read (the widest live prefix, the most generated)."""
        live = [s for s in self.slots if s is not None]
        prefix_width = self.Wp if self.S == 1 else max(s.kept for s in live)  # joint: the whole prefix
        suffix_width = min(max(s.generated for s in live), self.Ts)
        g = table.generated[self.row_id]  # [R] (free rows read row 0: masked out anyway)
        Lk = self.prefix_len.repeat_interleave(self.S)  # [R]
        prefix_cols = torch.arange(prefix_width, device=self.device)
        suffix_cols = torch.arange(suffix_width, device=self.device)
        prefix = prefix_cols[None, :] < Lk[:, None]  # [R, prefix_width]
        suffix = suffix_cols[None, :] < g[:, None]  # [R, suffix_width]
        if rolling:
            oldest = Lk + g - W  # positions <= this are out of the window
            prefix &= prefix_cols[None, :] > oldest[:, None]
            suffix &= (Lk[:, None] + suffix_cols[None, :]) > oldest[:, None]
        visible = torch.cat((prefix, suffix), dim=1)[:, None]  # [R, 1, keys]
        if self.S > 1:
            return KeyView(visible, prefix_width, suffix_width)
        additive = torch.zeros(visible.shape, dtype=self.kv_dtype, device=self.device)
        additive.masked_fill_(~visible, -torch.inf)
        return KeyView(visible, prefix_width, suffix_width, additive[:, None])

    def attend(self, layer: int, q: torch.Tensor, view: KeyView) -> torch.Tensor:
        """q [n, H, 1, hd] of the live rows -> their attention output [n, H, 1, hd] (in q's
        dtype; computed in the caches')."""
        q_dtype, q = q.dtype, q.to(self.kv_dtype)
        if self.full:
            q_grid = q
        else:
            q_grid = q.new_zeros(self.B * self.S, *q.shape[1:])
            q_grid[self.live] = q
        Wp, Ts = view.prefix_width, view.suffix_width
        if self.S == 1:  # one fused call over the joint prefix + suffix columns
            keys = Wp + Ts
            k, v = self.joint_k[layer][:, :, :keys], self.joint_v[layer][:, :, :keys]  # [R, H, keys, hd]
            out = F.scaled_dot_product_attention(q_grid, k, v, attn_mask=view.additive)
        else:
            out = grid_attention(
                q_grid,
                self.prefix_k[layer][:, :, :Wp],
                self.prefix_v[layer][:, :, :Wp],
                self.suffix_k[layer][:, :, :Ts] if Ts else None,
                self.suffix_v[layer][:, :, :Ts] if Ts else None,
                view.visible,
            )
        return (out if self.full else out[self.live]).to(q_dtype)

    def cache_rows(self, columns: torch.Tensor) -> dict[int, torch.Tensor]:
        """Where `write` puts the live rows' keys of suffix column `columns` [n]: for each head
        count H, the rows [n * H] (row-major over (live row, head)) of a layer's cache seen as
        [R * H * C, hd], C its columns per head (Wp + Ts in a one-path lane's joint tensor,
        Ts in a suffix tensor). Computed once a step for all layers."""
        width, offset = (self.Wp + self.Ts, self.Wp) if self.S == 1 else (self.Ts, 0)
        rows = {}
        for H in {H for H, _ in self.heads}:
            heads = torch.arange(H, device=self.device)
            rows[H] = ((self.live[:, None] * H + heads) * width + offset + columns[:, None]).reshape(-1)
        return rows

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: dict[int, torch.Tensor]) -> None:
        """k, v [n, H, 1, hd] of the live rows into their suffix column (`cache_rows`; index_put_
        on one flat index: faster than index_copy_ in a step at every row count measured)."""
        H, hd = self.heads[layer]
        keys, values = (self.joint_k, self.joint_v) if self.S == 1 else (self.suffix_k, self.suffix_v)
        keys[layer].view(-1, hd).index_put_((rows[H],), k.reshape(-1, hd).to(self.kv_dtype))
        values[layer].view(-1, hd).index_put_((rows[H],), v.reshape(-1, hd).to(self.kv_dtype))


@dataclass
class Window:
    """Rows whose window was recomputed in full this step (exact mode): their final hidden
    state and s2-head keys/values, prefix [B, 4, Wp, hd] per slot and suffix [R, 4, Ts, hd]
    per row (None when each row has its own prefix)."""

    row_ids: torch.Tensor  # [R] row table ids, grid order
    h_last: torch.Tensor  # [R, d]
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    suffix_k: torch.Tensor | None = None
    suffix_v: torch.Tensor | None = None

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        return grid_attention(q, self.prefix_k, self.prefix_v, self.suffix_k, self.suffix_v, None)

    def allocated_bytes(self) -> int:
        return _tensor_bytes(self.h_last, self.prefix_k, self.prefix_v, self.suffix_k, self.suffix_v)


# -- the engine -----------------------------------------------------------------------------


@dataclass
class _Group:
    """Rows that sample together this step: row ids [n], h_last [n, d] and where their
    s2-head keys are (a lane, with the columns each row sees, or windows recomputed last
    step, which every row sees whole)."""

    row_ids: torch.Tensor
    h_last: torch.Tensor
    keys: Lane | Window
    view: KeyView | None = None  # a lane's visible columns

    def attend_s2(self, q: torch.Tensor) -> torch.Tensor:
        """The s2 head's cross-attention: q [n, 4, 1, hd] -> [n, 4, 1, hd]."""
        if isinstance(self.keys, Window):
            return self.keys.attend(q)
        assert self.view is not None
        return self.keys.attend(len(self.keys.heads) - 1, q, self.view)


@dataclass
class Engine:
    """The row pool of one model, window W and mode. `add` series, `step` until the
    admissions you hold are `done`; `budget_bytes` (None: unbounded) caps the pool's held
    memory, checked by `can_take` before `add`."""

    tokenizer: KronosTokenizer
    model: Kronos
    max_context: int
    rolling: bool = False
    budget_bytes: int | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self) -> None:
        require_eval(self.tokenizer, self.model)
        self.W = self.max_context
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.kv_dtype = cache_dtype(model_precision(self.model), self.device)  # the lanes' caches
        if self.device.type == "cpu":
            reuse_freed_memory()  # large per-step tensors reuse their pages (host_memory)
        c = self.model.config
        dep = self.model.dep_layer.cross_attn
        self.heads = [(c.n_heads, c.d_model // c.n_heads)] * c.n_layers + [(dep.n_heads, dep.head_dim)]
        self.shape = NetworkShape.of(self.tokenizer.config, c, self.W, self.kv_dtype.itemsize)
        self.packed: PackedKronos = packed_weights(self.model)
        self.table = RowTable(self.W, self.device)
        self.lanes: dict[tuple[int, int], Lane] = {}
        self.series: list[SeriesState] = []  # running (in a lane or sliding)
        self.windows: list[Window] = []
        self.admissions: list[Admission] = []

    # -- room ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.admissions

    def _lane_key(self, s: SeriesInput) -> tuple[int, int]:
        return lane_key(int(s.candles.shape[0]), s.sample_count, self.W)

    def _window_reserve(self, s: SeriesInput) -> int:
        return window_bytes(self.shape, _work(s), "rolling" if self.rolling else "fast")

    def held_bytes(self) -> int:
        """Memory the pool holds by its layout: row table, lanes, and the windows of every
        series that will slide (reserved from the start). The budget is checked on this."""
        lanes = sum(lane.held_bytes() for lane in self.lanes.values())
        return self.table.held_bytes() + lanes + sum(self._window_reserve(s.input) for s in self.series)

    def allocated_bytes(self) -> int:
        """Bytes of the pool's tensors right now (<= held_bytes)."""
        lanes = sum(lane.allocated_bytes() for lane in self.lanes.values())
        return self.table.allocated_bytes() + lanes + sum(w.allocated_bytes() for w in self.windows)

    def bytes_after(self, series: Sequence[SeriesInput]) -> int:
        """held_bytes() once `series` joined (before any of them leaves)."""
        if not series:
            return self.held_bytes()
        rows = sum(s.sample_count for s in series)
        capacity, horizon = self.table.grown(rows, max(s.pred_len for s in series))
        total = row_table_bytes(capacity, horizon, self.W)
        by_lane: dict[tuple[int, int], list[SeriesInput]] = {}
        for s in series:
            by_lane.setdefault(self._lane_key(s), []).append(s)
        for key, lane in self.lanes.items():
            if key not in by_lane:
                total += lane.held_bytes()
        for (S, Wp), joining in by_lane.items():
            existing, horizon = self.lanes.get((S, Wp)), max(s.pred_len for s in joining)
            if existing is None:  # a new lane, sized like Lane.grown sizes an empty one
                total += lane_bytes(self.shape, pow2_at_least(len(joining)), S, Wp, horizon)
            else:
                total += existing.bytes_for(*existing.grown(len(joining), horizon))
        reserve = sum(self._window_reserve(s.input) for s in self.series)
        return total + reserve + sum(self._window_reserve(s) for s in series)

    def can_take(self, series: Sequence[SeriesInput]) -> bool:
        """True when `series` fit the budget now; an empty pool takes anything."""
        return self.budget_bytes is None or self.idle or self.bytes_after(series) <= self.budget_bytes

    def _new_lane(self, key: tuple[int, int]) -> Lane:
        return Lane(key[0], key[1], self.shape, self.heads, self.dtype, self.device, self.kv_dtype)

    # -- adding series --------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, series: Sequence[SeriesInput], on_step: StepHook | None = None) -> Admission:
        """Tokenize and prefill `series`; their rows sample from the next step on."""
        validate_series(series, self.tokenizer.config.d_in)
        states: list[SeriesState] = []
        try:
            for s in series:
                states.append(self._place(s))
                self._prefill(states[-1])
        except BaseException:  # leave the pool as it was
            for state in states:
                if state.lane is not None:
                    self._leave_lane(state)
                self.table.release(state.row_ids)
            raise
        self.series += states
        self.stats.rows += sum(s.paths for s in states)
        admission = Admission(states, on_step, self.stats)
        self.admissions.append(admission)
        self._track_memory()
        return admission

    def _place(self, s: SeriesInput) -> SeriesState:
        """Tokenize the history and write the series' rows into the row table."""
        W, t = self.W, self.table
        s1, s2 = self.tokenizer.encode(s.candles.to(self.device).unsqueeze(0))  # [1, L] each
        L, P = s1.shape[1], s.pred_len
        Lk = min(L, W)
        row_ids = t.take(s.sample_count, P)
        rows = torch.tensor(row_ids, dtype=torch.long, device=self.device)
        t.tok1[rows, W - Lk : W] = s1[0, L - Lk :]
        t.tok2[rows, W - Lk : W] = s2[0, L - Lk :]
        t.tok1[rows, W:], t.tok2[rows, W:] = 0, 0
        t.stamps[rows, W - Lk : W + P] = s.stamps[L - Lk :].to(self.device)
        draws = torch.from_numpy(draw_table(path_keys(s.seed, s.sample_count), P))  # [S, P, 2]
        t.draws[rows, :P] = draws.to(self.device)
        t.kept[rows], t.generated[rows] = Lk, 0
        t.temperature[rows], t.top_k[rows], t.top_p[rows] = s.temperature, s.top_k, s.top_p
        return SeriesState(s, row_ids, rows, L, Lk, s1[0], s2[0])

    def _prefill(self, state: SeriesState) -> None:
        """The series' kept history through the trunk alone (`_causal_pass`); its rows join
        their lane."""
        W, Lk = self.W, state.kept
        first = state.rows[:1]
        cols = slice(W - Lk, W)
        caches = [KVCache(1, H, Lk, hd, self.kv_dtype, self.device) for H, hd in self.heads[:-1]]
        h, dep_k, dep_v = self._causal_pass(first, cols, caches)  # [1, Lk, d], [1, 4, Lk, hd]
        prefix = [(c.k[0], c.v[0]) for c in caches] + [(dep_k[0], dep_v[0])]
        key = self._lane_key(state.input)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = self._new_lane(key)
        lane.join(state, prefix, h[0, -1])
        self.stats.full_window_passes += 1

    def _causal_pass(
        self, rows: torch.Tensor, cols: torch.Tensor | slice, caches: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A causal pass over the row table's tokens [rows, cols] (rows [n] or [n, 1], cols a
        slice or [n, T]) from rotary position 0 -> hidden h [n, T, d] and s2-head keys/values
        [n, 4, T, hd]; `caches` (one per trunk layer) receive the trunk's keys/values.

        float32 and half precisions take the model's module path (upstream's arithmetic, so
        the float32 parity holds); int8 takes the packed int8 layers, whose products are
        the bulk of a long pass (a prefill or an exact window recompute)."""
        t, model, packed = self.table, self.model, self.packed
        tok1, tok2, stamps = t.tok1[rows, cols], t.tok2[rows, cols], t.stamps[rows, cols]  # [n, T], [n, T, 5]
        T = tok1.shape[-1]
        positions = torch.arange(T, device=self.device)
        if packed.precision != "int8":
            h = model.trunk(model.embed(tok1, tok2, stamps), positions, caches=caches)
            return h, *model.dependency_keys_values(h)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if caches is not None:
                caches[layer].append(k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        x = packed.embed(model, tok1, tok2, stamps)  # [n, T, d]
        h = packed.trunk(x, positions.expand(x.shape[0], T), model.rotary, attend)
        return h, *packed.dependency_keys_values(h)

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Admission]:
        """One token for every row of the pool; returns the admissions finished by it."""
        running = list(self.series)
        if running:
            self._sample(running)
            for state in running:
                state.generated += 1
            self._plan(running)
            self._advance_lanes()
            self._recompute_windows()
        return self._finish()

    def _groups(self) -> list[_Group]:
        t, W = self.table, self.W
        groups = [
            _Group(
                lane.live_ids,
                lane.h_last if lane.full else lane.h_last[lane.live],
                lane,
                lane.carried_view or lane.visible(t, W, self.rolling),
            )
            for lane in self.lanes.values()
            if len(lane.live)
        ]
        return groups + [_Group(w.row_ids, w.h_last, w) for w in self.windows]

    def _sample(self, running: list[SeriesState]) -> None:
        """s1 then s2 for every row (each with its own settings and draws), written into
        the row table at its next column."""
        t, packed, model = self.table, self.packed, self.model
        groups = self._groups()
        ids = _joined([g.row_ids for g in groups])  # [n]
        h = _joined([g.h_last for g in groups])  # [n, d]
        sizes = [len(g.row_ids) for g in groups]

        def attend(q: torch.Tensor) -> torch.Tensor:  # q [n, 4, 1, hd]
            return _joined([g.attend_s2(qi) for g, qi in zip(groups, _split(q, sizes), strict=True)])

        generated = t.generated[ids]  # [n]
        settings = (t.temperature[ids], t.top_k[ids], t.top_p[ids])
        draws = t.draws[ids, generated]  # [n, 2]
        max_top_k = max(s.input.top_k for s in running)  # host-side filter summary: no device sync
        any_top_p = any(s.input.top_k == 0 and s.input.top_p < 1.0 for s in running)
        filters = (max_top_k, any_top_p, all(s.input.top_k == 1 for s in running))
        s1 = sample_tokens(packed.s1_logits(h), *settings, draws[:, 0], *filters)
        s2 = sample_tokens(packed.s2_logits(model, h, s1, attend), *settings, draws[:, 1], *filters)
        t.tok1[ids, self.W + generated] = s1
        t.tok2[ids, self.W + generated] = s2
        t.generated[ids] = generated + 1

    def _plan(self, running: list[SeriesState]) -> None:
        """Ask the hooks which series to drop; retire finished and dropped series; in exact
        mode move series whose next window slides out of their lane."""
        for admission in self.admissions:
            if admission.on_step is not None:
                for i in admission.on_step(admission.steps):
                    admission.series[int(i)].abandoned = True
            admission.steps += 1
        for state in running:
            if state.abandoned or state.generated >= state.pred_len:
                self._retire(state)
            elif not self.rolling and state.lane is not None and state.history_len + state.generated > self.W:
                self._leave_lane(state)
                state.sliding = True

    def _leave_lane(self, state: SeriesState) -> None:
        lane = state.lane
        assert lane is not None
        lane.leave(state)
        if lane.n_series == 0:
            self.lanes = {k: v for k, v in self.lanes.items() if v is not lane}

    def _retire(self, state: SeriesState) -> None:
        if state.lane is not None:
            self._leave_lane(state)
        state.sliding, state.done = False, True
        self.series.remove(state)

    def _advance_lanes(self) -> None:
        """The newest token of every lane row through the trunk, one pass for all lanes."""
        lanes = [lane for lane in self.lanes.values() if len(lane.live)]
        if not lanes:
            return
        t, W = self.table, self.W
        ids = _joined([lane.live_ids for lane in lanes])  # [n]
        sizes = [len(lane.live) for lane in lanes]
        generated = t.generated[ids]  # [n], the newest token is number generated - 1
        newest = (W + generated - 1)[:, None]  # [n, 1] column
        # rows of each lane's caches that take the newest keys (suffix column generated - 1)
        rows = [lane.cache_rows(cols) for lane, cols in zip(lanes, _split(generated - 1, sizes), strict=True)]
        positions = t.kept[ids][:, None] + generated[:, None] - 1  # [n, 1]
        visible = [lane.visible(t, W, self.rolling) for lane in lanes]
        for lane, view in zip(lanes, visible, strict=True):
            lane.carried_view = view

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs = []
            for lane, qi, ki, vi, where, vis in zip(
                lanes, _split(q, sizes), _split(k, sizes), _split(v, sizes), rows, visible, strict=True
            ):
                lane.write(layer, ki, vi, where)
                outs.append(lane.attend(layer, qi, vis))
            return _joined(outs)

        x = self.packed.embed(
            self.model, t.tok1[ids[:, None], newest], t.tok2[ids[:, None], newest], t.stamps[ids[:, None], newest]
        )  # [n, 1, d]
        h = self.packed.trunk(x, positions, self.model.rotary, attend)  # [n, 1, d]
        dep_k, dep_v = self.packed.dependency_keys_values(h)  # [n, 4, 1, hd]
        dep = len(self.heads) - 1
        parts = zip(lanes, _split(h, sizes), _split(dep_k, sizes), _split(dep_v, sizes), rows, strict=True)
        for lane, hi, ki, vi, where in parts:
            lane.write(dep, ki, vi, where)
            lane.h_last[lane.live] = hi[:, 0]
        self.stats.incremental_steps += 1

    def _recompute_windows(self) -> None:
        """Exact mode: the full window of every sliding row, ending at its newest token.
        One-path series go through one causal pass together (upstream's own step); the
        paths of a multi-path series share the window's history part, computed once."""
        sliding = [s for s in self.series if s.sliding]
        self.windows = []
        single = [s for s in sliding if s.paths == 1]
        if single:
            ids = torch.cat([s.rows for s in single])  # [n]
            self.windows.append(self._full_windows(ids))
        for state in sliding:
            if state.paths > 1:
                self.windows.append(self._shared_history_window(state))
        if sliding:
            self.stats.full_window_passes += 1
            self._track_memory()

    def _window_columns(self, ids: torch.Tensor, width: int) -> torch.Tensor:
        """[n, width] row table columns of the last `width` tokens of each row."""
        end = self.W + self.table.generated[ids]  # [n] one past the newest column
        return end[:, None] - width + torch.arange(width, device=self.device)

    def _full_windows(self, ids: torch.Tensor) -> Window:
        cols = self._window_columns(ids, self.W)  # [n, W]
        h, dep_k, dep_v = self._causal_pass(ids[:, None], cols)  # [n, W, d], [n, 4, W, hd]
        return Window(ids, h[:, -1], dep_k, dep_v)

    def _shared_history_window(self, state: SeriesState) -> Window:
        """Window of a multi-path series: Lh history tokens (shared, `_causal_pass`) then
        Tg = W - Lh generated tokens per path (packed path over the shared keys)."""
        t, W, model, packed = self.table, self.W, self.model, self.packed
        Tg = min(state.generated, W)
        Lh = W - Tg
        ids = state.rows  # [S]
        S = len(ids)
        if Lh:
            hist = slice(W + state.generated - W, W)
            caches = [KVCache(1, H, Lh, hd, self.dtype, self.device) for H, hd in self.heads[:-1]]
            _, dep_k, dep_v = self._causal_pass(ids[:1], hist, caches)  # [1, 4, Lh, hd] each
            dep_prefix = (dep_k, dep_v)
            prefix = [(c.k, c.v) for c in caches]
        else:
            prefix = [
                (torch.zeros(1, H, 0, hd, dtype=self.dtype, device=self.device),) * 2 for H, hd in self.heads[:-1]
            ]
            H, hd = self.heads[-1]
            dep_prefix = (torch.zeros(1, H, 0, hd, dtype=self.dtype, device=self.device),) * 2
        causal = torch.ones(Tg, Tg, dtype=torch.bool, device=self.device).tril()  # [Tq, Ts]
        visible = torch.cat((torch.ones(Tg, Lh, dtype=torch.bool, device=self.device), causal), dim=1)
        visible = visible.expand(S, Tg, Lh + Tg)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return grid_attention(q, *prefix[layer], k, v, visible)

        cols = self._window_columns(ids, Tg)  # [S, Tg]
        rows = ids[:, None]
        x = packed.embed(model, t.tok1[rows, cols], t.tok2[rows, cols], t.stamps[rows, cols])  # [S, Tg, d]
        positions = torch.arange(Lh, W, device=self.device).expand(S, -1)
        h = packed.trunk(x, positions, model.rotary, attend)  # [S, Tg, d]
        dep_k, dep_v = packed.dependency_keys_values(h)  # [S, 4, Tg, hd]
        return Window(ids, h[:, -1], dep_prefix[0], dep_prefix[1], dep_k, dep_v)

    # -- finishing ------------------------------------------------------------------------

    def _finish(self) -> list[Admission]:
        """Decode the admissions whose series are all done and free their rows."""
        finished = [a for a in self.admissions if all(s.done for s in a.series)]
        for admission in finished:
            admission.outputs = [self._decode(s) for s in admission.series]
            for state in admission.series:
                self.table.release(state.row_ids)
        self.admissions = [a for a in self.admissions if a.outputs is None]
        return finished

    def _decode(self, state: SeriesState) -> SeriesOutput | None:
        """The series' final window (all its paths) through the tokenizer's decoder."""
        if state.abandoned:
            return None
        P = state.pred_len
        width = min(state.history_len + P, self.W)
        t = self.table
        cols = slice(self.W + P - width, self.W + P)
        w1, w2 = t.tok1[state.rows, cols], t.tok2[state.rows, cols]
        return SeriesOutput(decode_window(self.tokenizer, w1, w2, P), state.input_s1, state.input_s2, w1, w2)

    def _track_memory(self) -> None:
        self.stats.kv_cache_bytes = max(self.stats.kv_cache_bytes, self.allocated_bytes())
