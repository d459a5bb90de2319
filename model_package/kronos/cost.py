"""What a generation costs before it runs: memory (bytes) and candles to generate.

A server must refuse work it cannot hold before doing any of it, so this module prices a
request from counts alone (history lengths, horizon, sample paths, the two network
shapes, the window and the generation mode) with the engine's own memory layout
(`engine.Engine`'s row pool, whose byte arithmetic is the functions below, and
`generation._generate_reference`). Each term is an upper bound of
what the engine allocates for that purpose; transient buffers of the phases that never
overlap (prefill, a step, a window recompute, decoding) count with the largest of them.

Shapes: B series, N rows (sample paths of all series), L history candles, P horizon,
W max_context, Ln trunk layers, d model size, H heads, ff feed-forward size.

    work = [SeriesWork(history_len=400, pred_len=120, sample_count=1)]
    cost = generation_cost(NetworkShape.of(tokenizer.config, model.config, 512), work, "fast")
    cost.memory_bytes, cost.candles
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import KronosConfig, TokenizerConfig

FLOAT_BYTES = 4  # float32 activations, caches and weights
INDEX_BYTES = 8  # int64 token ids
DRAW_BYTES = 8  # float64 uniforms of the draw table
# Host memory per history row of a request that a worker holds before generation starts:
# the decoded request, the pandas frame, the float32 candles and normalised copies.
INPUT_ROW_BYTES = 1024
# A lane that grows or compacts copies its caches into new tensors before the old ones are
# freed: suffix caches briefly exist twice.
SUFFIX_COPIES = 2
# Attention over a lane (`engine.grid_attention`) materialises its
# scores several times (prefix scores, row scores, the joined softmax input and its
# result). Causal passes over a whole window go through scaled_dot_product_attention,
# whose CPU and CUDA kernels never hold the [T, T] score matrix.
SLIDING_SCORE_COPIES = 4
# Allocator slack and buffers too small to model one by one: every generation's bound is
# MARGIN times the sum of its terms plus ALLOCATOR_SLACK (measured peaks were 0.38-0.93
# of the bound over two runs: `python -m model_package.bench --memory`).
MARGIN = 1.25
MIB = 1 << 20
ALLOCATOR_SLACK = 4 * MIB


@dataclass(frozen=True)
class NetworkShape:
    """The sizes that decide a generation's memory."""

    n_layers: int
    d_model: int
    n_heads: int
    ff_dim: int
    s1_vocab: int
    s2_vocab: int
    tokenizer_d_model: int
    tokenizer_ff_dim: int
    max_context: int
    cache_value_bytes: int = FLOAT_BYTES  # one value of a lane's caches (2 for bfloat16 caches)

    @classmethod
    def of(
        cls, tokenizer: TokenizerConfig, model: KronosConfig, max_context: int, cache_value_bytes: int = FLOAT_BYTES
    ) -> NetworkShape:
        """`cache_value_bytes`: the element size of the engine's lane caches
        (`precision.cache_value_bytes`)."""
        return cls(
            model.n_layers,
            model.d_model,
            model.n_heads,
            model.ff_dim,
            2**model.s1_bits,
            2**model.s2_bits,
            tokenizer.d_model,
            tokenizer.ff_dim,
            max_context,
            cache_value_bytes,
        )

    @property
    def kv_column_bytes(self) -> int:
        """Keys + values of one position of one row in float32: every trunk layer and the s2
        head (transient caches: prefills, recomputed windows)."""
        return (self.n_layers + 1) * 2 * self.d_model * FLOAT_BYTES

    @property
    def lane_column_bytes(self) -> int:
        """The same in a lane's caches, whose values take `cache_value_bytes` each."""
        return (self.n_layers + 1) * 2 * self.d_model * self.cache_value_bytes

    def block_bytes(self, rows: int, length: int) -> int:
        """Activations of one transformer block over rows x length positions: the input, its
        norm, q, k, v, their rotated and transposed copies, the attention output and the
        residual (10 x d), and the SwiGLU's gate, up, activated gate and product (4 x ff)."""
        return rows * length * (10 * self.d_model + 4 * self.ff_dim) * FLOAT_BYTES

    def score_bytes(self, rows: int, queries: int, keys: int) -> int:
        """One materialised attention score tensor [rows, H, queries, keys]."""
        return rows * self.n_heads * queries * keys * FLOAT_BYTES

    def tokenizer_pass_bytes(self, rows: int, length: int) -> int:
        """Encoder or decoder activations of the tokenizer over rows x length candles (its
        attention is a causal scaled_dot_product_attention, which holds no score matrix)."""
        per_position = 6 * self.tokenizer_d_model + 3 * self.tokenizer_ff_dim
        return rows * length * per_position * FLOAT_BYTES

    def head_bytes(self, rows: int) -> int:
        """Logits of both heads for `rows` positions, with the sort, softmax and cumulative
        sum of nucleus sampling (values and int64 indices)."""
        return rows * (self.s1_vocab + self.s2_vocab) * (3 * FLOAT_BYTES + INDEX_BYTES)


