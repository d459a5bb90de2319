"""KronosTokenizer: candles <-> pairs of integer sub-tokens (s1 coarse, s2 fine).

encode: x [B, T, d_in] (normalised candles) -> embed -> causal encoder -> quant_embed ->
        Binary Spherical Quantization -> (s1, s2) each [B, T] int64
decode: (s1, s2) -> ±1/sqrt(k) bit vectors [B, T, k] -> post_quant_embed -> causal decoder
        -> head -> [B, T, d_in]
reconstruct (training): the same path with a straight-through sign quantiser, decoded twice
        (from the s1 half alone through post_quant_embed_pre, and from all k bits), plus the
        BSQ loss (commitment + soft entropy penalty) of the quantiser input.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
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

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Unit-norm z [..., k] -> ±1/sqrt(k) [..., k]; straight-through: the gradient of the
        output is passed to z unchanged (exact zero maps to -1)."""
        signs = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
        return (z + (signs - z).detach()) * (1.0 / math.sqrt(self.codebook_dim))

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft entropies of unit-norm z [..., k]: (per-sample entropy, codebook entropy).

        Each bit is -1 with probability p = sigmoid(-4 z / sqrt(k)). Per sample: the binary
        entropies of the k bits summed, averaged over samples. Codebook: the binary entropy
        of each bit's probability averaged over samples, summed over the k bits. (Upstream's
        analytical setting; its group softmax is computed there but never used, so the
        group size only shapes the `group_basis` buffer.)
        """
        k = self.codebook_dim
        p = torch.sigmoid(-4 * z / math.sqrt(k))  # [..., k]
        bit_probs = torch.stack((p, 1 - p), dim=-1)  # [..., k, 2]
        per_sample = -(bit_probs * torch.log(bit_probs + 1e-8)).sum(-1).sum(-1).mean()
        average = bit_probs.reshape(-1, k, 2).mean(0)  # [k, 2]
        codebook = -(average * torch.log(average + 1e-8)).sum(-1).sum()
        return per_sample, codebook


class BSQuantizerWrapper(nn.Module):
    """Named like the checkpoint keys: `tokenizer.bsq.*`."""

    def __init__(self, codebook_dim: int, group_size: int) -> None:
        super().__init__()
        self.bsq = BinarySphericalQuantizer(codebook_dim, group_size)


class KronosTokenizer(nn.Module):
    """Encoder, BSQ quantiser and decoder. Built in eval mode; `train()` only for fine-tuning."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        dropouts = (c.ffn_dropout_p, c.attn_dropout_p, c.resid_dropout_p)
        self.embed = nn.Linear(c.d_in, c.d_model)
        self.encoder = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.ff_dim, *dropouts) for _ in range(c.n_enc_layers - 1)
        )
        self.decoder = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.ff_dim, *dropouts) for _ in range(c.n_dec_layers - 1)
        )
        self.quant_embed = nn.Linear(c.d_model, c.codebook_dim)
        self.post_quant_embed_pre = nn.Linear(c.s1_bits, c.d_model)  # training-only path
        self.post_quant_embed = nn.Linear(c.codebook_dim, c.d_model)
        self.head = nn.Linear(c.d_model, c.d_in)
        self.tokenizer = BSQuantizerWrapper(c.codebook_dim, c.group_size)
        self.eval()

    @property
    def bsq(self) -> BinarySphericalQuantizer:
        return self.tokenizer.bsq

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

    # -- training ---------------------------------------------------------------------------

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d_in] -> (z_pre, z_all, quantizer input z_unit [B, T, k]).

        z_pre [B, T, d_in] decodes the s1 bits alone (post_quant_embed_pre), z_all all k bits;
        both are differentiable through the straight-through quantiser.
        """
        c = self.config
        h = self._blocks(self.encoder, self.embed(x))  # [B, T, d]
        z_unit = F.normalize(self.quant_embed(h), dim=-1)  # [B, T, k]
        quantized = self.bsq.quantize(z_unit)  # [B, T, k] of ±1/sqrt(k)
        z_pre = self.head(self._blocks(self.decoder, self.post_quant_embed_pre(quantized[..., : c.s1_bits])))
        z_all = self.head(self._blocks(self.decoder, self.post_quant_embed(quantized)))
        return z_pre, z_all, z_unit

    def bsq_loss(self, z_unit: torch.Tensor) -> torch.Tensor:
        """Commitment + entropy penalty of the quantiser input z_unit [B, T, k] -> scalar."""
        c = self.config
        quantized = self.bsq.quantize(z_unit)
        commitment = c.beta * ((quantized.detach() - z_unit) ** 2).sum(-1).mean()
        per_sample, codebook = self.bsq.entropy_terms(z_unit)
        return commitment + c.zeta * (c.gamma0 * per_sample - c.gamma * codebook)
