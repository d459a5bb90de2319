"""Every inference answer counted in MLServer's main process (`kronos_answers_total`).

The transports open an answer (REST: `http_input`'s middleware for inference routes; gRPC:
`ModelInfer` and every message of `ModelStreamInfer`), the dispatcher (`workers`) records
the outcome when a worker was asked, and the transport counts the answer once it is given.
Answers given without a worker's outcome (an unknown model, a body MLServer cannot read)
take the outcome of their status. Outcomes are the runtime's (`serving.metrics.OUTCOMES`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import grpc
from mlserver.grpc import servicers

from ..server_metrics import server_metrics

# One mutable holder per answer: FastAPI may run the route in a child task (a copied
# context), so the dispatcher writes into the object the transport created.
_current: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("kronos_answer", default=None)
_PATCHED = "__kronos_answers_patched__"

GRPC_OUTCOMES = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "invalid",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.CANCELLED: "cancelled",
}


def outcome_for_status(http_status: int | None) -> str:
    """The outcome an HTTP status stands for when nothing more is known."""
    if http_status is None or http_status == 499:
        return "cancelled"  # no answer reached the client
    if http_status < 400:
        return "ok"
    if http_status == 503:
        return "unavailable"
    if http_status == 504:
        return "timeout"
    return "invalid" if http_status < 500 else "error"


def begin() -> tuple[dict[str, str], contextvars.Token]:
    """Open an answer in the current context."""
    holder: dict[str, str] = {}
    return holder, _current.set(holder)


def record(outcome: str) -> None:
    """The outcome of the answer being given in this context (the first one counts)."""
    holder = _current.get()
    if holder is not None:
        holder.setdefault("outcome", outcome)


def finish(protocol: str, opened: tuple[dict[str, str], contextvars.Token], fallback: str) -> None:
    """Count the answer opened by `begin` (its recorded outcome, else `fallback`)."""
    holder, token = opened
    _current.reset(token)
    server_metrics().answered(protocol, holder.get("outcome", fallback))


def _grpc_outcome(context: Any, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio: no code() on the servicer side
        code = None
    return GRPC_OUTCOMES.get(code, "error")


def install() -> None:
    """Count gRPC inference answers (REST: `http_input` calls begin/finish) (idempotent)."""
    servicer = servicers.InferenceServicer
    if getattr(servicer, _PATCHED, False):
        return
    original_infer = servicer.ModelInfer
    original_stream = servicer.ModelStreamInfer

    async def model_infer(self: Any, request: Any, context: Any) -> Any:
        opened = begin()
        try:
            result = await original_infer(self, request, context)
        except BaseException as exc:
            finish("grpc", opened, _grpc_outcome(context, exc))
            raise
        finish("grpc", opened, "ok")
        return result

    async def model_stream_infer(self: Any, requests: Any, context: Any) -> AsyncIterator[Any]:
        opened = begin()
        try:
            async for response in original_stream(self, requests, context):
                finish("grpc", opened, "ok")
                yield response
                opened = begin()
        except BaseException as exc:
            finish("grpc", opened, _grpc_outcome(context, exc))
            raise
        _current.reset(opened[1])  # the stream ended: no answer was pending

    servicer.ModelInfer = model_infer
    servicer.ModelStreamInfer = model_stream_infer
    setattr(servicer, _PATCHED, True)
