"""The engine's step arithmetic: the predictor's weights packed for one-position steps.

A step evaluates one new position per row, so every weight matrix is read once to multiply
a few vectors and the step is bound by memory bandwidth. `PackedKronos` keeps the weights
fused (q/k/v in one matrix, w1/w3 in one) and input-major ([in, out], the layout whose
float32 products read fastest on CPU for every row count we measured with torch 2.13, and
the natural one on GPU). With the opt-in reduced precision (`precision.set_precision`) they
are in the model's half dtype (output-major on CPU, where oneDNN's bfloat16 products prefer
it), or int8 (`precision.Int8Dense`, CPU), which reads a quarter of the bytes. The
attention itself (which keys each row sees) is the caller's: `trunk` takes it as a function
(`engine.Lane.attend`, `engine.grid_attention`).

Shapes: n rows, H heads, hd head size, Tq query positions per row, d model size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from .layers import RotaryEmbedding, TransformerBlock, apply_rotary_rolled, rms_norm, signed_sin, stacked_linears
from .model import Kronos
from .precision import HALF_DTYPES, Int8Dense, model_precision


@dataclass
class Dense:
    """A (fused) linear layer, input-major: out = x @ input_major + bias."""

    input_major: torch.Tensor  # [in, out]
    bias: torch.Tensor | None  # [out]

    @classmethod
    def of(cls, *linears: torch.nn.Linear) -> Dense:
        """Stack Linear layers along their outputs."""
        weight, bias = stacked_linears(*linears)  # [sum(out), in], [sum(out)]
        return cls(weight.t().contiguous(), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]. F.linear of the transposed view is one call into ATen
        that ends in the same product as `addmm(bias, x_2d, input_major)` (or `x_2d @
        input_major`), so the same bits, with less Python around it."""
        return F.linear(x, self.input_major.t(), self.bias)

    @property
    def in_features(self) -> int:
        return self.input_major.shape[0]


@dataclass
class OutputMajorDense:
    """A (fused) linear layer of a half-precision model on CPU, output-major like nn.Linear:
    out = x @ weight^T + bias. oneDNN's bfloat16 products read this layout faster than the
    input-major one (1.1-1.4x at 1 and 16 rows, PERFORMANCE.md "Reduced precision")."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]

    @classmethod
    def of(cls, *linears: torch.nn.Linear) -> OutputMajorDense:
        """Stack Linear layers along their outputs."""
        return cls(*stacked_linears(*linears))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return F.linear(x, self.weight, self.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


# A packed layer: Dense in the model's dtype (float32; half precisions on GPU),
# OutputMajorDense (half precisions on CPU) or, with the int8 precision, Int8Dense
# (model_package/kronos/precision.py). All map x [..., in] -> [..., out].
StepLinear = Dense | OutputMajorDense | Int8Dense


@dataclass
class PackedBlock:
    norm1: torch.Tensor  # [d]
    qkv: StepLinear  # d -> 3d
    out: StepLinear  # d -> d
    norm2: torch.Tensor  # [d]
    w13: StepLinear  # d -> 2 ff (gate, up)
    w2: StepLinear  # ff -> d


@dataclass
class PackedKronos:
    """Fused copies of a Kronos model's weights for the steps (built once, reused), in the
    precision recorded on the model (`precision.set_precision`): hidden states are in the
    model's dtype (float32 for int8), logits are always float32."""

    blocks: list[PackedBlock]
    final_norm: torch.Tensor
    fusion: StepLinear  # 2d -> d
    s1_head: StepLinear  # d -> V1
    s2_head: StepLinear  # d -> V2
    dep_q: StepLinear  # d -> d
    dep_kv: StepLinear  # d -> 2d
    dep_out: StepLinear  # d -> d
    dep_norm: torch.Tensor
    n_heads: int
    dep_heads: int
    signature: tuple
    precision: str = "float32"

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
        sin = signed_sin(sin)
        for i, blk in enumerate(self.blocks):
            qkv = blk.qkv(rms_norm(x, blk.norm1))  # [n, Tq, 3d]
            qkv = qkv.view(n, Tq, 3, H, d // H).permute(2, 0, 3, 1, 4)  # [3, n, H, Tq, hd]
            q, k = apply_rotary_rolled(qkv[:2], cos, sin)  # both rotated in one pass
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
        """h [n, d] -> [n, V1] float32."""
        return self.s1_head(h).float()

    def dependency_keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [n, T, d] -> s2-head keys, values [n, 4, T, d/4]."""
        n, T, d = h.shape
        kv = self.dep_kv(h).view(n, T, 2, self.dep_heads, d // self.dep_heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return k, v

    def s2_logits(
        self, model: Kronos, h_last: torch.Tensor, s1: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """h_last [n, d], chosen s1 [n] -> [n, V2] float32; attend(q [n, 4, 1, hd]) -> [n, 4, 1, hd]
        runs the cross-attention over the row's window keys."""
        n, d = h_last.shape
        query = model.embedding.emb_s1(s1)  # [n, d] raw embedding row
        q = self.dep_q(query).view(n, self.dep_heads, 1, d // self.dep_heads)
        attended = self.dep_out(attend(q).reshape(n, d))  # [n, d]
        return self.s2_head(rms_norm(h_last + attended, self.dep_norm)).float()


def packed_weights(model: Kronos) -> PackedKronos:
    """The packed copy of `model`'s weights in the model's precision (`precision.model_precision`),
    rebuilt whenever a parameter changed or moved or the precision changed."""
    precision = model_precision(model)
    signature = (precision, *((p.data_ptr(), p._version) for p in model.parameters()))
    cached = model.__dict__.get("_packed_weights")
    if cached is not None and cached.signature == signature:
        return cached
    # int8: every packed layer (the heads too: keeping them float32 did not raise the token
    # agreement with float32, see PERFORMANCE.md "Reduced precision").
    linear: Callable[..., StepLinear] = Dense.of
    if precision == "int8":
        linear = Int8Dense.of
    elif precision in HALF_DTYPES and next(model.parameters()).device.type == "cpu":
        linear = OutputMajorDense.of
    with torch.no_grad():
        blocks = []
        for block in cast("list[TransformerBlock]", list(model.transformer)):
            attn, ffn = block.self_attn, block.ffn
            blocks.append(
                PackedBlock(
                    block.norm1.weight.detach(),
                    linear(attn.q_proj, attn.k_proj, attn.v_proj),
                    linear(attn.out_proj),
                    block.norm2.weight.detach(),
                    linear(ffn.w1, ffn.w3),
                    linear(ffn.w2),
                )
            )
        cross = model.dep_layer.cross_attn
        packed = PackedKronos(
            blocks,
            model.norm.weight.detach(),
            linear(model.embedding.fusion_proj),
            linear(model.head.proj_s1),
            linear(model.head.proj_s2),
            linear(cross.q_proj),
            linear(cross.k_proj, cross.v_proj),
            linear(cross.out_proj),
            model.dep_layer.norm.weight.detach(),
            n_heads=model.config.n_heads,
            dep_heads=cross.n_heads,
            signature=signature,
            precision=precision,
        )
    model.__dict__["_packed_weights"] = packed
    return packed
