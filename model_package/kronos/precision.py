"""Reduced precision for generation, opt-in: `float32` (default), `bfloat16`, `float16`, `int8`.

- `bfloat16` / `float16`: the predictor is cast to that dtype as a whole, so the full-window
  passes (prefill, window recomputes) and the incremental steps all run in it, and the KV
  caches follow the parameters' dtype. Rotary angles are still computed in float32 (a
  bfloat16 position above 256 is not even an integer) and cast afterwards; RMSNorm
  statistics stay float32 (`layers.rms_norm`); logits are handed to sampling as float32.
  The tokenizer always stays float32. `float16` is CUDA only.
- `int8` (CPU only): the packed linear layers (`decoding.Dense`) are replaced by
  `Int8Dense`: int8 weights with one scale per output channel, each activation row
  quantized on its own scale (int32 accumulation, fbgemm). The engine runs its decode steps,
  prefills and exact window recomputes through them (`engine.Engine._causal_pass`).
  Embeddings, norms, the prefill's attention and the `reference` mode stay float32; the
  lanes' KV caches are bfloat16 on CPUs with native bfloat16 (`cache_dtype`), float32
  otherwise.

The chosen precision is recorded on the model (`set_precision`) and `decoding.packed_weights`
reads it (`model_precision`), rebuilding its packed copy whenever it changes.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import cast

import torch

from .layers import RotaryEmbedding, SelfAttention, rotary_inv_freq, stacked_linears
from .model import CrossAttention, Kronos

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")
DEFAULT_PRECISION = "float32"
HALF_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_KEY = "_kronos_precision"  # where set_precision records it, in model.__dict__


# -- which precision runs where ------------------------------------------------------------------


def _cpu_feature(name: str) -> bool:
    """A CPU feature test of torch.cpu (`_is_vnni_supported`, ...); False when absent."""
    probe = cast("Callable[[], bool] | None", getattr(torch.cpu, name, None))
    return bool(probe()) if probe is not None else False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it oneDNN
    emulates bfloat16 and a bfloat16 step is slower than float32."""
    return _cpu_feature("_is_avx512_bf16_supported") or _cpu_feature("_is_amx_tile_supported")


@functools.cache
def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI / AVX-VNNI (int8 dot products without the int16
    saturation of older instructions, so activations may use the full 8-bit range)."""
    return _cpu_feature("_is_vnni_supported")


def _int8_engine() -> str | None:
    """The quantized engine that runs `Int8Dense` on this build (fbgemm or x86), or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("fbgemm", "x86") if e in engines), None)


def check_precision(precision: object, device: torch.device | str, name: str = "dtype") -> str:
    """`precision` if it is one of PRECISIONS and runs on `device`, else ValueError naming
    `name` (the argument or environment variable it came from) and the rule.

    Rules: float16 needs CUDA (CPUs have no fast float16 products); int8 is CPU only (fbgemm
    int8 kernels); bfloat16 on CUDA needs a GPU that supports it.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "float16" and device.type == "cpu":
        raise ValueError(
            f"{name}=float16 needs a CUDA device (CPUs have no fast float16 matrix products); "
            "on cpu use float32, int8 or bfloat16"
        )
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(
                f"{name}=int8 runs on cpu only (fbgemm int8 kernels); on {device.type} use bfloat16 or float16"
            )
        if _int8_engine() is None:
            raise ValueError(f"{name}=int8 needs torch's fbgemm/x86 quantized engine, which this torch build lacks")
    if precision == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{name}=bfloat16 needs a GPU with bfloat16 support; use float16 on this one")
    return precision


def precision_note(precision: str, device: torch.device | str) -> str | None:
    """A one-line caveat for a valid but slow combination (bfloat16 on a CPU without native
    bfloat16), else None."""
    if precision == "bfloat16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        return (
            "dtype=bfloat16 on a CPU without AVX512-BF16/AMX: bfloat16 is emulated and generation "
            "is slower than float32 (see PERFORMANCE.md, Reduced precision); int8 is the fast CPU option"
        )
    return None


def cache_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of the engine's KV caches: the model's dtype (float32, or the half dtype),
    except for int8 on a CPU with native bfloat16, where the lanes keep their keys and values
    in bfloat16 (half the bytes a step's attention reads: the larger part of a step at 16 and
    more rows, PERFORMANCE.md "Reduced precision")."""
    if precision == "int8" and torch.device(device).type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return HALF_DTYPES.get(precision, torch.float32)


def cache_value_bytes(precision: str, device: torch.device | str) -> int:
    """Bytes of one value of the engine's KV caches (`cache_dtype`): what `cost` prices a
    lane's keys and values at."""
    return cache_dtype(precision, device).itemsize


# -- the precision of a model ----------------------------------------------------------------


