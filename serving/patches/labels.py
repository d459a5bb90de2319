"""No metric series for names a client made up.

MLServer labels its `model_infer_request_*` metrics with the model name and version of the
request before it checks that such a model exists, so every made-up name (up to the URL's
or gRPC's size limits) became a new Prometheus series: 100 requests with 2 kB names grew
`/metrics` by 609 KiB. Here the model is looked up first; an unknown name or version is
answered 404 / NOT_FOUND without touching any metric.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from mlserver.handlers.dataplane import DataPlane
from mlserver.types import InferenceRequest, InferenceResponse

_PATCHED = "__kronos_patched__"


def install() -> None:
    """Check the model before MLServer's metered inference path (idempotent)."""
    if getattr(DataPlane, _PATCHED, False):
        return
    original_infer = DataPlane.infer
    original_stream = DataPlane.infer_stream

    async def infer(
        self: DataPlane, payload: InferenceRequest, name: str, version: str | None = None
    ) -> InferenceResponse:
        await self._model_registry.get_model(name, version)  # noqa: SLF001 - ModelNotFound (404)
        return await original_infer(self, payload, name, version)

    async def infer_stream(
        self: DataPlane, payloads: AsyncIterator[InferenceRequest], name: str, version: str | None = None
    ) -> AsyncIterator[InferenceResponse]:
        await self._model_registry.get_model(name, version)  # noqa: SLF001
        async for response in original_stream(self, payloads, name, version):
            yield response

    DataPlane.infer = infer
    DataPlane.infer_stream = infer_stream
    setattr(DataPlane, _PATCHED, True)
