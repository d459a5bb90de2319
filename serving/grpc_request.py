"""Build a V2 gRPC `ModelInferRequest` from a long-format frame (client side).

Pandas codec: `timestamp` as BYTES with content type datetime, text columns as BYTES
(UTF-8), numbers as FP64. MLServer's gRPC parameters carry only bool, int64 and string,
so `infer_request` sends floats as their shortest exact text and lists as JSON text (the
runtime coerces both back), and leaves None out: the `params` JSON of a response
(`serving.v2.answer_parameters`) can be sent back as it is.
Imports only pandas and MLServer's generated protobufs, so load-test clients stay light.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd


def infer_request(frame: pd.DataFrame, params: dict[str, Any], model_name: str = "kronos") -> Any:
    """frame [rows, columns] + params (bool, int, float, str, list or None) ->
    `dataplane_pb2.ModelInferRequest`."""
    from mlserver.grpc import dataplane_pb2 as pb

    request = pb.ModelInferRequest(model_name=model_name)
    request.parameters["content_type"].string_param = "pd"
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            request.parameters[name].int64_param = value
        elif isinstance(value, (list, tuple)):
            request.parameters[name].string_param = json.dumps(list(value))
        elif isinstance(value, float):  # repr: the shortest text that reads back as the same float
            request.parameters[name].string_param = repr(float(value))
        else:
            request.parameters[name].string_param = str(value)
    for column in frame.columns:
        tensor = request.inputs.add(name=column, shape=[len(frame), 1])
        if column == "timestamp":
            tensor.datatype = "BYTES"
            tensor.parameters["content_type"].string_param = "datetime"
            tensor.contents.bytes_contents.extend(t.isoformat().encode() for t in pd.DatetimeIndex(frame[column]))
        elif frame[column].dtype == object:
            tensor.datatype = "BYTES"
            tensor.parameters["content_type"].string_param = "str"
            tensor.contents.bytes_contents.extend(str(v).encode() for v in frame[column])
        else:
            tensor.datatype = "FP64"
            tensor.contents.fp64_contents.extend(frame[column].astype(float).tolist())
    return request
