"""Process-level additions to MLServer 1.7.1 (unmaintained upstream), one module each.

    from serving import patches
    patches.install(retry_after_s=2)   # idempotent; before MLServer builds its servers

- `status`: gRPC codes for 503/504/408/413, Retry-After on 503, 400 for unreadable
  bodies, one WARNING line (no traceback) for client-side errors.
- `grpc_input`: double_param / uint64_param read, unknown parameter forms and tensor
  contents that disagree with their datatype or shape refused.
- `http_input`: X-Request-ID normalised and echoed, the binary tensor extension, and
  cancellation when a REST client disconnects.
- `workers`: cancellation carried into the inference worker, clean error messages, every
  request of a gRPC stream answered.
- `availability`: a dead or restarting worker means 503 + Retry-After and readiness
  false, one log line per event, counters that survive the worker, restarts retried.
- `answers`: every inference answer counted in the main process (`kronos_answers_total`).
- `labels`: no metric series for made-up model names.
- `startup`: exit status 1 when the models cannot load at start-up.

They are installed by `serving.repository` when MLServer reads `settings.json` (main
process, before its REST and gRPC servers exist) and again when a worker process starts,
so a plain `mlserver start serving/` gets all of them.
"""

from __future__ import annotations

import logging
import os

from . import answers, availability, grpc_input, http_input, labels, startup, status, workers

# Logging: MLflow configures its own stderr handler unless told not to, and draws progress
# bars; both would bypass the JSON log format (settings.json `logging_settings`).
QUIET_MLFLOW = {"MLFLOW_CONFIGURE_LOGGING": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def install(retry_after_s: int = 2) -> None:
    """Install every addition (safe to call any number of times)."""
    for name, value in QUIET_MLFLOW.items():
        os.environ.setdefault(name, value)
    logging.captureWarnings(True)
    status.install(retry_after_s)
    grpc_input.install()
    http_input.install()
    workers.install()
    availability.install()
    answers.install()
    labels.install()
    startup.install()
