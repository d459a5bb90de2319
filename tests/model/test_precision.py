"""Reduced precision (`dtype` / KRONOS_DTYPE): int8 packed layers, half-precision models,
float32 unchanged, and the checks that refuse what a device cannot run."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.pyfunc.model import PythonModelContext

from model_package import KronosForecaster
from model_package.forecaster import SamplingParams
from model_package.frames import CANDLE_COLUMNS
from model_package.kronos import Engine, generate, load_model
from model_package.kronos.decoding import Dense, PackedKronos, packed_weights
from model_package.kronos.layers import RotaryEmbedding
from model_package.kronos.precision import (
    PRECISIONS,
    Float32Rotary,
    Int8Dense,
    cache_dtype,
    check_precision,
    cpu_has_native_bf16,
    model_precision,
    set_precision,
)
from model_package.pyfunc import MAX_CONTEXT_KEY, MODEL_ARTIFACT, TOKENIZER_ARTIFACT, KronosPyfuncModel
from model_package.settings import DTYPES, ModelSettings, settings_variables

CONTEXT = 40
# The device tests run on: cpu by default, cuda with KRONOS_TEST_DEVICE=cuda (on a GPU host).
TEST_DEVICE = os.environ.get("KRONOS_TEST_DEVICE", "cpu")
HALF_DTYPES = ["bfloat16", "float16"] if TEST_DEVICE == "cuda" else ["bfloat16"]


def _layers(g: torch.Generator, sizes: tuple[int, ...], n_in: int, bias: bool) -> list[torch.nn.Linear]:
    layers = [torch.nn.Linear(n_in, n, bias=bias) for n in sizes]
    for layer in layers:
        for p in layer.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return layers


def _all_layers(packed: PackedKronos) -> list[object]:
    per_block = [layer for b in packed.blocks for layer in (b.qkv, b.out, b.w13, b.w2)]
    heads = [packed.fusion, packed.s1_head, packed.s2_head, packed.dep_q, packed.dep_kv, packed.dep_out]
    return per_block + heads


def _generated(forecaster: KronosForecaster, history: pd.DataFrame, pred_len: int) -> tuple:
    """Greedy generation: (s1, s2) [pred_len] generated tokens of the first series, its frame."""
    request = forecaster.prepare(history, SamplingParams(pred_len=pred_len, top_k=1, seed=0))
    outputs, _ = generate(forecaster.tokenizer, forecaster.model, request.inputs, forecaster.max_context)
    out = outputs[0]
    assert out is not None
    return out.window_s1[0, -pred_len:], out.window_s2[0, -pred_len:], forecaster.finish(request, outputs).frame


# -- the int8 layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 16, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_dense_is_close_to_the_float32_dense(rows, bias):
    g = torch.Generator().manual_seed(rows)
    layers = _layers(g, (96, 32), 64, bias)
    x = torch.randn(rows, 1, 64, generator=g)
    want = Dense.of(*layers)(x)  # [rows, 1, 128]
    got = Int8Dense.of(*layers)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    error = (got - want).abs()
    # 8-bit weights and activations: about 1% of the output range, far from float32 equality
    assert float(error.max()) <= 0.03 * float(want.abs().max())
    assert float(error.mean()) <= 0.01 * float(want.abs().mean()) + 1e-3
    assert not torch.equal(got, want)


def test_int8_dense_handles_an_all_zero_output_channel():
    layer = torch.nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight[2] = 0
    x = torch.randn(5, 16)
    got = Int8Dense.of(layer)(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 2], layer.bias[2].detach().expand(5))


# -- the precision of a model -----------------------------------------------------------------


def test_packed_weights_are_rebuilt_when_the_precision_changes(tiny_checkpoints):
    model = load_model(tiny_checkpoints[1])
    first = packed_weights(model)
    assert packed_weights(model) is first and first.precision == "float32"
    h = torch.randn(3, model.config.d_model)
    logits = first.s1_logits(h)
    set_precision(model, "int8")
    quantized = packed_weights(model)
    assert quantized is not first and quantized.precision == "int8" and model_precision(model) == "int8"
    assert all(isinstance(layer, Int8Dense) for layer in _all_layers(quantized))
    assert packed_weights(model) is quantized  # cached while nothing changes
    assert next(model.parameters()).dtype == torch.float32  # int8 keeps the module weights
    set_precision(model, "float32")
    again = packed_weights(model)
    assert again is not quantized and all(isinstance(layer, Dense) for layer in _all_layers(again))
    assert torch.equal(again.s1_logits(h), logits)


def test_float32_stays_bit_identical(tiny_checkpoints, candles):
    """dtype="float32" (the default) changes nothing: the same tokens and prices as a model
    that never went through set_precision, and again after a round trip through int8."""
    history = pd.concat([candles(30, seed=1, series_id="A"), candles(55, seed=2, series_id="B")])
    plain = load_model(tiny_checkpoints[1])
    inputs = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu")
    request = inputs.prepare(history, SamplingParams(pred_len=12, sample_count=3, seed=5))
    want, _ = generate(inputs.tokenizer, plain, request.inputs, CONTEXT)
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype="float32")
    assert forecaster.describe()["dtype"] == "float32"
    got, _ = generate(forecaster.tokenizer, forecaster.model, request.inputs, CONTEXT)
    set_precision(forecaster.model, "int8")
    generate(forecaster.tokenizer, forecaster.model, request.inputs, CONTEXT)
    set_precision(forecaster.model, "float32")
    back, _ = generate(forecaster.tokenizer, forecaster.model, request.inputs, CONTEXT)
    for w, g, b in zip(want, got, back, strict=True):
        assert w is not None and g is not None and b is not None
        assert torch.equal(w.window_s1, g.window_s1) and torch.equal(w.window_s2, g.window_s2)
        assert torch.equal(w.paths, g.paths) and torch.equal(w.paths, b.paths)


def test_int8_forecaster_runs_close_to_float32(tiny_checkpoints, candles):
    f32 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu")
    int8 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype="int8")
    assert int8.describe()["dtype"] == "int8"
    assert isinstance(packed_weights(int8.model).s1_head, Int8Dense)
    agree, rel = [], []
    for seed in range(6):
        history = candles(35, seed=seed)
        s1, s2, frame = _generated(f32, history, 16)
        q1, q2, qframe = _generated(int8, history, 16)
        assert np.isfinite(qframe[list(CANDLE_COLUMNS)].to_numpy()).all()
        assert (qframe.timestamp == frame.timestamp).all()
        agree.append(float(((q1 == s1) & (q2 == s2)).float().mean()))
        rel.append(np.abs(qframe.close.to_numpy() - frame.close.to_numpy()) / frame.close.to_numpy())
    # Greedy tokens mostly agree; once a path differs it stays different, and a random tiny
    # model has small logit margins (the trained demo model agrees on 98%: PERFORMANCE.md).
    assert np.mean(agree) >= 0.5
    assert float(np.median(np.concatenate(rel))) < 0.05


def test_int8_prefill_and_window_recomputes_run_the_int8_layers(tiny_checkpoints, candles):
    """The engine's long passes (a series' prefill, an exact window recompute) go through the
    int8 layers too: close to float32's, not equal to it, and float32 stays bit-identical."""
    f32 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu")
    int8 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype="int8")
    series = f32.prepare(candles(45, seed=4), SamplingParams(pred_len=6, top_k=1, seed=0)).inputs
    hidden, tokens = {}, {}
    for name, forecaster in (("float32", f32), ("int8", int8)):
        engine = Engine(forecaster.tokenizer, forecaster.model, CONTEXT)
        engine.add(series)
        (lane,) = engine.lanes.values()
        prefill = lane.h_last[lane.live].clone()  # [1, d] after the prefill of the last 40 candles
        engine.step()  # 45 + 1 > 40: the step recomputes the window, ending at the new token
        (window,) = engine.windows
        hidden[name] = (prefill, window.h_last.clone())
        tokens[name] = (engine.table.tok1[window.row_ids, CONTEXT], engine.table.tok2[window.row_ids, CONTEXT])
    # The same first token: both windows hold the same tokens.
    assert all(torch.equal(f, q) for f, q in zip(tokens["float32"], tokens["int8"], strict=True))
    for f, q in zip(hidden["float32"], hidden["int8"], strict=True):
        assert not torch.equal(f, q)
        assert float((f - q).norm() / f.norm()) < 0.1
    outputs, _ = generate(f32.tokenizer, f32.model, series, CONTEXT)
    again, _ = generate(f32.tokenizer, f32.model, series, CONTEXT)
    assert outputs[0] is not None and again[0] is not None
    assert torch.equal(outputs[0].window_s1, again[0].window_s1)


