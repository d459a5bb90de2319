"""Requests that MLServer hands to its inference worker process: cancellation, clean errors,
streams.

- Cancellation: when the task awaiting a request in the main process is cancelled (a REST
  client disconnected, see `http_input`; a gRPC call was cancelled or its deadline passed),
  MLServer 1.7.1 forgets the request but the worker keeps running it. Here the main process
  then sends the worker a cancel message naming the request, and the worker cancels the
  task running it: the runtime's batcher drops its series at the next generation step.
  Answers that arrive for a request nobody waits for any more are ignored (MLServer's
  response loop would crash on them).
- Errors: the worker answers a client-side error (4xx, 503, 504) with its own message and
  status (MLServer prefixes the Python class path) and logs no traceback for it (the
  runtime logs the request as one line); other errors keep their traceback.
- Streams: `ModelStreamInfer` (gRPC) sends several requests on one call; MLServer answers
  only the first. Every request of the stream gets its answer, in order.
- Metadata: asked from the worker every time (MLServer cached the first answer, which
  named the old version after an alias-poll swap).
- Dispatch: only to workers in rotation (see `availability`); the outcome of every call is
  recorded for `kronos_answers_total` (see `answers`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from mlserver.context import model_context
from mlserver.errors import InferenceError, MLServerError
from mlserver.parallel import dispatcher, worker
from mlserver.parallel.errors import WorkerError, WorkerStop
from mlserver.parallel.messages import ModelRequestMessage, ModelResponseMessage
from mlserver.parallel.model import ParallelModel
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse

from . import answers
from .availability import WorkerUnavailableError, next_worker, unavailable
from .status import RelayedError, is_client_side

CANCEL_METHOD = "__kronos_cancel__"
logger = logging.getLogger("kronos.serving.worker")
# worker process: request message id -> the task running it
_running: dict[str, asyncio.Task] = {}
_PATCHED = "__kronos_patched__"


def install() -> None:
    """Patch MLServer's dispatcher (main process) and worker (idempotent)."""
    if getattr(dispatcher.Dispatcher, _PATCHED, False):
        return
    dispatcher.Dispatcher.dispatch_request = dispatch_request
    original_resolve = dispatcher.AsyncResponses.resolve

    def resolve(self: dispatcher.AsyncResponses, response: ModelResponseMessage) -> None:
        if response.id not in self._futures:  # noqa: SLF001 - abandoned or a cancel's answer
            return
        original_resolve(self, response)

    dispatcher.AsyncResponses.resolve = resolve
    worker.Worker._process_request = process_request  # noqa: SLF001
    ParallelModel.predict_stream = predict_stream
    ParallelModel.metadata = metadata
    setattr(dispatcher.Dispatcher, _PATCHED, True)


async def dispatch_request(self: dispatcher.Dispatcher, request_message: ModelRequestMessage) -> ModelResponseMessage:
    """MLServer's round-robin dispatch over the workers in rotation (503 when none is, or
    when the worker dies under the request), a cancel message when the caller gives up,
    and the outcome recorded for `kronos_answers_total`."""
    try:
        chosen = next_worker(self)
    except WorkerUnavailableError:
        answers.record("unavailable")
        raise
    chosen.send_request(request_message)
    try:
        response = await self._async_responses.schedule_and_wait(request_message, chosen)  # noqa: SLF001
    except asyncio.CancelledError:
        answers.record("cancelled")
        chosen.send_request(
            ModelRequestMessage(
                model_name=request_message.model_name,
                model_version=request_message.model_version,
                method_name=CANCEL_METHOD,
                method_args=[request_message.id],
            )
        )
        raise
    except WorkerStop:  # the worker died with this request in flight
        answers.record("unavailable")
        raise unavailable(self) from None
    except MLServerError as exc:
        answers.record(getattr(exc, "outcome", None) or answers.outcome_for_status(exc.status_code))
        raise
    answers.record("ok")
    return response


async def process_request(self: worker.Worker, request: ModelRequestMessage) -> ModelResponseMessage:
    """Worker side: run one model call as a cancellable task, or cancel a running one."""
    if request.method_name == CANCEL_METHOD:
        task = _running.get(str(request.method_args[0]))
        if task is not None:
            task.cancel()
        return ModelResponseMessage(id=request.id)
    current = asyncio.current_task()
    if current is not None:
        _running[request.id] = current
    try:
        model = await self._model_registry.get_model(request.model_name, request.model_version)  # noqa: SLF001
        method = getattr(model, request.method_name)
        with model_context(model.settings):
            value = await method(*request.method_args, **request.method_kwargs)
        return ModelResponseMessage(id=request.id, return_value=value)
    except asyncio.CancelledError:
        return ModelResponseMessage(id=request.id, exception=RelayedError("request cancelled", 499, "cancelled"))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
        if is_client_side(exc):
            assert isinstance(exc, MLServerError)
            relayed = RelayedError(str(exc), exc.status_code, getattr(exc, "outcome", None))
            return ModelResponseMessage(id=request.id, exception=relayed)
        logger.exception("calling %r of model %r failed", request.method_name, request.model_name)
        return ModelResponseMessage(id=request.id, exception=WorkerError(exc))
    finally:
        _running.pop(request.id, None)


async def predict_stream(
    self: ParallelModel, payloads: AsyncIterator[InferenceRequest]
) -> AsyncIterator[InferenceResponse]:
    """One answer per request of the stream, in order."""
    async for payload in payloads:
        yield await self.predict(payload)


async def metadata(self: ParallelModel) -> MetadataModelResponse:
    """The worker's metadata, asked every time: MLServer kept the first answer in the main
    process, which then named the old version after an alias-poll swap or a restart."""
    response = await self._send("metadata")  # noqa: SLF001
    if not isinstance(response, MetadataModelResponse):
        raise InferenceError(f"Model '{self.name}' returned no metadata")
    return response
