"""The worker-availability additions without a server: what crosses the worker hop, how
answers are classified, exit statuses in words, stale metric files, log records."""

from __future__ import annotations

import logging
import os
import pickle
import signal

import pytest

from serving.errors import ModelNotReadyError, ServerOverloadedError
from serving.patches.answers import outcome_for_status
from serving.patches.availability import (
    WorkerEventFilter,
    WorkerUnavailableError,
    describe_exit,
    remove_stale_metric_files,
)
from serving.patches.status import RelayedError, is_relayed


@pytest.mark.parametrize("error", [RelayedError("queue full", 503, "overloaded"), WorkerUnavailableError("no worker")])
def test_relayed_errors_keep_status_and_outcome_across_the_worker_hop(error):
    # MLServer pickles the worker's answer; a lost attribute or a failing unpickle used
    # to crash the dispatcher's response loop (and hang every waiting request)
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), str(back), back.status_code, back.outcome) == (
        type(error),
        str(error),
        error.status_code,
        error.outcome,
    )
    assert is_relayed(back)


def test_runtime_errors_name_their_outcome():
    assert ServerOverloadedError("full").outcome == "overloaded"
    assert ModelNotReadyError("loading").outcome == "unavailable"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "ok"), (400, "invalid"), (404, "invalid"), (413, "invalid"), (499, "cancelled"), (None, "cancelled")]
    + [(503, "unavailable"), (504, "timeout"), (500, "error"), (502, "error")],
)
def test_answer_outcome_from_the_status(status, outcome):
    assert outcome_for_status(status) == outcome


def test_exit_statuses_in_words():
    assert describe_exit(signal.SIGKILL) == "killed by SIGKILL"  # waitpid status of kill -9
    assert describe_exit(3 << 8) == "exit status 3"


def test_stale_metric_files_of_other_processes_are_removed(tmp_path):
    names = [f"counter_{os.getpid()}.db", "counter_999999999.db", "gauge_livesum_999999999.db", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_metric_files(str(tmp_path), {os.getpid()}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{os.getpid()}.db", "notes.txt"]


def test_mlserver_lines_about_a_dead_worker_are_dropped_and_a_failed_load_is_one_line():
    keep = WorkerEventFilter()

    def record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("mlserver.parallel", logging.ERROR, __file__, 1, message, None, info)

    assert not keep.filter(record("Worker with PID 7 on default pool stopped unexpectedly with exit code 9."))
    failed = record("An error occurred processing a model update of type 'Load'.", FileNotFoundError("no MLmodel"))
    assert keep.filter(failed)
    assert failed.exc_info is None
    assert failed.getMessage().endswith("FileNotFoundError: no MLmodel")
    assert keep.filter(record("Starting new worker with PID 8 on default inference pool..."))