@dataclass(frozen=True)
class SeriesWork:
    """One series to generate: its history length, horizon and sample paths."""

    history_len: int
    pred_len: int
    sample_count: int = 1


@dataclass(frozen=True)
class GenerationCost:
    """Peak memory (bytes) a generation may allocate, and candles it generates
    (series x sample paths x steps)."""

    memory_bytes: int
    candles: int

    def __add__(self, other: GenerationCost) -> GenerationCost:
        return GenerationCost(self.memory_bytes + other.memory_bytes, self.candles + other.candles)

    @property
    def memory_mib(self) -> float:
        return self.memory_bytes / MIB


ZERO_COST = GenerationCost(0, 0)


def generation_cost(
    shape: NetworkShape, work: Sequence[SeriesWork], mode: str = "fast", history_rows: int | None = None
) -> GenerationCost:
    """Upper bound of the memory of generating `work` as one batch in `mode`, plus the host
    memory of a request of `history_rows` rows (default: the histories' candles)."""
    if not work:
        return ZERO_COST
    rows = history_rows if history_rows is not None else sum(w.history_len for w in work)
    candles = sum(w.sample_count * w.pred_len for w in work)
    generation = _reference_bytes(shape, work) if mode == "reference" else _cached_bytes(shape, work, mode)
    return GenerationCost(int(MARGIN * generation) + ALLOCATOR_SLACK + rows * INPUT_ROW_BYTES, candles)


# -- the row pool's layout (`engine.Engine` holds exactly these bytes) -----------------------

PREFIX_STEP = 64  # lane prefix widths are multiples of this (columns), at most W
MIN_ROW_CAPACITY = 8  # smallest row table


