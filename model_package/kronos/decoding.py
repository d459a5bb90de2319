"""The fast generator's inner loop: packed weights and attention over shared prefixes.

Two facts make per-step generation cheap:

- A step evaluates one new position per row, so every weight matrix is read once to
  multiply a few vectors and the step is bound by memory bandwidth. `PackedKronos` keeps
  the weights as fused, input-major copies ([in, out]: q/k/v in one matrix, w1/w3 in one),
  the layout that vector-matrix products read fastest.
- The sample paths of one series share their whole history. `SharedPrefixKV` keeps the
  history's keys/values once per series and only the generated part per path, and
  `shared_prefix_attention` reads each prefix once for all paths of its series.

Shapes: n rows (sample paths), B series, S slots per series (max paths), H heads, hd head
size, Tq query positions per row, Lp prefix keys, Ts suffix keys, d model size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import apply_rotary, rms_norm
from .model import Kronos


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight [in, out] (+ bias [out]) -> [..., out]."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


def _input_major(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack Linear layers along their outputs: weight [in, sum(out)], bias [sum(out)]."""
    weight = torch.cat([lin.weight for lin in linears], dim=0).t().contiguous()
    biases = [lin.bias for lin in linears]
    bias = torch.cat(biases).contiguous() if biases[0] is not None else None
    return weight, bias


@dataclass
class PackedBlock:
    norm1: torch.Tensor  # [d]
    qkv_w: torch.Tensor  # [d, 3d]
    qkv_b: torch.Tensor  # [3d]
    out_w: torch.Tensor  # [d, d]
    out_b: torch.Tensor  # [d]
    norm2: torch.Tensor  # [d]
    w13: torch.Tensor  # [d, 2 ff]
    w2: torch.Tensor  # [ff, d]


