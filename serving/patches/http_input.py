"""One ASGI middleware in front of MLServer's REST app: request ids, the binary tensor
extension, and cancellation when the client goes away.

- `X-Request-ID`: the first header wins (duplicates resolve to one); a value that breaks
  the gateway's rule (1-128 of `A-Z a-z 0-9 . _ : -`) is replaced by a generated id. The
  request reaches MLServer with exactly that one header and the response echoes it.
- Binary tensor data (the KServe / Triton HTTP extension that tritonclient uses by
  default): a body whose first `Inference-Header-Content-Length` bytes are the JSON request
  and whose rest are the tensors' bytes is turned into the plain JSON request (BYTES
  elements must be UTF-8). `binary_data_output` and per-output `binary_data` are dropped:
  answers are JSON, which these clients read as well.
- Cancellation: inference routes read the whole body, then watch the connection; when the
  client disconnects before the answer, the request's task is cancelled, which cancels it
  in the worker too (see `workers`), so its series leave generation at the next step.
- Every answer of an inference route is counted (`answers`), cancelled ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import re
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import mlserver.rest.server as rest_server
import numpy as np

from ..logs import current_request_id, well_formed_request_id
from . import answers
from .grpc_input import NUMPY_DTYPES
from .status import log_answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
BINARY_HEADER = b"inference-header-content-length"
INFERENCE_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate)$|^/invocations$")
MAX_BINARY_HEADER_BYTES = 64 << 20
_PATCHED = "__kronos_patched__"


class BadBodyError(ValueError):
    """A request body the binary extension cannot read; answered 400."""


def install() -> None:
    """Wrap MLServer's REST app factory so that every app gets the middleware (idempotent;
    must run before MLServer builds its app)."""
    if getattr(rest_server.create_app, _PATCHED, False):
        return
    original = rest_server.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(KronosHTTPMiddleware)
        return app

    setattr(create_app, _PATCHED, True)
    rest_server.create_app = create_app


class KronosHTTPMiddleware:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = normalise_request_id(scope)
        current_request_id.set(request_id.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                _set_header(message, REQUEST_ID_HEADER, request_id)
            await send(message)

        if scope.get("method") != "POST" or not INFERENCE_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send_with_id)
            return
        opened = answers.begin()
        answered: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(int(message["status"]))
            await send_with_id(message)

        try:
            body, disconnected = await _read_body(receive)
            if disconnected:
                return
            if _header(scope, BINARY_HEADER) is not None:
                try:
                    body = binary_to_json(scope, body)
                except BadBodyError as exc:
                    log_answer(400, str(exc))
                    await _answer_400(send_counted, str(exc))
                    return
            await _run_until_disconnect(self.app, scope, body, receive, send_counted)
        finally:
            answers.finish("rest", opened, answers.outcome_for_status(answered[0] if answered else None))


def normalise_request_id(scope: Scope) -> bytes:
    """Leave exactly one well-formed X-Request-ID header in `scope`; return its value."""
    value = well_formed_request_id(_header(scope, REQUEST_ID_HEADER)).encode()
    _set_header(scope, REQUEST_ID_HEADER, value)
    return value


def _header(holder: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` of a scope (or a response start message)."""
    return next((v for k, v in holder.get("headers", []) if k.lower() == name), None)


