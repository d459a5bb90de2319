"""Two small, idempotent additions to MLServer 1.7.1 (unmaintained upstream), applied
when the runtime module is imported (MLServer imports it in the main process too):

- gRPC: MLServer maps only 400/404/422/500 to gRPC codes (others become UNKNOWN); add
  503 -> UNAVAILABLE, 504 -> DEADLINE_EXCEEDED, 408 -> DEADLINE_EXCEEDED.
- REST: MLServer's error handler builds a JSON response with no headers; 503 responses
  get `Retry-After` so that clients and gateways back off.
"""

from __future__ import annotations

import grpc
import mlserver.grpc.utils as grpc_utils
import mlserver.rest.errors as rest_errors
from fastapi import status

RETRY_AFTER_S = 2
_PATCHED = "__kronos_patched__"


def apply(retry_after_s: int = RETRY_AFTER_S) -> None:
    """Install both additions (safe to call any number of times)."""
    grpc_utils.STATUS_CODE_MAPPING.setdefault(status.HTTP_503_SERVICE_UNAVAILABLE,
                                              grpc.StatusCode.UNAVAILABLE)
    grpc_utils.STATUS_CODE_MAPPING.setdefault(status.HTTP_504_GATEWAY_TIMEOUT,
                                              grpc.StatusCode.DEADLINE_EXCEEDED)
    grpc_utils.STATUS_CODE_MAPPING.setdefault(status.HTTP_408_REQUEST_TIMEOUT,
                                              grpc.StatusCode.DEADLINE_EXCEEDED)
    base = rest_errors.Response
    if getattr(base, _PATCHED, False):
        return

    class RetryAfterResponse(base):  # type: ignore[misc, valid-type]
        """MLServer's JSON response, plus Retry-After on 503."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            if self.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
                self.headers["Retry-After"] = str(retry_after_s)

    setattr(RetryAfterResponse, _PATCHED, True)
    rest_errors.Response = RetryAfterResponse
