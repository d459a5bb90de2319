"""The MLflow scoring protocol (`POST /invocations` JSON) -> (history frame, params).

Accepted bodies (a JSON object, UTF-8):

    {"dataframe_split": {"columns": [...], "data": [[...], ...], "index": [...]?}, "params": {...}?}
    {"dataframe_records": [{"column": value, ...}, ...], "params": {...}?}

Everything else is a `KronosInputError` naming the part of the body and the rule: text
that is not JSON (NaN/Infinity literals included) or nests too deeply, duplicate keys,
unknown top-level keys, `inputs`/`instances` (tensor formats: this model takes a frame),
columns that are not unique strings, rows that are not lists of `len(columns)` scalars,
records that are not objects of scalars. Cell values are then checked by the forecaster
(`model_package.frames`, `model_package.calendar`).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd

from .errors import KronosInputError, brief, cut

SPLIT, RECORDS, PARAMS = "dataframe_split", "dataframe_records", "params"
FRAME_KEYS = (SPLIT, RECORDS)
TENSOR_KEYS = ("inputs", "instances")
SPLIT_KEYS = frozenset({"columns", "data", "index"})
SCALARS = (str, int, float, bool, type(None))


def parse_scoring_request(body: bytes) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A raw `/invocations` body -> (history frame, params); raises KronosInputError."""
    document = _load_json(body)
    if not isinstance(document, dict):
        raise KronosInputError("body", f"must be a JSON object, got {_json_type(document)}")
    tensors = [k for k in TENSOR_KEYS if k in document]
    if tensors:
        raise KronosInputError(
            tensors[0], f"tensor input is not supported: this model takes a frame, send one of {', '.join(FRAME_KEYS)}"
        )
    unknown = [k for k in document if k not in (*FRAME_KEYS, PARAMS)]
    if unknown:
        raise KronosInputError(
            "body", f"unknown key {brief(unknown[0])} (accepted: {', '.join((*FRAME_KEYS, PARAMS))})"
        )
    given = [k for k in FRAME_KEYS if k in document]
    if len(given) != 1:
        rule = "give only one of" if given else "needs one of"
        raise KronosInputError("body", f"{rule} {', '.join(FRAME_KEYS)}")
    params = document.get(PARAMS)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise KronosInputError(PARAMS, f"must be a JSON object, got {_json_type(params)}")
    frame = _split_frame(document[SPLIT]) if given[0] == SPLIT else _records_frame(document[RECORDS])
    return frame, params


def _load_json(body: bytes | bytearray | str) -> Any:
    if not isinstance(body, (bytes, bytearray, str)):
        raise KronosInputError("body", f"must be bytes, got {type(body).__name__}")
    try:
        return json.loads(body, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise KronosInputError("body", "not valid JSON: nested too deeply") from None
    except _DuplicateKeyError as exc:
        raise KronosInputError("body", f"not valid JSON: duplicate key {brief(exc.key)}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity literals
        raise KronosInputError("body", f"not valid JSON ({cut(str(exc), 100)})") from None


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _json_type(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _split_frame(split: object) -> pd.DataFrame:
    if not isinstance(split, dict):
        raise KronosInputError(SPLIT, f"must be a JSON object with 'columns' and 'data', got {_json_type(split)}")
    unknown = [k for k in split if k not in SPLIT_KEYS]
    if unknown:
        raise KronosInputError(SPLIT, f"unknown key {brief(unknown[0])} (accepted: columns, data, index)")
    if "columns" not in split or "data" not in split:
        raise KronosInputError(SPLIT, "needs 'columns' and 'data'")
    columns, data = split["columns"], split["data"]
    if not isinstance(columns, list):
        raise KronosInputError(f"{SPLIT}.columns", f"must be an array of column names, got {_json_type(columns)}")
    for name in columns:
        if not isinstance(name, str):
            raise KronosInputError(f"{SPLIT}.columns", f"column names must be strings, got {brief(name)}")
    duplicated = sorted(c for c, n in Counter(columns).items() if n > 1)
    if duplicated:
        raise KronosInputError(f"{SPLIT}.columns", f"column given more than once: {cut(', '.join(duplicated))}")
    if not isinstance(data, list):
        raise KronosInputError(f"{SPLIT}.data", f"must be an array of rows, got {_json_type(data)}")
    if "index" in split and (not isinstance(split["index"], list) or len(split["index"]) != len(data)):
        raise KronosInputError(f"{SPLIT}.index", f"must be an array of {len(data)} labels (one per row)")
    for row, values in enumerate(data):
        if not isinstance(values, list):
            raise KronosInputError(f"{SPLIT}.data", f"row {row} must be an array, got {_json_type(values)}")
        if len(values) != len(columns):
            raise KronosInputError(
                f"{SPLIT}.data", f"row {row} has {len(values)} values, expected {len(columns)} (one per column)"
            )
    frame = pd.DataFrame(data, columns=columns) if data else pd.DataFrame(columns=columns)
    _check_scalars(frame, SPLIT)
    return frame


def _records_frame(records: object) -> pd.DataFrame:
    if not isinstance(records, list):
        raise KronosInputError(RECORDS, f"must be an array of objects (one per row), got {_json_type(records)}")
    for row, record in enumerate(records):
        if not isinstance(record, dict):
            raise KronosInputError(RECORDS, f"row {row} must be an object (column -> value), got {_json_type(record)}")
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    _check_scalars(frame, RECORDS)
    return frame


def _check_scalars(frame: pd.DataFrame, part: str) -> None:
    """Cells are strings, numbers, booleans or null (lists and objects are refused)."""
    for column in frame.columns:
        if not pd.api.types.is_object_dtype(frame[column].dtype):
            continue  # numbers, booleans: scalars
        for row, value in enumerate(frame[column]):
            if not isinstance(value, SCALARS):
                raise KronosInputError(
                    str(column),
                    f"cells of {part} must be strings, numbers, booleans or null, got "
                    f"{_json_type(value)} {brief(value)} at row {row}",
                )