def test_int8_gives_a_series_the_same_tokens_alone_or_batched(tiny_checkpoints, candles):
    """Each int8 activation row is quantized on its own scale: series of different lengths,
    paths and settings generate together exactly what each generates alone (prefill,
    steps and exact window recomputes included)."""
    int8 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype="int8")
    specs = [(20, 1, 1), (38, 3, 0), (45, 1, 1), (60, 2, 0)]  # history, paths, top_k (0: sampled)
    series = [
        int8.prepare(
            candles(length, seed=i), SamplingParams(pred_len=8, sample_count=paths, top_k=top_k, seed=i)
        ).inputs[0]
        for i, (length, paths, top_k) in enumerate(specs)
    ]
    together, _ = generate(int8.tokenizer, int8.model, series, CONTEXT)
    for s, batched in zip(series, together, strict=True):
        (alone,), _ = generate(int8.tokenizer, int8.model, [s], CONTEXT)
        assert alone is not None and batched is not None
        assert torch.equal(alone.window_s1, batched.window_s1) and torch.equal(alone.window_s2, batched.window_s2)


@pytest.mark.parametrize("dtype", ["float32", "int8", "bfloat16"])
def test_the_lanes_keep_their_caches_in_the_cache_dtype(tiny_checkpoints, candles, dtype):
    """float32 and bfloat16 lanes cache in the model's dtype; int8 lanes in bfloat16 where the
    CPU multiplies it natively (half the bytes a step's attention reads), float32 elsewhere.
    The hidden states stay in the model's dtype, and the int8 step still works."""
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if want is None:
        want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert cache_dtype(dtype, "cpu") == want
    forecaster = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype=dtype)
    series = forecaster.prepare(candles(30, seed=3), SamplingParams(pred_len=4, sample_count=2, top_k=0, seed=1))
    engine = Engine(forecaster.tokenizer, forecaster.model, CONTEXT)
    engine.add(series.inputs)
    (lane,) = engine.lanes.values()
    assert {t.dtype for t in (*lane.prefix_k, *lane.suffix_v)} == {want}
    assert lane.h_last.dtype == next(forecaster.model.parameters()).dtype
    while not engine.idle:
        engine.step()
    assert engine.stats.incremental_steps == 3