def _set_header(holder: Scope | Message, name: bytes, value: bytes | None) -> None:
    """Leave exactly one header `name` (with `value`), or none when `value` is None."""
    headers = [(k, v) for k, v in holder.get("headers", []) if k.lower() != name]
    holder["headers"] = headers if value is None else [*headers, (name, value)]


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected while sending it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def _run_until_disconnect(app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """Run the app on `body`; cancel it when the client disconnects before the answer."""
    delivered = False
    finished = False
    gone = asyncio.Event()

    async def app_receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def app_send(message: Message) -> None:
        nonlocal finished
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished = True
        await send(message)

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    task = asyncio.ensure_future(app(scope, app_receive, app_send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not finished:
            task.cancel()  # the client left: stop its work (and the worker's, see workers)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _answer_400(send: Send, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def binary_to_json(scope: Scope, body: bytes) -> bytes:
    """A binary-extension body as the plain JSON request; `scope`'s headers follow."""
    if (_header(scope, b"content-encoding") or b"").strip().lower() == b"gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise BadBodyError(f"body: not valid gzip ({exc})") from None
        _set_header(scope, b"content-encoding", None)
    raw_size = _header(scope, BINARY_HEADER) or b""
    try:
        header_size = int(raw_size)
    except ValueError:
        raise BadBodyError("Inference-Header-Content-Length: must be an integer") from None
    if not 0 <= header_size <= min(len(body), MAX_BINARY_HEADER_BYTES):
        raise BadBodyError(
            f"Inference-Header-Content-Length: must be between 0 and the body's {len(body)} bytes, got {header_size}"
        )
    try:
        request = json.loads(body[:header_size])
    except (ValueError, RecursionError) as exc:
        raise BadBodyError(f"body: the JSON part is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(request, dict):
        raise BadBodyError("body: the JSON part must be an object")
    offset = header_size
    for index, tensor in enumerate(request.get("inputs") or []):
        if not isinstance(tensor, dict):
            raise BadBodyError(f"inputs[{index}]: must be an object")
        offset = _inline_tensor(index, tensor, body, offset)
    if offset != len(body):
        raise BadBodyError(f"body: {len(body) - offset} bytes of binary data belong to no input")
    parameters = request.get("parameters")
    if isinstance(parameters, dict):
        parameters.pop("binary_data_output", None)
    for output in request.get("outputs") or []:
        if isinstance(output, dict) and isinstance(output.get("parameters"), dict):
            output["parameters"].pop("binary_data", None)
    _set_header(scope, BINARY_HEADER, None)
    _set_header(scope, b"content-type", b"application/json")
    encoded = json.dumps(request).encode()
    _set_header(scope, b"content-length", str(len(encoded)).encode())
    return encoded


def _inline_tensor(index: int, tensor: dict[str, Any], body: bytes, offset: int) -> int:
    """Move input `index`'s binary data (if any) into its JSON `data`; return the next offset."""
    parameters = tensor.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return offset
    where = f"inputs[{index}]"
    size = parameters.pop("binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(body):
        raise BadBodyError(f"{where}.parameters.binary_data_size: must be an integer within the body, got {size!r}")
    chunk = body[offset : offset + size]
    datatype = tensor.get("datatype")
    if datatype == "BYTES":
        tensor["data"] = _bytes_elements(where, chunk)
    elif datatype in NUMPY_DTYPES:
        itemsize = np.dtype(NUMPY_DTYPES[datatype]).itemsize
        if size % itemsize:
            raise BadBodyError(f"{where}: {size} bytes of {datatype} data is not a multiple of {itemsize}")
        values = np.frombuffer(chunk, dtype=NUMPY_DTYPES[datatype]).tolist()
        # JSON has no NaN/inf: they travel as null, which the candle checks refuse by name
        tensor["data"] = [v if not isinstance(v, float) or math.isfinite(v) else None for v in values]
    else:
        raise BadBodyError(f"{where}.datatype: binary data of type {str(datatype)[:16]!r} is not supported")
    return offset + size


def _bytes_elements(where: str, chunk: bytes) -> list[str]:
    """BYTES elements (4-byte little-endian length, then the bytes) as UTF-8 text."""
    elements: list[str] = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise BadBodyError(f"{where}: BYTES element {len(elements)} has a truncated length")
        (size,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + size > len(chunk):
            raise BadBodyError(f"{where}: BYTES element {len(elements)} is longer than its data")
        try:
            elements.append(chunk[offset : offset + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadBodyError(f"{where}: BYTES element {len(elements)} is not valid UTF-8") from None
        offset += size
    return elements
