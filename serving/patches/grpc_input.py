"""gRPC requests read strictly: every parameter form standard clients send, and tensors
whose contents match their datatype and shape.

MLServer's `InferParameter` knows bool_param (1), int64_param (2) and string_param (3);
the KServe / Triton protocol also has double_param (4) and uint64_param (5), which standard
clients such as tritonclient use for floats and large integers. Protobuf keeps such fields
of an older schema as unknown fields, and MLServer's converter then drops them silently
(`temperature` 0.05 and 5.0 gave the same forecast). Here they are read back (field 4 as a
little-endian IEEE double, field 5 as an unsigned varint), and any other form is refused
with INVALID_ARGUMENT naming the parameter.

Metadata: when a key comes more than once (two `x-request-id` entries, say), the first
value wins, as for REST headers (MLServer kept the last); a malformed `x-request-id` is
replaced by a generated one, and the id is known to every log line of the call.

Tensors: the contents field must be the one of the declared datatype (FP32 data sent in
fp64_contents is refused, not reinterpreted), raw contents must have exactly the bytes the
shape and datatype need (BYTES: 4-byte lengths that fit), and raw contents come for every
input or none.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet
from mlserver.errors import MLServerError
from mlserver.grpc import converters, servicers
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.types import Datatype
from mlserver.utils import insert_headers

from ..logs import REQUEST_ID_HEADER, current_request_id, well_formed_request_id

DOUBLE_PARAM_FIELD = 4
UINT64_PARAM_FIELD = 5
_FIXED64, _VARINT = 1, 0
# V2 numeric datatypes as little-endian numpy dtypes (raw contents and binary tensor data)
NUMPY_DTYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
_PATCHED = "__kronos_patched__"


class InvalidGrpcRequestError(MLServerError):
    """400 / INVALID_ARGUMENT: a gRPC request field the server cannot read."""


def install() -> None:
    """Replace MLServer's request conversion with the strict one (idempotent)."""
    if getattr(converters.ModelInferRequestConverter, _PATCHED, False):
        return
    original = converters.ModelInferRequestConverter.to_types.__func__

    def to_types(cls: type, pb_object: pb.ModelInferRequest) -> Any:
        check_request(pb_object)
        return original(cls, pb_object)

    converters.ModelInferRequestConverter.to_types = classmethod(to_types)
    converters.ParametersConverter.to_types = classmethod(lambda cls, pb_object: parameters(pb_object))
    servicers.InferenceServicer._InsertHeaders = _insert_headers  # noqa: SLF001
    setattr(converters.ModelInferRequestConverter, _PATCHED, True)


def first_headers(context: Any) -> dict[str, str]:
    """The call's invocation metadata as headers; a repeated key keeps its first value, and
    `x-request-id` is always present and well formed."""
    headers: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        headers.setdefault(item.key, item.value)
    headers[REQUEST_ID_HEADER] = well_formed_request_id(headers.get(REQUEST_ID_HEADER))
    current_request_id.set(headers[REQUEST_ID_HEADER])
    return headers


def _insert_headers(self: Any, request: pb.ModelInferRequest, context: Any) -> Any:
    """MLServer's request conversion for ModelInfer, with the headers read first (so that
    a refusal of the request's fields is logged with its id)."""
    headers = first_headers(context)
    payload = converters.ModelInferRequestConverter.to_types(request)
    insert_headers(payload, headers)
    return payload


def parameter_value(name: str, parameter: pb.InferParameter) -> Any:
    """The value of one InferParameter, whichever of the five protocol fields carries it."""
    unknown = list(UnknownFieldSet(parameter))
    if unknown:
        if parameter.WhichOneof("parameter_choice") is not None or len(unknown) > 1:
            raise InvalidGrpcRequestError(f"parameters.{name}: must carry exactly one value")
        field = unknown[0]
        if field.field_number == DOUBLE_PARAM_FIELD and field.wire_type == _FIXED64:
            return struct.unpack("<d", struct.pack("<Q", field.data))[0]
        if field.field_number == UINT64_PARAM_FIELD and field.wire_type == _VARINT:
            return int(field.data)
        raise InvalidGrpcRequestError(
            f"parameters.{name}: unsupported parameter field {field.field_number} (supported: "
            "bool_param, int64_param, string_param, double_param, uint64_param)"
        )
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters(pb_object: Mapping[str, pb.InferParameter]) -> Any:
    """MLServer's `Parameters` from a protobuf parameter map (None when empty)."""
    from mlserver import types

    if not pb_object:
        return None
    return types.Parameters(**{key: parameter_value(key, value) for key, value in pb_object.items()})


def check_request(request: pb.ModelInferRequest) -> None:
    """Refuse tensors whose contents disagree with their datatype or shape."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidGrpcRequestError(
            f"raw_input_contents: {len(raw)} buffers for {len(request.inputs)} "
            "inputs (raw contents come for every input or none)"
        )
    for index, tensor in enumerate(request.inputs):
        name = f"inputs[{index}] ({tensor.name!r})" if tensor.name else f"inputs[{index}]"
        try:
            datatype = Datatype(tensor.datatype)
        except ValueError:
            raise InvalidGrpcRequestError(f"{name}.datatype: unknown datatype {tensor.datatype[:32]!r}") from None
        if any(dim < 0 for dim in tensor.shape):
            raise InvalidGrpcRequestError(f"{name}.shape: dimensions must be >= 0, got {list(tensor.shape)}")
        elements = 1
        for dim in tensor.shape:
            elements *= dim
        if raw:
            if tensor.contents.ListFields():
                raise InvalidGrpcRequestError(f"{name}: contents and raw_input_contents both given")
            _check_raw(name, datatype, elements, raw[index])
            continue
        expected = converters._FIELDS[datatype]  # noqa: SLF001 - MLServer's datatype -> field map
        present = [field.name for field, _ in tensor.contents.ListFields()]
        wrong = [field for field in present if field != expected]
        if wrong:
            raise InvalidGrpcRequestError(
                f"{name}.contents: datatype {datatype.value} travels in {expected}, got {', '.join(wrong)}"
            )


def _check_raw(name: str, datatype: Datatype, elements: int, buffer: bytes) -> None:
    if datatype == Datatype.BYTES:
        offset, count = 0, 0
        while offset < len(buffer):
            if offset + 4 > len(buffer):
                raise InvalidGrpcRequestError(f"{name}: raw BYTES element {count} has a truncated length")
            (size,) = struct.unpack_from("<I", buffer, offset)
            offset += 4 + size
            if offset > len(buffer):
                raise InvalidGrpcRequestError(f"{name}: raw BYTES element {count} is longer than its buffer")
            count += 1
        if count != elements:
            raise InvalidGrpcRequestError(f"{name}: raw contents hold {count} BYTES elements, shape needs {elements}")
        return
    itemsize = np.dtype(NUMPY_DTYPES[datatype.value]).itemsize
    if len(buffer) != elements * itemsize:
        raise InvalidGrpcRequestError(
            f"{name}: raw contents have {len(buffer)} bytes, shape and {datatype.value} need {elements * itemsize}"
        )
