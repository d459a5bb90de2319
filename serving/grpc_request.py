"""Build a V2 gRPC `ModelInferRequest` from a long-format frame (client side).

Pandas codec: `timestamp` as BYTES with content type datetime, text columns as BYTES
(UTF-8), numbers as FP64. MLServer's gRPC parameters carry only bool, int64 and string,
so floats must already be strings in `params` (the runtime coerces them back).
Imports only pandas and MLServer's generated protobufs, so load-test clients stay light.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def infer_request(frame: pd.DataFrame, params: dict[str, bool | int | str], model_name: str = "kronos") -> Any:
    """frame [rows, columns] + params -> `dataplane_pb2.ModelInferRequest`."""
    from mlserver.grpc import dataplane_pb2 as pb

    request = pb.ModelInferRequest(model_name=model_name)
    request.parameters["content_type"].string_param = "pd"
    for name, value in params.items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        elif isinstance(value, int):
            request.parameters[name].int64_param = value
        else:
            request.parameters[name].string_param = value
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
