"""Packed step weights: a fused layer computes what its nn.Linear layers compute."""

from __future__ import annotations

import pytest
import torch

from model_package.kronos.decoding import Dense


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 256, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_layer_equals_the_linear_layers_for_any_row_count(rows, bias):
    g = torch.Generator().manual_seed(rows)
    first, second = torch.nn.Linear(24, 40, bias=bias), torch.nn.Linear(24, 8, bias=bias)
    for p in (*first.parameters(), *second.parameters()):
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(rows, 1, 24, generator=g)
    dense = Dense.of(first, second)
    with torch.no_grad():
        want = torch.cat((first(x), second(x)), dim=-1)  # [rows, 1, 48]
    got = dense(x)
    assert got.shape == (rows, 1, 48) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