def test_int8_leaves_the_reference_mode_in_float32(tiny_checkpoints, candles):
    """The reference mode (upstream's loop of full-window passes, no packed layers) gives
    exactly float32's result under int8."""
    history = candles(25, seed=6)
    f32 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", mode="reference")
    int8 = KronosForecaster.from_pretrained(
        *tiny_checkpoints, max_context=CONTEXT, device="cpu", mode="reference", dtype="int8"
    )
    pd.testing.assert_frame_equal(
        f32.predict(history, pred_len=6, sample_count=2, seed=3),
        int8.predict(history, pred_len=6, sample_count=2, seed=3),
    )


def test_bfloat16_on_cpu_runs_in_bfloat16_with_float32_rotary_and_tokenizer(tiny_checkpoints, candles):
    """The half-precision path, on the CPU (slow there without native bfloat16, but it runs):
    the predictor and its caches in bfloat16, rotary angles from float32, tokenizer float32."""
    forecaster = KronosForecaster.from_pretrained(
        *tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype="bfloat16"
    )
    model = forecaster.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in forecaster.tokenizer.parameters()} == {torch.float32}
    assert isinstance(model.rotary, Float32Rotary) and model.rotary.inv_freq.dtype == torch.float32
    s1, s2, frame = _generated(forecaster, candles(50, seed=7), 14)  # 50 + 14 > 40: the window slides
    assert len(s1) == len(s2) == 14 and np.isfinite(frame[list(CANDLE_COLUMNS)].to_numpy()).all()
    assert packed_weights(model).s1_logits(torch.zeros(2, model.config.d_model, dtype=torch.bfloat16)).dtype == (
        torch.float32
    )
    set_precision(model, "float32")  # back: float32 weights (rounded) and the plain rotary
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert type(model.rotary) is RotaryEmbedding


def test_float32_rotary_keeps_positions_exact():
    """bfloat16 cannot hold position 391 (it rounds to 392); the angles are float32 first."""
    positions = torch.arange(380, 400)
    plain = RotaryEmbedding(16)
    cos, sin = plain.cos_sin(positions)
    half = Float32Rotary(16, torch.bfloat16, torch.device("cpu")).to(torch.bfloat16)  # the cast keeps inv_freq
    assert half.inv_freq.dtype == torch.float32
    hcos, hsin = half.cos_sin(positions)
    assert hcos.dtype == torch.bfloat16
    assert torch.equal(hcos, cos.to(torch.bfloat16)) and torch.equal(hsin, sin.to(torch.bfloat16))


