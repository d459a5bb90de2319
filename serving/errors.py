"""Client-facing errors of the runtime, as MLServer errors so that their HTTP status (and
the matching gRPC code, see `serving.patches.status`) survives MLServer's worker hop. Each
names its outcome (`serving.metrics.OUTCOMES`), which the hop carries too, so that the main
process counts the answer as the runtime did (`kronos_answers_total`)."""

from __future__ import annotations

from fastapi import status
from mlserver.errors import InferenceError, MLServerError


class BadForecastInputError(InferenceError):
    """400 / INVALID_ARGUMENT: the request names a field and breaks a rule."""

    outcome = "invalid"  # serving.metrics.OUTCOMES


class ServerOverloadedError(MLServerError):
    """503 / UNAVAILABLE: the queue is full; the REST response carries Retry-After."""

    outcome = "overloaded"  # serving.metrics.OUTCOMES

    def __init__(self, msg: str) -> None:
        super().__init__(msg, status.HTTP_503_SERVICE_UNAVAILABLE)


class ForecastTimeoutError(MLServerError):
    """504 / DEADLINE_EXCEEDED: the request's deadline passed; its work was abandoned."""

    outcome = "timeout"  # serving.metrics.OUTCOMES

    def __init__(self, msg: str) -> None:
        super().__init__(msg, status.HTTP_504_GATEWAY_TIMEOUT)


class ForecastFailedError(MLServerError):
    """500 / INTERNAL: generation failed for a reason that is not the client's."""

    outcome = "error"  # serving.metrics.OUTCOMES

    def __init__(self, msg: str) -> None:
        super().__init__(msg, status.HTTP_500_INTERNAL_SERVER_ERROR)


class ModelNotReadyError(MLServerError):
    """503 / UNAVAILABLE: the model is still loading or is being unloaded."""

    outcome = "unavailable"  # serving.metrics.OUTCOMES

    def __init__(self, msg: str) -> None:
        super().__init__(msg, status.HTTP_503_SERVICE_UNAVAILABLE)


class LiveStoreUnavailableError(MLServerError):
    """503: the live store (realised candles, accuracy) does not answer; forecasts go on."""

    outcome = "unavailable"  # serving.metrics.OUTCOMES

    def __init__(self, msg: str) -> None:
        super().__init__(msg, status.HTTP_503_SERVICE_UNAVAILABLE)
