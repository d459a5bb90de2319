"""Building blocks shared by the tokenizer and the predictor.

Shapes: B batch rows, T query positions, Tk key positions, H heads, hd head size, d model size.
Dropout (the checkpoint config's probabilities) only acts in training mode; in eval mode the
code path is exactly the inference one, with no dropout call at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in float32, then cast back and scaled (eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x [..., d] / rms(x) (float32 statistics, cast back) * weight [d]."""
    if x.dtype != torch.float32:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    # Upstream's float32 operations in their order, in place where the value is fresh: fewer
    # operators than F.rms_norm's decomposition on CPU, the same bits. x * x is pow(x, 2)'s
    # own arithmetic, and sum then div_ by the count is how ATen computes a float32 mean
    # (without mean's dtype round trip of the divisor).
    inverse_rms = (x * x).sum(-1, keepdim=True).div_(float(x.shape[-1])).add_(eps).rsqrt_()  # [..., 1]
    return (x * inverse_rms).mul_(weight)


class RotaryEmbedding(nn.Module):
    """NeoX-style ("rotate half") rotary position embedding for one attention module.

    `inv_freq` is a persistent buffer because the published checkpoints store it; it is
    recomputed here and the stored copy is ignored on load.
    """

    inv_freq: torch.Tensor  # [hd/2], a buffer

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] (integer offsets) -> cos, sin [1 or B, 1, T, hd]."""
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # [(B,) T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [(B,) T, hd]
        if emb.dim() == 2:
            emb = emb.unsqueeze(0)  # [1, T, hd]
        emb = emb.unsqueeze(1)  # [B, 1, T, hd]
        return emb.cos(), emb.sin()


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """inv_freq[j] = base^(-2j / head_dim), float32, shape [head_dim / 2]."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., hd] -> concat(-x[..., hd/2:], x[..., :hd/2])."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated by the angles in cos/sin [B or 1, 1, T, hd]."""
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., hd] -> [-sin[..., :hd/2], sin[..., hd/2:]], the table of `apply_rotary_rolled`."""
    first, second = sin.chunk(2, dim=-1)
    return torch.cat((-first, second), dim=-1)


def apply_rotary_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rotary with fewer operators, the same bits: rotate_half(x) * sin equals
    roll(x, hd/2) * signed_sin(sin) entry for entry (a product only changes sign when a
    factor does). x [..., hd]; cos, sin_signed broadcast to it."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache:
    """Keys and values of one attention layer for a batch of rows, preallocated in time.

    Tensors are [B, H, capacity, hd]; `length` columns are filled, the same count for
    every row (the caller masks any column a row must not see).
    """

    def __init__(
        self, batch: int, n_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.k = torch.zeros(batch, n_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, hd] after the filled columns; return all filled [B, H, Tk, hd]."""
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def stacked_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear layers stacked along their outputs (one fused layer): weight [sum(out), in] and
    bias [sum(out)] (None when they have none), detached and contiguous."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    biases = [lin.bias.detach() for lin in linears if lin.bias is not None]
    return weight.contiguous(), torch.cat(biases).contiguous() if biases else None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that is not even dispatched in eval mode or with p = 0."""
    return F.dropout(x, p, True) if training and p > 0 else x


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; biased q/k/v/out projections."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0) -> None:
        super().__init__()
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout_p = resid_dropout_p
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d].

        Without a mask, `causal` selects causal or full attention over the keys. With a
        cache, the new keys/values are appended and the queries attend to every cached
        column that `attn_mask` [B, 1, T, Tk] (True = attend) allows.
        """
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # [B, H, Tk, hd]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )  # [B, H, T, hd]
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return dropout(self.out_proj(y), self.resid_dropout_p, self.training)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, d_model: int, ff_dim: int, ffn_dropout_p: float = 0.0) -> None:
        super().__init__()
        self.ffn_dropout_p = ffn_dropout_p
        self.w1 = nn.Linear(d_model, ff_dim, bias=False)
        self.w3 = nn.Linear(d_model, ff_dim, bias=False)
        self.w2 = nn.Linear(ff_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.ffn_dropout_p, self.training)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1 x), then x + ffn(norm2 x)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        ffn_dropout_p: float = 0.0,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout_p, resid_dropout_p)
        self.norm2 = RMSNorm(d_model)
        self.ffn = FeedForward(d_model, ff_dim, ffn_dropout_p)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), cos, sin, attn_mask, causal, cache)
        return x + self.ffn(self.norm2(x))
