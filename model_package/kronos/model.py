"""Kronos: decoder-only transformer over (s1, s2) candle tokens with calendar embeddings.

Trunk:  x = fuse(emb_s1(s1)·√d, emb_s2(s2)·√d) + calendar(stamp) -> causal blocks -> norm -> h
Heads:  s1_logits = proj_s1(h)
        s2_logits = proj_s2(norm_dep(h + cross_attn(query=emb_s1(s1*), keys=values=h)))
The s2 head (DependencyAwareLayer) is evaluated as upstream does in eval mode: a single
query (the sampled s1's raw embedding), 4 heads, no rotation, attending to every position
of the window. Shapes: B rows, T positions, d model size, V1/V2 vocabulary sizes.

Training (`forward_train`) is upstream's full-sequence forward: every position's s2 logits,
the s2 head's queries being the s1 ids of the same positions (the true next ids under teacher
forcing, else ids sampled from the s1 logits), rotated by the query positions, attending
causally in training mode and to every position in eval mode (upstream's behaviour).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEPENDENCY_HEADS, KronosConfig
from .layers import KVCache, RMSNorm, RotaryEmbedding, TransformerBlock, apply_rotary, dropout

CALENDAR_FIELDS = ("minute", "hour", "weekday", "day", "month")
CALENDAR_SIZES = (60, 24, 7, 32, 13)


class HierarchicalEmbedding(nn.Module):
    """(s1, s2) [B, T] -> [B, T, d]: scaled embeddings of both halves, fused by a linear map."""

    def __init__(self, s1_bits: int, s2_bits: int, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.emb_s1 = nn.Embedding(2**s1_bits, d_model)
        self.emb_s2 = nn.Embedding(2**s2_bits, d_model)
        self.fusion_proj = nn.Linear(2 * d_model, d_model)

    def forward(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(self.d_model)
        both = torch.cat((self.emb_s1(s1) * scale, self.emb_s2(s2) * scale), dim=-1)  # [B, T, 2d]
        return self.fusion_proj(both)


class FixedEmbedding(nn.Module):
    """A frozen sinusoidal table (used when `learn_te` is false): sin on even, cos on odd columns."""

    def __init__(self, size: int, d_model: int) -> None:
        super().__init__()
        position = torch.arange(size, dtype=torch.float32).unsqueeze(1)  # [size, 1]
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        table = torch.zeros(size, d_model)
        table[:, 0::2] = torch.sin(position * div_term)
        table[:, 1::2] = torch.cos(position * div_term)
        self.emb = nn.Embedding(size, d_model)
        self.emb.weight = nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


class TemporalEmbedding(nn.Module):
    """stamp [B, T, 5] (minute, hour, weekday, day, month) -> [B, T, d], sum of five lookups."""

    def __init__(self, d_model: int, learn_te: bool) -> None:
        super().__init__()

        def table(size: int) -> nn.Module:
            return nn.Embedding(size, d_model) if learn_te else FixedEmbedding(size, d_model)

        self.minute_embed = table(60)
        self.hour_embed = table(24)
        self.weekday_embed = table(7)
        self.day_embed = table(32)
        self.month_embed = table(13)

    def forward(self, stamp: torch.Tensor) -> torch.Tensor:
        ids = stamp.long()  # truncation, as upstream
        minute = self.minute_embed(ids[..., 0])
        hour = self.hour_embed(ids[..., 1])
        weekday = self.weekday_embed(ids[..., 2])
        day = self.day_embed(ids[..., 3])
        month = self.month_embed(ids[..., 4])
        return hour + weekday + day + month + minute  # upstream's summation order


class CrossAttention(nn.Module):
    """Attention of a query sequence over a key/value sequence; biased projections, 4 heads.

    The rotary buffer exists because checkpoints store it. Upstream rotates q and k by the
    *query* positions, and inference always has a single query at position 0, where the
    rotation is the identity, so it is not applied here.
    """

    def __init__(self, d_model: int, n_heads: int = DEPENDENCY_HEADS) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(self.head_dim)

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, Tk, d] -> k, v [B, H, Tk, hd]."""
        B, Tk, _ = h.shape
        k = self.k_proj(h).view(B, Tk, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, Tk, self.n_heads, self.head_dim).transpose(1, 2)
        return k, v

    def attend(
        self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query [B, Tq, d] over k, v [B, H, Tk, hd] (non-causal) -> [B, Tq, d].

        key_mask [B, 1, 1, Tk] (True = attend) hides padding or out-of-window keys.
        """
        B, Tq, d = query.shape
        q = self.q_proj(query).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [B, H, Tq, hd]
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, Tq, d))

    def forward_sequence(self, query: torch.Tensor, h: torch.Tensor, causal: bool | None = None) -> torch.Tensor:
        """Training form: query [B, T, d] over h [B, T, d] -> [B, T, d].

        q and k are both rotated by positions 0..T-1 (upstream rotates by the query length).
        `causal` None is upstream's rule: causal in training mode, full attention in eval
        mode (where position t sees the hidden state of t + 1, built from its target).
        """
        causal = self.training if causal is None else causal
        B, T, d = query.shape
        q = self.q_proj(query).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, 4, T, hd]
        k, v = self.keys_values(h)
        cos, sin = self.rotary.cos_sin(torch.arange(T, device=query.device))
        y = F.scaled_dot_product_attention(
            apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, is_causal=causal
        )  # [B, 4, T, hd]
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, T, d))


class DependencyAwareLayer(nn.Module):
    """s2 conditioning on the chosen s1: post-norm(h + cross_attn(emb_s1(s1*) -> h))."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(d_model)
        self.norm = RMSNorm(d_model)


class DualHead(nn.Module):
    """Linear read-outs to the s1 and s2 vocabularies."""

    def __init__(self, s1_bits: int, s2_bits: int, d_model: int) -> None:
        super().__init__()
        self.proj_s1 = nn.Linear(d_model, 2**s1_bits)
        self.proj_s2 = nn.Linear(d_model, 2**s2_bits)


class Kronos(nn.Module):
    """The autoregressive predictor. Built in eval mode; `train()` only for fine-tuning."""

    def __init__(self, config: KronosConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding = HierarchicalEmbedding(c.s1_bits, c.s2_bits, c.d_model)
        self.time_emb = TemporalEmbedding(c.d_model, c.learn_te)
        self.transformer = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.ff_dim, c.ffn_dropout_p, c.attn_dropout_p, c.resid_dropout_p)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.d_model)
        self.dep_layer = DependencyAwareLayer(c.d_model)
        self.head = DualHead(c.s1_bits, c.s2_bits, c.d_model)
        self.eval()

    @property
    def rotary(self) -> RotaryEmbedding:
        return cast(TransformerBlock, self.transformer[0]).self_attn.rotary

    def embed(self, s1: torch.Tensor, s2: torch.Tensor, stamp: torch.Tensor) -> torch.Tensor:
        """(s1, s2) [B, T], stamp [B, T, 5] -> x [B, T, d]."""
        return self.embedding(s1, s2) + self.time_emb(stamp)

    def trunk(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        causal: bool = True,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """x [B, T, d] at rotary positions [T] or [B, T] -> final-normed hidden h [B, T, d]."""
        cos, sin = self.rotary.cos_sin(positions)
        for i, block in enumerate(self.transformer):
            x = block(x, cos, sin, attn_mask, causal, caches[i] if caches is not None else None)
        return self.norm(x)

    def s1_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] -> [..., V1]."""
        return self.head.proj_s1(h)

    def dependency_keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window hidden states h [B, Tk, d] -> s2-head keys/values [B, 4, Tk, d/4]."""
        return self.dep_layer.cross_attn.keys_values(h)

    def s2_logits(
        self,
        h_last: torch.Tensor,
        s1: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """s2 logits at the last position given the chosen s1.

        h_last [B, d], s1 [B], k/v [B, 4, Tk, d/4] of the window -> [B, V2].
        """
        query = self.embedding.emb_s1(s1).unsqueeze(1)  # [B, 1, d], raw (unscaled) row
        attended = self.dep_layer.cross_attn.attend(query, k, v, key_mask)  # [B, 1, d]
        return self.head.proj_s2(self.dep_layer.norm(h_last + attended[:, 0]))

    # -- upstream's literal per-step forward, kept for the reference generator -------------

    def decode_s1(self, s1: torch.Tensor, s2: torch.Tensor, stamp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole window from scratch: (s1, s2) [B, T], stamp [B, T, 5] -> (s1 logits [B, T, V1], h)."""
        T = s1.shape[1]
        h = self.trunk(self.embed(s1, s2, stamp), torch.arange(T, device=s1.device))
        return self.s1_logits(h), h

    def decode_s2(self, h: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        """s2 logits for every window position, as upstream computes them: h [B, T, d], s1 [B, 1]."""
        query = self.embedding.emb_s1(s1)  # [B, 1, d]
        k, v = self.dependency_keys_values(h)
        attended = self.dep_layer.cross_attn.attend(query, k, v)  # [B, 1, d]
        return self.head.proj_s2(self.dep_layer.norm(h + attended))  # [B, T, V2]

    # -- training ------------------------------------------------------------------------------

    def forward_train(
        self,
        s1: torch.Tensor,
        s2: torch.Tensor,
        stamp: torch.Tensor,
        s1_next: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        causal_s2: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1, s2) [B, T], stamp [B, T, 5] -> (s1 logits [B, T, V1], s2 logits [B, T, V2]).

        The s2 head is conditioned on `s1_next` [B, T] (teacher forcing: the true next s1 ids)
        or, when it is None, on s1 ids drawn from softmax(s1 logits) (`generator` or the
        global RNG), as upstream's fine-tuning scripts do. `causal_s2`: see
        `CrossAttention.forward_sequence` (None: upstream's mode-dependent rule).
        """
        T = s1.shape[1]
        x = dropout(self.embed(s1, s2, stamp), self.config.token_dropout_p, self.training)  # [B, T, d]
        h = self.trunk(x, torch.arange(T, device=s1.device))  # [B, T, d]
        s1_logits = self.s1_logits(h)  # [B, T, V1]
        if s1_next is None:
            probs = F.softmax(s1_logits.detach(), dim=-1).reshape(-1, s1_logits.shape[-1])  # [B*T, V1]
            s1_next = torch.multinomial(probs, 1, generator=generator).view(s1.shape)
        sibling = self.embedding.emb_s1(s1_next)  # [B, T, d], raw rows
        attended = self.dep_layer.cross_attn.forward_sequence(sibling, h, causal_s2)  # [B, T, d]
        return s1_logits, self.head.proj_s2(self.dep_layer.norm(h + attended))