def pow2_at_least(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def lane_key(history_len: int, sample_count: int, max_context: int) -> tuple[int, int]:
    """(S, Wp) of the lane a series joins: its paths rounded up to a power of two, and its
    kept history min(L, W) rounded up to a multiple of PREFIX_STEP (at most W)."""
    kept = min(history_len, max_context)
    return pow2_at_least(sample_count), min(-(-kept // PREFIX_STEP) * PREFIX_STEP, max_context)


def lane_bytes(shape: NetworkShape, slots: int, paths: int, prefix_width: int, suffix_width: int) -> int:
    """A lane of `slots` prefix slots of `prefix_width` columns and slots x `paths` rows of
    `suffix_width` generated columns (every trunk layer and the s2 head), with each row's
    last hidden state and the slot/row indices."""
    rows = slots * paths
    columns = slots * prefix_width + rows * suffix_width
    return columns * shape.lane_column_bytes + rows * shape.d_model * FLOAT_BYTES + (slots + rows) * INDEX_BYTES


def row_capacity(rows: int) -> int:
    """Rows the row table allocates to hold `rows` rows."""
    return max(pow2_at_least(rows), MIN_ROW_CAPACITY)


def row_table_bytes(capacity: int, horizon: int, max_context: int) -> int:
    """The pool's row table: tokens (2 x int64) and stamps (5 x float32) over W + horizon
    columns, the draws (2 x float64 per step) and the per-row counters and settings."""
    columns = max_context + horizon
    per_row = 2 * columns * INDEX_BYTES + 5 * columns * FLOAT_BYTES + 2 * horizon * DRAW_BYTES
    return capacity * (per_row + 3 * INDEX_BYTES + 2 * FLOAT_BYTES)


def window_bytes(shape: NetworkShape, work: SeriesWork, mode: str) -> int:
    """Exact mode, a series that will slide: its recomputed windows' s2-head keys/values
    (W columns per path) and last hidden states, held from one step to the next."""
    if mode != "fast" or work.history_len + work.pred_len <= shape.max_context:
        return 0
    return work.sample_count * (2 * shape.max_context + 1) * shape.d_model * FLOAT_BYTES


def pool_bytes(shape: NetworkShape, work: Sequence[SeriesWork], mode: str) -> int:
    """What a row pool holds for `work` alone: its lanes, its row table and its windows."""
    W = shape.max_context
    lanes: dict[tuple[int, int], list[SeriesWork]] = {}
    for w in work:
        lanes.setdefault(lane_key(w.history_len, w.sample_count, W), []).append(w)
    total = sum(
        lane_bytes(shape, pow2_at_least(len(ws)), S, Wp, max(w.pred_len for w in ws)) for (S, Wp), ws in lanes.items()
    )
    rows = sum(w.sample_count for w in work)
    total += row_table_bytes(row_capacity(rows), max(w.pred_len for w in work), W)
    return total + sum(window_bytes(shape, w, mode) for w in work)


def _cached_bytes(shape: NetworkShape, work: Sequence[SeriesWork], mode: str) -> int:
    """ "fast" / "rolling": the pool's persistent bytes, a second copy of the suffix caches
    (a lane that grows or compacts copies them), plus the largest transient."""
    N = sum(w.sample_count for w in work)
    Pmax = max(w.pred_len for w in work)
    suffix_copy = (SUFFIX_COPIES - 1) * N * Pmax * shape.lane_column_bytes
    keys = {lane_key(w.history_len, w.sample_count, shape.max_context) for w in work}
    grid_rows = sum(
        pow2_at_least(sum(lane_key(w.history_len, w.sample_count, shape.max_context) == k for w in work)) * k[0]
        for k in keys
    )  # a step attends over every row slot of a lane, padding included
    window = max(Wp for _, Wp in keys)
    outputs = N * Pmax * 6 * FLOAT_BYTES * 4  # paths, denormalised copy, mean and quantiles
    transient = max(
        max(_encode_bytes(shape, w) for w in work),
        max(_prefill_bytes(shape, w) for w in work),
        _step_bytes(shape, grid_rows, window + Pmax),
        _sliding_bytes(shape, work) if mode == "fast" else 0,
        max(_decode_bytes(shape, w) for w in work),
    )
    return pool_bytes(shape, work, mode) + suffix_copy + outputs + transient


def _encode_bytes(shape: NetworkShape, w: SeriesWork) -> int:
    """The tokenizer encodes a whole history at once (its full length, not only the window)."""
    return shape.tokenizer_pass_bytes(1, w.history_len)


def _prefill_bytes(shape: NetworkShape, w: SeriesWork) -> int:
    """One series' first window through the trunk, with its per-layer caches."""
    E = min(w.history_len, shape.max_context)
    caches = E * shape.kv_column_bytes
    return shape.block_bytes(1, E) + caches


def _step_bytes(shape: NetworkShape, rows: int, keys: int) -> int:
    """One cached step: every row's new position through the trunk and both heads, its
    attention over the prefix and its own suffix."""
    return shape.block_bytes(rows, 1) + SLIDING_SCORE_COPIES * shape.score_bytes(rows, 1, keys) + shape.head_bytes(rows)


def _sliding_bytes(shape: NetworkShape, work: Sequence[SeriesWork]) -> int:
    """Exact mode: rows whose window slides recompute it every step. Single-path rows run
    one causal pass of W tokens each; multi-path rows share the window's history part and
    recompute only their generated part (at most P queries) with attention over the whole
    window, whose scores are materialised."""
    W = shape.max_context
    sliding = [w for w in work if w.history_len + w.pred_len > W]
    if not sliding:
        return 0
    single = sum(w.sample_count for w in sliding if w.sample_count == 1)
    # a series longer than the window starts with its whole first window's caches
    first_windows = sum(W * shape.kv_column_bytes for w in sliding if w.sample_count == 1 and w.history_len > W)
    total = shape.block_bytes(single, W) + first_windows
    for w in sliding:
        if w.sample_count > 1:
            queries = min(w.pred_len, W)
            total += (
                shape.block_bytes(w.sample_count, queries)
                + shape.block_bytes(1, W)
                + SLIDING_SCORE_COPIES * shape.score_bytes(w.sample_count, queries, W)
                + W * shape.kv_column_bytes
            )  # the shared history's keys/values
    rows = sum(w.sample_count for w in sliding)
    return total + 2 * rows * W * shape.d_model * FLOAT_BYTES  # s2-head keys/values of the windows


def _decode_bytes(shape: NetworkShape, w: SeriesWork) -> int:
    """A finished series' last window (all its paths) through the tokenizer's decoder."""
    window = min(w.history_len + w.pred_len, shape.max_context)
    return shape.tokenizer_pass_bytes(w.sample_count, window)


def _reference_bytes(shape: NetworkShape, work: Sequence[SeriesWork]) -> int:
    """Upstream's algorithm, one series at a time: the history replicated per path and
    encoded, then every step a whole window through the trunk and the s2 head at every
    window position."""
    W = shape.max_context
    worst = 0
    for w in work:
        S, T = w.sample_count, min(w.history_len + w.pred_len, W)
        tokens = 2 * S * (w.history_len + w.pred_len) * INDEX_BYTES
        # the window through the trunk, then at every position: the embeddings, the hidden
        # states, the s2 head's keys, values, query and norm (6 x d) and both heads' logits
        every_position = S * T * (6 * shape.d_model + shape.s1_vocab + shape.s2_vocab) * FLOAT_BYTES
        step = shape.block_bytes(S, T) + every_position + shape.head_bytes(S)
        encode = shape.tokenizer_pass_bytes(S, w.history_len)
        worst = max(worst, tokens + max(step, encode, _decode_bytes(shape, w)))
    return worst
