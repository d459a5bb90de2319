"""KronosTokenizer: candles <-> pairs of integer sub-tokens (s1 coarse, s2 fine).

encode: x [B, T, d_in] (normalised candles) -> embed -> causal encoder -> quant_embed ->
        Binary Spherical Quantization -> (s1, s2) each [B, T] int64
decode: (s1, s2) -> ±1/sqrt(k) bit vectors [B, T, k] -> post_quant_embed -> causal decoder
        -> head -> [B, T, d_in]
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from .config import TokenizerConfig
from .layers import TransformerBlock


class BinarySphericalQuantizer(nn.Module):
    """Sign quantiser on the unit sphere. Holds the two index buffers the checkpoints store."""

    def __init__(self, codebook_dim: int, group_size: int) -> None:
        super().__init__()
        self.codebook_dim = codebook_dim
        self.register_buffer("basis", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("group_basis", 2 ** torch.arange(group_size - 1, -1, -1))

    @staticmethod
    def bits(z: torch.Tensor) -> torch.Tensor:
        """z [..., k] -> bits [..., k] int64: 1 where z > 0 (L2 normalising keeps the sign)."""
        return (z > 0).long()


class BSQuantizerWrapper(nn.Module):
    """Named like the checkpoint keys: `tokenizer.bsq.*`."""

    def __init__(self, codebook_dim: int, group_size: int) -> None:
        super().__init__()
        self.bsq = BinarySphericalQuantizer(codebook_dim, group_size)


class KronosTokenizer(nn.Module):
    """Encoder, BSQ quantiser and decoder. Inference only; always in eval mode."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Linear(c.d_in, c.d_model)
        self.encoder = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.ff_dim) for _ in range(c.n_enc_layers - 1)
        )
        self.decoder = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.ff_dim) for _ in range(c.n_dec_layers - 1)
        )
        self.quant_embed = nn.Linear(c.d_model, c.codebook_dim)
        self.post_quant_embed_pre = nn.Linear(c.s1_bits, c.d_model)  # training-only path
        self.post_quant_embed = nn.Linear(c.codebook_dim, c.d_model)
        self.head = nn.Linear(c.d_model, c.d_in)
        self.tokenizer = BSQuantizerWrapper(c.codebook_dim, c.group_size)
        self.eval()

    def train(self, mode: bool = True) -> KronosTokenizer:
        """Kronos is only ever run in eval mode here; training mode is refused silently."""
        return super().train(False)

    @staticmethod
    def _blocks(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        """Causal blocks over h [B, T, d], rotary positions 0..T-1."""
        if not len(blocks):
            return h
        first = cast(TransformerBlock, blocks[0])
        cos, sin = first.self_attn.rotary.cos_sin(torch.arange(h.shape[1], device=h.device))
        for block in blocks:
            h = block(h, cos, sin)
        return h

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d_in] -> (s1, s2) each [B, T] int64 (bits LSB-first within each half)."""
        c = self.config
        h = self.embed(x)  # [B, T, d]
        h = self._blocks(self.encoder, h)
        z = self.quant_embed(h)  # [B, T, k]
        bits = BinarySphericalQuantizer.bits(z)  # [B, T, k]
        s1_weights = 2 ** torch.arange(c.s1_bits, device=x.device)  # LSB first
        s2_weights = 2 ** torch.arange(c.s2_bits, device=x.device)
        s1 = (bits[..., : c.s1_bits] * s1_weights).sum(-1)  # [B, T]
        s2 = (bits[..., c.s1_bits :] * s2_weights).sum(-1)
        return s1, s2

    def indices_to_bits(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """(s1, s2) [B, T] -> [B, T, k] of ±1/sqrt(k).

        Each half is expanded with k // 2 bits, as upstream does (identical to s1_bits and
        s2_bits for every published checkpoint, where the two are equal).
        """
        k = self.config.codebook_dim
        half = k // 2
        shifts = torch.arange(half, device=s1.device)
        bits = torch.cat(((s1.unsqueeze(-1) >> shifts) & 1, (s2.unsqueeze(-1) >> shifts) & 1), -1)
        return (bits.float() * 2 - 1) * (1.0 / math.sqrt(k))

    def decode(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """(s1, s2) [B, T] -> candles [B, T, d_in] (normalised space)."""
        h = self.post_quant_embed(self.indices_to_bits(s1, s2))  # [B, T, d]
        h = self._blocks(self.decoder, h)
        return self.head(h)  # [B, T, d_in]