# -- what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "device", "message"),
    [
        ("float16", "cpu", "dtype=float16 needs a CUDA device"),
        ("int8", "cuda", "dtype=int8 runs on cpu only"),
        ("int4", "cpu", "dtype must be one of float32, bfloat16, float16, int8, got 'int4'"),
        (None, "cpu", "dtype must be one of"),
    ],
)
def test_precisions_a_device_cannot_run_are_refused(dtype, device, message):
    with pytest.raises(ValueError, match=message):
        check_precision(dtype, device)


def test_forecaster_refuses_a_bad_dtype_before_loading(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="dtype=float16 needs a CUDA device"):
        KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="^dtype must be one of"):  # before the (missing) weights are read
        KronosForecaster.from_pretrained(tmp_path / "none", tmp_path / "none", device="cpu", dtype="fp8")
    model = load_model(tiny_checkpoints[1])
    with pytest.raises(ValueError, match="MY_DTYPE=float16"):
        set_precision(model, "float16", "MY_DTYPE")
    assert model_precision(model) == "float32"


def test_settings_read_kronos_dtype(monkeypatch):
    assert DTYPES == PRECISIONS
    assert "KRONOS_DTYPE" in settings_variables(ModelSettings)
    monkeypatch.delenv("KRONOS_DTYPE", raising=False)
    assert ModelSettings().dtype == "float32"
    monkeypatch.setenv("KRONOS_DTYPE", " BFloat16 ")
    assert ModelSettings().dtype == "bfloat16"
    monkeypatch.setenv("KRONOS_DTYPE", "half")
    with pytest.raises(ValueError, match="KRONOS_DTYPE must be one of float32, bfloat16, float16, int8, got 'half'"):
        ModelSettings()


def _context(tiny_checkpoints) -> PythonModelContext:
    tokenizer, model = tiny_checkpoints
    artifacts = {TOKENIZER_ARTIFACT: str(tokenizer), MODEL_ARTIFACT: str(model)}
    return PythonModelContext(artifacts=artifacts, model_config={MAX_CONTEXT_KEY: CONTEXT})


def test_pyfunc_loads_with_kronos_dtype(tiny_checkpoints, candles, monkeypatch):
    monkeypatch.setenv("KRONOS_DEVICE", "cpu")
    monkeypatch.setenv("KRONOS_DTYPE", "int8")
    python_model = KronosPyfuncModel()
    python_model.load_context(_context(tiny_checkpoints))
    assert python_model.forecaster.dtype == "int8" and model_precision(python_model.forecaster.model) == "int8"
    frame = python_model.predict(None, candles(20, seed=8), {"pred_len": 3, "top_k": 1})  # type: ignore[arg-type]
    assert len(frame) == 3 and np.isfinite(frame.close).all()


def test_pyfunc_refuses_a_dtype_the_device_cannot_run(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("KRONOS_DEVICE", "cpu")
    monkeypatch.setenv("KRONOS_DTYPE", "float16")
    with pytest.raises(ValueError, match="KRONOS_DTYPE=float16 needs a CUDA device"):
        KronosPyfuncModel().load_context(_context(tiny_checkpoints))


# -- GPU --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_on_the_test_device_runs_close_to_float32(tiny_checkpoints, candles, dtype):
    history = candles(35, seed=9)
    f32 = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device=TEST_DEVICE)
    half = KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device=TEST_DEVICE, dtype=dtype)
    assert next(half.model.parameters()).dtype == getattr(torch, dtype)
    s1, s2, frame = _generated(f32, history, 16)
    h1, h2, hframe = _generated(half, history, 16)
    assert np.isfinite(hframe[list(CANDLE_COLUMNS)].to_numpy()).all()
    assert float((h1 == s1).float().mean()) >= 0.5 and float((h2 == s2).float().mean()) >= 0.5


def test_the_test_device_refuses_the_dtype_it_cannot_run(tiny_checkpoints):
    dtype, rule = ("int8", "dtype=int8 runs on cpu only") if TEST_DEVICE == "cuda" else ("float16", "needs a CUDA")
    with pytest.raises(ValueError, match=rule):
        KronosForecaster.from_pretrained(*tiny_checkpoints, max_context=CONTEXT, device=TEST_DEVICE, dtype=dtype)
