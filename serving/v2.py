"""V2 (Open Inference Protocol) requests <-> the pyfunc's long-format frames.

Inputs are pandas-codec columns (`series_id`, `timestamp`, `open`...); request-level
parameters are the sampling params plus the serving param `timeout_s`. Every tensor is
checked before the codec sees it: a known column name, a shape whose element count is the
data's, elements of the declared datatype (numbers for FP*, integers for INT*/UINT*,
booleans for BOOL, UTF-8 text for BYTES), one row count for all columns, and timestamps as
text. gRPC floats may arrive as double_param or as strings (`serving.patches.grpc_input`);
the pyfunc's coercion (`model_package.pyfunc.sampling_params`) turns them into numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pandas as pd
from mlserver.codecs import PandasCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters, RequestInput

from model_package import KronosInputError
from model_package.frames import CANDLE_COLUMNS, SERIES_ID, TIMESTAMP

TIMEOUT_PARAM = "timeout_s"
INT64_MAX = 2**63 - 1
INPUT_NAMES = (SERIES_ID, TIMESTAMP, *CANDLE_COLUMNS)
TEXT_INPUTS = (SERIES_ID, TIMESTAMP)
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


def request_frame(payload: InferenceRequest) -> pd.DataFrame:
    """The history frame of a V2 request (BYTES cells decoded as UTF-8 text)."""
    if not payload.inputs:
        raise KronosInputError("inputs", "the request has no input columns")
    names = [i.name for i in payload.inputs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise KronosInputError(", ".join(duplicated)[:200], "input given more than once")
    lengths = {tensor.name: check_tensor(tensor) for tensor in payload.inputs}
    if len(set(lengths.values())) > 1:
        raise KronosInputError("inputs", f"columns must have the same length, got {lengths}")
    try:
        frame = PandasCodec.decode_request(payload)
    except Exception as exc:  # the codec raises many kinds for malformed data
        raise KronosInputError("inputs", f"not decodable as a pandas-codec table ({str(exc)[:200]})") from exc
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(_text)
    return frame


def check_tensor(tensor: RequestInput) -> int:
    """Check one input tensor; return its element count."""
    name = tensor.name
    if name not in INPUT_NAMES:
        raise KronosInputError(f"inputs.{name[:64]}", f"unknown input (known: {', '.join(INPUT_NAMES)})")
    shape = list(tensor.shape)
    if not shape or any(dim < 0 for dim in shape) or any(dim != 1 for dim in shape[1:]):
        raise KronosInputError(f"inputs.{name}.shape", f"must be [rows] or [rows, 1], got {shape}")
    datatype = str(getattr(tensor.datatype, "value", tensor.datatype))
    if name in TEXT_INPUTS and datatype != "BYTES":
        raise KronosInputError(
            f"inputs.{name}.datatype", f"must be BYTES (text; timestamps as ISO-8601), got {datatype}"
        )
    if name not in TEXT_INPUTS and datatype not in _FLOAT_TYPES | _INT_TYPES:
        raise KronosInputError(f"inputs.{name}.datatype", f"must be a number type (FP64, FP32...), got {datatype}")
    count = 0
    for index, element in enumerate(_elements(tensor.data.root if tensor.data is not None else [])):
        _check_element(name, datatype, index, element)
        count += 1
    if count != math.prod(shape):
        raise KronosInputError(
            f"inputs.{name}.shape", f"{shape} holds {math.prod(shape)} elements but data has {count}"
        )
    return count


def _elements(data: Any) -> Iterator[Any]:
    """The elements of (possibly nested) tensor data, row-major."""
    if isinstance(data, (list, tuple)):
        for item in data:
            yield from _elements(item)
    else:
        yield data


def _check_element(name: str, datatype: str, index: int, value: Any) -> None:
    where = f"inputs.{name}"
    if datatype == "BYTES":
        if isinstance(value, (bytes, bytearray)):
            try:
                bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise KronosInputError(where, f"element {index} is not valid UTF-8") from None
        elif not isinstance(value, str):
            raise KronosInputError(where, f"BYTES element {index} must be text, got {type(value).__name__}")
    elif datatype in _FLOAT_TYPES:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise KronosInputError(where, f"{datatype} element {index} must be a number, got {type(value).__name__}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise KronosInputError(where, f"{datatype} element {index} must be an integer, got {type(value).__name__}")


def _text(value: object) -> object:
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def request_params(payload: InferenceRequest) -> dict[str, Any]:
    """Request-level parameters without the V2 transport keys."""
    if payload.parameters is None:
        return {}
    return dict(payload.parameters.model_extra or {})


def pop_timeout(params: dict[str, Any], default_s: float) -> float:
    """Remove `timeout_s` from params; the deadline is min(default, client's value)."""
    value = params.pop(TIMEOUT_PARAM, None)
    if value is None or value == "":
        return default_s
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise KronosInputError(TIMEOUT_PARAM, f"must be a number of seconds > 0, got {str(value)[:40]!r}")
    return min(seconds, default_s)


def response(
    model_name: str,
    frame: pd.DataFrame,
    parameters: dict[str, Any],
    request_id: str | None = None,
    outputs: list[str] | None = None,
) -> InferenceResponse:
    """A V2 response: one output per forecast column (only `outputs` when the request named
    some); timestamps as ISO-8601 text."""
    frame = frame.copy()
    if outputs:
        unknown = [name for name in outputs if name not in frame.columns]
        if unknown:
            raise KronosInputError(
                "outputs", f"unknown output(s) {unknown[:8]} (available: {', '.join(map(str, frame.columns))})"
            )
        frame = frame[list(dict.fromkeys(outputs))]
    if TIMESTAMP in frame.columns:
        frame[TIMESTAMP] = [t.isoformat() for t in pd.DatetimeIndex(frame[TIMESTAMP])]
    result = PandasCodec.encode_response(model_name, frame)  # BYTES as bytes (gRPC needs them)
    for output in result.outputs:
        if output.name == TIMESTAMP:
            output.parameters = Parameters(content_type="datetime")
    result.parameters = Parameters(content_type=PandasCodec.ContentType, **parameters)
    result.id = request_id
    return result


def answer_parameters(facts: dict[str, Any]) -> dict[str, Any]:
    """Response parameters that make an answer replayable, from the forecast's answer facts
    (`KronosForecaster.answer_facts`): `seed` (the base seed used: an integer, or its
    decimal text above 2**63 - 1, which gRPC's int64 parameters cannot carry), `params`
    (every sampling param used, seed included, as JSON text: gRPC parameters are flat),
    `weights_digest` and `tokenizer_digest` (sha256 of the weights files; left out when
    unknown). Sending `json.loads(params)` back as the parameters of the same request to
    the same version gives the same answer."""
    seed = int(facts["seed"])
    parameters: dict[str, Any] = {
        "seed": seed if seed <= INT64_MAX else str(seed),
        "params": json.dumps(facts["params"], sort_keys=True, separators=(",", ":")),
    }
    for key in ("weights_digest", "tokenizer_digest"):
        if facts.get(key):
            parameters[key] = facts[key]
    return parameters