class Float32Rotary(RotaryEmbedding):
    """Rotary embedding of a half-precision model: angles in float32 (exact integer positions,
    float32 frequencies, as in a float32 model), cos/sin cast to `out_dtype` at the end.
    Casting the model keeps `inv_freq` float32."""

    def __init__(self, head_dim: int, out_dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(head_dim)
        self.inv_freq = self.inv_freq.to(device)
        self.out_dtype = out_dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Float32Rotary:
        super()._apply(fn, recurse)
        self.inv_freq = rotary_inv_freq(self.head_dim).to(self.inv_freq.device)  # float32 again
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] -> cos, sin [1 or B, 1, T, hd] in `out_dtype`."""
        cos, sin = super().cos_sin(positions)
        return cos.to(self.out_dtype), sin.to(self.out_dtype)


def _set_rotaries(model: Kronos, dtype: torch.dtype) -> None:
    """Give every attention module of `model` rotary angles that end in `dtype` (float32:
    the plain RotaryEmbedding, as loaded)."""
    device = next(model.parameters()).device
    for module in model.modules():
        if isinstance(module, (SelfAttention, CrossAttention)):
            head_dim = module.rotary.head_dim
            module.rotary = (
                RotaryEmbedding(head_dim).to(device)
                if dtype == torch.float32
                else Float32Rotary(head_dim, dtype, device)
            )


def model_precision(model: Kronos) -> str:
    """The precision recorded on `model` by set_precision (float32 when never set)."""
    return cast(str, model.__dict__.get(_PRECISION_KEY, DEFAULT_PRECISION))


def set_precision(model: Kronos, precision: str, name: str = "dtype") -> Kronos:
    """Make `model` generate in `precision` (checked against its device; `name` is used in
    the error) and return it. In place: half precisions cast the parameters, float32 and
    int8 keep (or restore) float32 parameters; the packed step weights are rebuilt on the
    next `decoding.packed_weights` call.

    float32 on a float32 model changes nothing at all, so results stay bit-identical.
    """
    device = next(model.parameters()).device
    check_precision(precision, device, name)
    dtype = HALF_DTYPES.get(precision, torch.float32)
    if next(model.parameters()).dtype != dtype:
        _set_rotaries(model, dtype)
        model.to(dtype)
    model.__dict__[_PRECISION_KEY] = precision
    return model


# -- int8 linear layers ---------------------------------------------------------------------------

_TINY = torch.finfo(torch.float32).tiny  # the divisor of an all-zero row


class Int8Dense:
    """A (fused) linear layer with int8 weights, for the CPU engine.

    Weights: symmetric int8, one float32 scale per output channel (max |w| of the row / 127).
    Activations: each row is divided by its own largest |value|, quantized with fixed
    parameters (levels L = 127 around the zero point 128, so [-1, 1] maps to [1, 255]),
    multiplied by the int8 weights with int32 accumulation, rescaled to float32 (fbgemm's
    `linear_with_input_q_dq_qweight_dq_output_fp32`), and multiplied back by its largest
    |value| before the float32 bias is added. Every row is thus quantized on its own scale
    and nothing of a call depends on the other rows in it: a series' tokens are the same alone
    or batched with others, as in float32 (a dynamically quantized call, one scale from the
    min and max of all its rows, let one row's outliers move another row's tokens). On CPUs
    without VNNI the activations use 7 bits (L = 63 around 64), which avoids the int16
    saturation of the older dot-product instructions.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight [out, in] float, bias [out] or None."""
        engine = _int8_engine()
        if engine is None:
            raise RuntimeError("int8 needs torch's fbgemm/x86 quantized engine")
        if torch.backends.quantized.engine not in ("fbgemm", "x86"):
            torch.backends.quantized.engine = engine
        weight = weight.detach().float().cpu()
        out_features = weight.shape[0]
        peak = weight.abs().amax(dim=1)  # [out]
        scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak)).double()
        zero_points = torch.zeros(out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch >= 2.10 flags quantized tensors as deprecated
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        # x [n, in] float32 quantized with a given (scale, zero point), times the packed int8
        # weights -> [n, out] float32 (looked up here: builds without fbgemm lack it).
        self.linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
        self.bias = bias.detach().float().cpu() if bias is not None else None  # [out]
        self.out_features = out_features
        self.in_features = weight.shape[1]
        levels = 127 if cpu_has_vnni() else 63
        self.input_scale, self.input_zero_point = 1.0 / levels, levels + 1

    @classmethod
    def of(cls, *linears: torch.nn.Linear) -> Int8Dense:
        """Stack Linear layers along their outputs, then quantize."""
        return cls(*stacked_linears(*linears))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float32 -> [..., out] float32."""
        flat = x.reshape(-1, x.shape[-1]).float()  # [n, in]
        # abs().amax() rather than vector_norm(inf): the same values, 6-12x faster on CPU at
        # 16 to 392 rows (torch 2.13's inf-norm reduction is not vectorised)
        peak = flat.abs().amax(dim=1, keepdim=True).clamp_min_(_TINY)  # [n, 1]
        out = self.linear((flat / peak).contiguous(), self.input_scale, self.input_zero_point, self.packed)
        out = out.mul_(peak) if self.bias is None else torch.addcmul(self.bias, out, peak)  # [n, out]
        return out.reshape(*x.shape[:-1], self.out_features)
