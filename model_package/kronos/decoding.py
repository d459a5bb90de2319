"""The fast generator's inner loop: packed weights and attention over shared prefixes.

Two facts make per-step generation cheap:

- A step evaluates one new position per row, so every weight matrix is read once to
  multiply a few vectors and the step is bound by memory bandwidth. `PackedKronos` keeps
  the weights fused (q/k/v in one matrix, w1/w3 in one) and in two layouts (`Dense`),
  using whichever CPU products read fastest for the step's row count.
- The sample paths of one series share their whole history. `SharedPrefixKV` keeps the
  history's keys/values once per series and only the generated part per path, and
  `shared_prefix_attention` reads each prefix once for all paths of its series.

Shapes: n rows (sample paths), B series, S slots per series (max paths), H heads, hd head
size, Tq query positions per row, Lp prefix keys, Ts suffix keys, d model size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from .layers import RotaryEmbedding, TransformerBlock, apply_rotary, rms_norm
from .model import Kronos

# For this many rows, out^T = W [out, in] @ x^T is the faster product on CPU (MKL reads a
# tall weight against a few columns well). Measured on the Kronos-small trunk, 2 threads:
# 2x faster at 16 rows, 1.2x at 256, slower at 1-3 rows and at 380 or more.
WEIGHT_MAJOR_ROWS = range(4, 257)


@dataclass
class Dense:
    """A (fused) linear layer kept in both layouts: weight-major [out, in] for row counts in
    WEIGHT_MAJOR_ROWS on CPU, input-major [in, out] otherwise. Same arithmetic either way
    (one dot product per output), different memory access."""

    input_major: torch.Tensor  # [in, out]
    weight_major: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]

    @classmethod
    def of(cls, *linears: torch.nn.Linear) -> Dense:
        """Stack Linear layers along their outputs."""
        weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [sum(out), in]
        biases = [lin.bias.detach() for lin in linears if lin.bias is not None]
        bias = torch.cat(biases).contiguous() if biases else None
        return cls(weight.t().contiguous(), weight.contiguous(), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        flat = x.reshape(-1, x.shape[-1])
        out_features = self.weight_major.shape[0]
        if flat.shape[0] in WEIGHT_MAJOR_ROWS and flat.device.type == "cpu":
            transposed = (
                torch.addmm(self.bias[:, None], self.weight_major, flat.t())
                if self.bias is not None
                else self.weight_major @ flat.t()
            )  # [out, rows]
            out = transposed.t().contiguous()
        elif self.bias is not None:
            out = torch.addmm(self.bias, flat, self.input_major)
        else:
            out = flat @ self.input_major
        return out.reshape(*x.shape[:-1], out_features)


@dataclass
class PackedBlock:
    norm1: torch.Tensor  # [d]
    qkv: Dense  # d -> 3d
    out: Dense  # d -> d
    norm2: torch.Tensor  # [d]
    w13: Dense  # d -> 2 ff (gate, up)
    w2: Dense  # ff -> d


@dataclass
class PackedKronos:
    """Fused copies of a Kronos model's weights for the steps (built once, reused)."""

    blocks: list[PackedBlock]
    final_norm: torch.Tensor
    fusion: Dense  # 2d -> d
    s1_head: Dense  # d -> V1
    s2_head: Dense  # d -> V2
    dep_q: Dense  # d -> d
    dep_kv: Dense  # d -> 2d
    dep_out: Dense  # d -> d
    dep_norm: torch.Tensor
    n_heads: int
    dep_heads: int
    signature: tuple

    # -- trunk ------------------------------------------------------------------------------

    def trunk(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """x [n, Tq, d] at rotary positions [n, Tq] -> final-normed hidden [n, Tq, d].

        attend(layer, q, k, v) with q/k/v [n, H, Tq, hd] (rotated) returns [n, H, Tq, hd]; it
        decides which keys (cached, shared, new) each query sees.
        """
        n, Tq, d = x.shape
        H = self.n_heads
        cos, sin = rotary.cos_sin(positions)  # [n, 1, Tq, hd]
        for i, blk in enumerate(self.blocks):
            qkv = blk.qkv(rms_norm(x, blk.norm1))  # [n, Tq, 3d]
            qkv = qkv.view(n, Tq, 3, H, d // H).permute(2, 0, 3, 1, 4)  # [3, n, H, Tq, hd]
            q, k = apply_rotary(qkv[:2], cos, sin)  # both rotated in one pass
            attended = attend(i, q, k, qkv[2])
            x = x + blk.out(attended.transpose(1, 2).reshape(n, Tq, d))
            gate, up = blk.w13(rms_norm(x, blk.norm2)).chunk(2, dim=-1)  # [n, Tq, ff] each
            x = x + blk.w2(F.silu(gate) * up)
        return rms_norm(x, self.final_norm)

    def embed(self, model: Kronos, s1: torch.Tensor, s2: torch.Tensor, stamp: torch.Tensor) -> torch.Tensor:
        """(s1, s2) [n, T], stamp [n, T, 5] -> [n, T, d] (same sum as Kronos.embed)."""
        emb = model.embedding
        scale = emb.d_model**0.5
        both = torch.cat((emb.emb_s1(s1) * scale, emb.emb_s2(s2) * scale), dim=-1)
        return self.fusion(both) + model.time_emb(stamp)

    # -- heads ------------------------------------------------------------------------------

    def s1_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, d] -> [n, V1]."""
        return self.s1_head(h)

    def dependency_keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [n, T, d] -> s2-head keys, values [n, 4, T, d/4]."""
        n, T, d = h.shape
        kv = self.dep_kv(h).view(n, T, 2, self.dep_heads, d // self.dep_heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return k, v

    def s2_logits(
        self, model: Kronos, h_last: torch.Tensor, s1: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """h_last [n, d], chosen s1 [n] -> [n, V2]; attend(q [n, 4, 1, hd]) -> [n, 4, 1, hd]
        runs the cross-attention over the row's window keys."""
        n, d = h_last.shape
        query = model.embedding.emb_s1(s1)  # [n, d] raw embedding row
        q = self.dep_q(query).view(n, self.dep_heads, 1, d // self.dep_heads)
        attended = self.dep_out(attend(q).reshape(n, d))  # [n, d]
        return self.s2_head(rms_norm(h_last + attended, self.dep_norm))


def packed_weights(model: Kronos) -> PackedKronos:
    """The packed copy of `model`'s weights, rebuilt whenever a parameter changed or moved."""
    signature = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get("_packed_weights")
    if cached is not None and cached.signature == signature:
        return cached
    with torch.no_grad():
        blocks = []
        for block in cast("list[TransformerBlock]", list(model.transformer)):
            attn, ffn = block.self_attn, block.ffn
            blocks.append(
                PackedBlock(
                    block.norm1.weight.detach(),
                    Dense.of(attn.q_proj, attn.k_proj, attn.v_proj),
                    Dense.of(attn.out_proj),
                    block.norm2.weight.detach(),
                    Dense.of(ffn.w1, ffn.w3),
                    Dense.of(ffn.w2),
                )
            )
        cross = model.dep_layer.cross_attn
        packed = PackedKronos(
            blocks,
            model.norm.weight.detach(),
            Dense.of(model.embedding.fusion_proj),
            Dense.of(model.head.proj_s1),
            Dense.of(model.head.proj_s2),
            Dense.of(cross.q_proj),
            Dense.of(cross.k_proj, cross.v_proj),
            Dense.of(cross.out_proj),
            model.dep_layer.norm.weight.detach(),
            n_heads=model.config.n_heads,
            dep_heads=cross.n_heads,
            signature=signature,
        )
    model.__dict__["_packed_weights"] = packed
    return packed


@dataclass
class RowLayout:
    """Where each row's shared prefix is: row r belongs to prefix slot[r] // S, path slot
    slot[r] % S. `prefix_mask` [B, Lp] and `suffix_mask` [Tq, Ts] (True = visible) hide
    padding, out-of-window or future keys; None means all visible. `suffix_from` [n]
    (device) hides each row's suffix columns before that index (a row that joined a running
    generation has no keys in the columns filled before it came).

    `slot` lives on the CPU (bookkeeping never waits for the device); `device_slot` is its
    copy on the compute device.
    """

    slot: torch.Tensor  # [n] int64, cpu
    n_series: int
    slots_per_series: int
    device: torch.device
    prefix_mask: torch.Tensor | None = None
    suffix_mask: torch.Tensor | None = None
    suffix_from: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.keep(torch.arange(len(self.slot)))

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the rows at positions `keep` [m] (cpu)."""
        self.slot = self.slot[keep]
        self.device_slot = self.slot.to(self.device)
        if self.suffix_from is not None:
            self.suffix_from = self.suffix_from[keep.to(self.device)]
        self.one_row_per_series = self.slots_per_series == 1 and torch.equal(self.slot, torch.arange(self.n_series))

    @property
    def series_slot(self) -> torch.Tensor:
        """[n] prefix index of each row, on the device."""
        return self.device_slot // self.slots_per_series


def _to_slots(rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """[n, H, Tq, X] per row -> [B, H, S*Tq, X] per prefix (empty slots are zero)."""
    n, H, Tq, X = rows.shape
    B, S = layout.n_series, layout.slots_per_series
    if layout.one_row_per_series:
        return rows
    grid = rows.new_zeros(B * S, H, Tq, X)
    grid[layout.device_slot] = rows
    return grid.view(B, S, H, Tq, X).transpose(1, 2).reshape(B, H, S * Tq, X)


def _from_slots(grid: torch.Tensor, layout: RowLayout, Tq: int) -> torch.Tensor:
    """Inverse of _to_slots: [B, H, S*Tq, X] -> [n, H, Tq, X]."""
    if layout.one_row_per_series:
        return grid
    B, H, _, X = grid.shape
    S = layout.slots_per_series
    return grid.view(B, H, S, Tq, X).transpose(1, 2).reshape(B * S, H, Tq, X)[layout.device_slot]


def shared_prefix_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    layout: RowLayout,
) -> torch.Tensor:
    """Softmax attention of q [n, H, Tq, hd] over the row's prefix keys (prefix_k/v
    [B, H, Lp, hd], shared by the rows of one series) followed by its own suffix keys
    (suffix_k/v [n, H, Ts, hd]) -> [n, H, Tq, hd]. One softmax spans both parts."""
    Tq, hd = q.shape[2], q.shape[3]
    Lp = prefix_k.shape[2]
    scale = hd**-0.5
    prefix_scores = _to_slots(q, layout) @ prefix_k.transpose(-1, -2) * scale  # [B, H, S*Tq, Lp]
    if layout.prefix_mask is not None:
        prefix_scores = prefix_scores.masked_fill(~layout.prefix_mask[:, None, None, :], float("-inf"))
    suffix_scores = q @ suffix_k.transpose(-1, -2) * scale  # [n, H, Tq, Ts]
    if layout.suffix_mask is not None:
        suffix_scores = suffix_scores.masked_fill(~layout.suffix_mask, float("-inf"))
    if layout.suffix_from is not None:
        columns = torch.arange(suffix_k.shape[2], device=q.device)
        hidden = columns[None, :] < layout.suffix_from[:, None]  # [n, Ts]
        suffix_scores = suffix_scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    scores = torch.cat((_from_slots(prefix_scores, layout, Tq), suffix_scores), dim=-1)
    probs = scores.softmax(dim=-1)  # [n, H, Tq, Lp + Ts]
    prefix_probs, suffix_probs = probs.split((Lp, probs.shape[-1] - Lp), dim=-1)
    from_prefix = _from_slots(_to_slots(prefix_probs, layout) @ prefix_v, layout, Tq)
    return from_prefix + suffix_probs @ suffix_v


class SharedPrefixKV:
    """One attention layer's keys/values: prefix [B, H, Lp, hd] per series, suffix
    [n, H, capacity, hd] per row with `length` columns filled."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor, rows: int, capacity: int) -> None:
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        B, H, _, hd = prefix_k.shape
        self.suffix_k = prefix_k.new_zeros(rows, H, capacity, hd)
        self.suffix_v = torch.zeros_like(self.suffix_k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, H, T, hd] -> written after the filled suffix columns."""
        end = self.length + k.shape[2]
        self.suffix_k[:, :, self.length : end] = k
        self.suffix_v[:, :, self.length : end] = v
        self.length = end

    def attend(self, q: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        return shared_prefix_attention(
            q,
            self.prefix_k,
            self.prefix_v,
            self.suffix_k[:, :, : self.length],
            self.suffix_v[:, :, : self.length],
            layout,
        )

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.suffix_k = self.suffix_k.index_select(0, rows)
        self.suffix_v = self.suffix_v.index_select(0, rows)

    def nbytes(self) -> int:
        tensors = (self.prefix_k, self.prefix_v, self.suffix_k, self.suffix_v)
        return sum(t.numel() * t.element_size() for t in tensors)
