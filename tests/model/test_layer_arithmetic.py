"""The step's rewritten arithmetic gives upstream's bits: RMSNorm and the rotary rotation."""

from __future__ import annotations

import pytest
import torch

from model_package.kronos.layers import apply_rotary, apply_rotary_rolled, rms_norm, rotary_inv_freq, signed_sin


def _upstream_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Upstream's RMSNorm formula, written out: x * rsqrt(mean(x^2) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("d", [64, 512, 832])
def test_rms_norm_has_upstreams_bits(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    weight = torch.randn(d, generator=g)
    for trial in range(30):
        x = torch.randn(3, 5, d, generator=g) * (10.0 ** (trial % 7 - 3))
        assert torch.equal(rms_norm(x, weight), _upstream_rms_norm(x, weight))


def test_the_rolled_rotation_has_the_rotate_half_bits() -> None:
    g = torch.Generator().manual_seed(0)
    hd = 64
    positions = torch.arange(700)
    freqs = positions.float()[:, None] * rotary_inv_freq(hd)  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[None, None]  # [1, 1, T, hd]
    cos, sin = emb.cos(), emb.sin()
    x = torch.randn(2, 8, 700, hd, generator=g) * 30
    rolled = apply_rotary_rolled(x, cos, signed_sin(sin))
    assert torch.equal(rolled, apply_rotary(x, cos, sin))
    # a strided view (q and k rotated together, as the packed trunk does) as well
    qk = torch.randn(2, 700, 3, 8, hd, generator=g).permute(2, 0, 3, 1, 4)[:2]  # [2, B, H, T, hd]
    assert torch.equal(apply_rotary_rolled(qk, cos, signed_sin(sin)), apply_rotary(qk, cos, sin))
