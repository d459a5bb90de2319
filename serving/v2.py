"""V2 (Open Inference Protocol) requests <-> the pyfunc's long-format frames.

Inputs are pandas-codec columns (`series_id`, `timestamp`, `open`...); request-level
parameters are the sampling params plus the serving param `timeout_s`. gRPC carries
only bool/int64/string parameters, so floats arrive as strings: the pyfunc's coercion
(`model_package.pyfunc.sampling_params`) turns them back into numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from mlserver.codecs import PandasCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters

from model_package import KronosInputError
from model_package.frames import TIMESTAMP

TIMEOUT_PARAM = "timeout_s"


def request_frame(payload: InferenceRequest) -> pd.DataFrame:
    """The history frame of a V2 request (bytes cells decoded as UTF-8 text)."""
    if not payload.inputs:
        raise KronosInputError("inputs", "the request has no input columns")
    names = [i.name for i in payload.inputs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise KronosInputError(", ".join(duplicated), "input given more than once")
    lengths = {i.name: int(np.prod(i.shape)) for i in payload.inputs}
    if len(set(lengths.values())) > 1:
        raise KronosInputError("inputs", f"columns must have the same length, got {lengths}")
    try:
        frame = PandasCodec.decode_request(payload)
    except Exception as exc:  # the codec raises many kinds for malformed data
        raise KronosInputError("inputs", f"not decodable as a pandas-codec table ({exc})") from exc
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(_text)
    return frame


def _text(value: object) -> object:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


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
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise KronosInputError(TIMEOUT_PARAM, f"must be a number of seconds > 0, got {value!r}")
    return min(seconds, default_s)


def response(model_name: str, frame: pd.DataFrame, parameters: dict[str, Any],
             request_id: str | None = None) -> InferenceResponse:
    """A V2 response: one output per forecast column; timestamps as ISO-8601 text."""
    frame = frame.copy()
    if TIMESTAMP in frame.columns:
        frame[TIMESTAMP] = [t.isoformat() for t in pd.DatetimeIndex(frame[TIMESTAMP])]
    result = PandasCodec.encode_response(model_name, frame)  # BYTES as bytes (gRPC needs them)
    for output in result.outputs:
        if output.name == TIMESTAMP:
            output.parameters = Parameters(content_type="datetime")
    result.parameters = Parameters(content_type=PandasCodec.ContentType, **parameters)
    result.id = request_id
    return result
