"""Packed step weights: a fused layer computes what its nn.Linear layers compute."""

from __future__ import annotations

import pytest
import torch

from model_package.kronos.decoding import Dense, OutputMajorDense, packed_weights
from model_package.kronos.model import Kronos
from model_package.kronos.precision import set_precision
from model_package.kronos.presets import TINY_MODEL_CONFIG


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


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_gives_the_bits_of_the_input_major_product(rows, bias):
    """Dense calls F.linear on the transposed view: the same product as addmm / mm on the
    input-major weights, bit for bit (the float32 parity rests on it)."""
    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(512, 1536, bias=bias)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=g)
    dense = Dense.of(layer)
    x = torch.randn(rows, 1, 512, generator=g)
    flat = x.reshape(rows, 512)
    want = torch.addmm(dense.bias, flat, dense.input_major) if bias else flat @ dense.input_major
    assert torch.equal(dense(x), want.reshape(rows, 1, 1536))
    assert dense.in_features == 512


def test_half_precision_on_cpu_packs_output_major_layers():
    """bfloat16 on CPU keeps nn.Linear's [out, in] layout (oneDNN reads it faster) and
    computes what F.linear computes with the fused weights."""
    model = set_precision(Kronos(TINY_MODEL_CONFIG).eval(), "bfloat16")
    packed = packed_weights(model)
    block = packed.blocks[0]
    assert isinstance(block.qkv, OutputMajorDense) and block.qkv.weight.dtype == torch.bfloat16
    assert block.qkv.weight.shape == (144, 48) and block.qkv.in_features == 48
    attn = model.transformer[0].self_attn
    x = torch.randn(3, 1, 48, dtype=torch.bfloat16)
    weight = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
    bias = torch.cat((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
    assert torch.equal(block.qkv(x), torch.nn.functional.linear(x, weight, bias))