@dataclass
class PackedKronos:
    """Input-major copies of a Kronos model's weights (built once, reused every step)."""

    blocks: list[PackedBlock]
    final_norm: torch.Tensor
    fusion_w: torch.Tensor  # [2d, d]
    fusion_b: torch.Tensor
    s1_w: torch.Tensor  # [d, V1]
    s1_b: torch.Tensor
    s2_w: torch.Tensor  # [d, V2]
    s2_b: torch.Tensor
    dep_q_w: torch.Tensor  # [d, d]
    dep_q_b: torch.Tensor
    dep_kv_w: torch.Tensor  # [d, 2d]
    dep_kv_b: torch.Tensor
    dep_out_w: torch.Tensor  # [d, d]
    dep_out_b: torch.Tensor
    dep_norm: torch.Tensor
    n_heads: int
    dep_heads: int
    signature: tuple

    # -- trunk ------------------------------------------------------------------------------

    def trunk(self, x: torch.Tensor, positions: torch.Tensor, rotary: torch.nn.Module,
              attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        """x [n, Tq, d] at rotary positions [n, Tq] -> final-normed hidden [n, Tq, d].

        attend(layer, q, k, v) with q/k/v [n, H, Tq, hd] (rotated) returns [n, H, Tq, hd]; it
        decides which keys (cached, shared, new) each query sees.
        """
        n, Tq, d = x.shape
        H = self.n_heads
        cos, sin = rotary.cos_sin(positions)  # [n, 1, Tq, hd]
        for i, blk in enumerate(self.blocks):
            qkv = affine(rms_norm(x, blk.norm1), blk.qkv_w, blk.qkv_b)  # [n, Tq, 3d]
            qkv = qkv.view(n, Tq, 3, H, d // H).permute(2, 0, 3, 1, 4)  # [3, n, H, Tq, hd]
            q, k = apply_rotary(qkv[:2], cos, sin)  # both rotated in one pass
            attended = attend(i, q, k, qkv[2])
            x = x + affine(attended.transpose(1, 2).reshape(n, Tq, d), blk.out_w, blk.out_b)
            gate_up = affine(rms_norm(x, blk.norm2), blk.w13, None)  # [n, Tq, 2 ff]
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + affine(F.silu(gate) * up, blk.w2, None)
        return rms_norm(x, self.final_norm)

    def embed(self, model: Kronos, s1: torch.Tensor, s2: torch.Tensor, stamp: torch.Tensor
              ) -> torch.Tensor:
        """(s1, s2) [n, T], stamp [n, T, 5] -> [n, T, d] (same sum as Kronos.embed)."""
        emb = model.embedding
        scale = emb.d_model**0.5
        both = torch.cat((emb.emb_s1(s1) * scale, emb.emb_s2(s2) * scale), dim=-1)
        return affine(both, self.fusion_w, self.fusion_b) + model.time_emb(stamp)

    # -- heads ------------------------------------------------------------------------------

    def s1_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, d] -> [n, V1]."""
        return affine(h, self.s1_w, self.s1_b)

    def dependency_keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [n, T, d] -> s2-head keys, values [n, 4, T, d/4]."""
        n, T, d = h.shape
        kv = affine(h, self.dep_kv_w, self.dep_kv_b).view(n, T, 2, self.dep_heads, d // self.dep_heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return k, v

    def s2_logits(self, model: Kronos, h_last: torch.Tensor, s1: torch.Tensor,
                  attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h_last [n, d], chosen s1 [n] -> [n, V2]; attend(q [n, 4, 1, hd]) -> [n, 4, 1, hd]
        runs the cross-attention over the row's window keys."""
        n, d = h_last.shape
        query = model.embedding.emb_s1(s1)  # [n, d] raw embedding row
        q = affine(query, self.dep_q_w, self.dep_q_b).view(n, self.dep_heads, 1, d // self.dep_heads)
        attended = affine(attend(q).reshape(n, d), self.dep_out_w, self.dep_out_b)  # [n, d]
        return affine(rms_norm(h_last + attended, self.dep_norm), self.s2_w, self.s2_b)


def packed_weights(model: Kronos) -> PackedKronos:
    """The packed copy of `model`'s weights, rebuilt whenever a parameter changed or moved."""
    signature = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get("_packed_weights")
    if cached is not None and cached.signature == signature:
        return cached
    with torch.no_grad():
        blocks = []
        for block in model.transformer:
            attn, ffn = block.self_attn, block.ffn
            qkv_w, qkv_b = _input_major(attn.q_proj, attn.k_proj, attn.v_proj)
            out_w, out_b = _input_major(attn.out_proj)
            w13, _ = _input_major(ffn.w1, ffn.w3)
            w2, _ = _input_major(ffn.w2)
            blocks.append(PackedBlock(block.norm1.weight.detach(), qkv_w, qkv_b, out_w, out_b,
                                      block.norm2.weight.detach(), w13, w2))
        cross = model.dep_layer.cross_attn
        packed = PackedKronos(
            blocks, model.norm.weight.detach(),
            *_input_major(model.embedding.fusion_proj),
            *_input_major(model.head.proj_s1), *_input_major(model.head.proj_s2),
            *_input_major(cross.q_proj), *_input_major(cross.k_proj, cross.v_proj),
            *_input_major(cross.out_proj), model.dep_layer.norm.weight.detach(),
            n_heads=model.config.n_heads, dep_heads=cross.n_heads, signature=signature,
        )
    model.__dict__["_packed_weights"] = packed
    return packed


@dataclass
class RowLayout:
    """Where each row's shared prefix is: row r belongs to prefix slot[r] // S, path slot
    slot[r] % S. `prefix_mask` [B, Lp] and `suffix_mask` [Tq, Ts] (True = visible) hide
    padding, out-of-window or future keys; None means all visible.

    `slot` lives on the CPU (bookkeeping never waits for the device); `device_slot` is its
    copy on the compute device.
    """

    slot: torch.Tensor  # [n] int64, cpu
    n_series: int
    slots_per_series: int
    device: torch.device
    prefix_mask: torch.Tensor | None = None
    suffix_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.keep(torch.arange(len(self.slot)))

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the rows at positions `keep` [m] (cpu)."""
        self.slot = self.slot[keep]
        self.device_slot = self.slot.to(self.device)
        self.one_row_per_series = self.slots_per_series == 1 and torch.equal(
            self.slot, torch.arange(self.n_series))

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


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                            suffix_k: torch.Tensor, suffix_v: torch.Tensor,
                            layout: RowLayout) -> torch.Tensor:
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
    scores = torch.cat((_from_slots(prefix_scores, layout, Tq), suffix_scores), dim=-1)
    probs = scores.softmax(dim=-1)  # [n, H, Tq, Lp + Ts]
    prefix_probs, suffix_probs = probs.split((Lp, probs.shape[-1] - Lp), dim=-1)
    from_prefix = _from_slots(_to_slots(prefix_probs, layout) @ prefix_v, layout, Tq)
    return from_prefix + suffix_probs @ suffix_v


class SharedPrefixKV:
    """One attention layer's keys/values: prefix [B, H, Lp, hd] per series, suffix
    [n, H, capacity, hd] per row with `length` columns filled."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor, rows: int,
                 capacity: int) -> None:
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        B, H, _, hd = prefix_k.shape
        self.suffix_k = prefix_k.new_zeros(rows, H, capacity, hd)
        self.suffix_v = torch.zeros_like(self.suffix_k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, H, T, hd] -> written after the filled suffix columns."""
        end = self.length + k.shape[2]
        self.suffix_k[:, :, self.length:end] = k
        self.suffix_v[:, :, self.length:end] = v
        self.length = end

    def attend(self, q: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        return shared_prefix_attention(
            q, self.prefix_k, self.prefix_v, self.suffix_k[:, :, : self.length],
            self.suffix_v[:, :, : self.length], layout)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.suffix_k = self.suffix_k.index_select(0, rows)
        self.suffix_v = self.suffix_v.index_select(0, rows)

    def nbytes(self) -> int:
        tensors = (self.prefix_k, self.prefix_v, self.suffix_k, self.suffix_v)
        return sum(t.numel() * t.element_size() for t in tensors)
