"""parse_scoring_request: MLflow scoring-protocol bodies -> (history, params), and a clear
KronosInputError for every hostile body (never another exception type)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from model_package import KronosInputError
from model_package.scoring import parse_scoring_request

COLUMNS = ["series_id", "timestamp", "open", "high", "low", "close", "volume"]
ROWS = [
    ["SP500", "2018-12-26", 2363.1, 2467.7, 2346.5, 2467.6, 4233990000.0],
    ["SP500", "2018-12-27", 2442.5, 2489.1, 2397.9, 2488.8, 4096610000.0],
]


def _body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_dataframe_split_with_params():
    frame, params = parse_scoring_request(
        _body({"dataframe_split": {"columns": COLUMNS, "data": ROWS}, "params": {"pred_len": 2, "seed": 7}})
    )
    pd.testing.assert_frame_equal(frame, pd.DataFrame(ROWS, columns=COLUMNS))
    assert params == {"pred_len": 2, "seed": 7}


def test_dataframe_records_and_no_params():
    records = [dict(zip(COLUMNS, row, strict=True)) for row in ROWS]
    frame, params = parse_scoring_request(_body({"dataframe_records": records}))
    pd.testing.assert_frame_equal(frame, pd.DataFrame(ROWS, columns=COLUMNS))
    assert params == {}
    _, params = parse_scoring_request(_body({"dataframe_records": records, "params": None}))
    assert params == {}


def test_split_with_index_and_str_body():
    frame, _ = parse_scoring_request(
        json.dumps({"dataframe_split": {"columns": COLUMNS, "data": ROWS, "index": [5, 6]}})
    )
    assert len(frame) == 2 and list(frame.columns) == COLUMNS


def test_big_seed_survives_parsing_exactly():
    _, params = parse_scoring_request(_body({"dataframe_records": [], "params": {"seed": 2**64 - 1}}))
    assert params["seed"] == 2**64 - 1


SPLIT = {"columns": COLUMNS, "data": ROWS}

HOSTILE = [
    # (body, field, rule fragment)
    (b"not json", "body", "not valid JSON"),
    (b"", "body", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "body", "not valid JSON"),
    (b"\x80abc", "body", "not valid JSON"),
    (b"[" * 100_000, "body", "nested too deeply"),
    (b'{"a":' * 100_000, "body", "nested too deeply"),
    (b'{"dataframe_records": [{"close": NaN}]}', "body", "NaN is not a JSON number"),
    (b'{"dataframe_records": [], "params": {"temperature": Infinity}}', "body", "Infinity is not a JSON number"),
    (b'{"params": {}, "params": {"pred_len": 3}, "dataframe_records": []}', "body", "duplicate key 'params'"),
    (_body([1, 2]), "body", "must be a JSON object, got an array"),
    (_body("text"), "body", "must be a JSON object, got a string"),
    (_body(None), "body", "must be a JSON object, got null"),
    (_body({}), "body", "needs one of dataframe_split, dataframe_records"),
    (_body({"params": {}}), "body", "needs one of dataframe_split, dataframe_records"),
    (_body({"dataframe_split": SPLIT, "dataframe_records": []}), "body", "give only one of"),
    (_body({"inputs": {"close": [1.0]}}), "inputs", "this model takes a frame"),
    (_body({"instances": [{"close": 1.0}]}), "instances", "this model takes a frame"),
    (_body({"dataframe_split": SPLIT, "param": {"pred_len": 3}}), "body", "unknown key 'param'"),
    (_body({"dataframe_split": SPLIT, "params": [1]}), "params", "must be a JSON object, got an array"),
    (_body({"dataframe_split": SPLIT, "params": "pred_len=3"}), "params", "must be a JSON object"),
    (_body({"dataframe_split": "columns"}), "dataframe_split", "must be a JSON object"),
    (_body({"dataframe_split": {"columns": COLUMNS}}), "dataframe_split", "needs 'columns' and 'data'"),
    (_body({"dataframe_split": {**SPLIT, "dtypes": {}}}), "dataframe_split", "unknown key 'dtypes'"),
    (_body({"dataframe_split": {"columns": "abc", "data": ROWS}}), "dataframe_split.columns", "must be an array"),
    (_body({"dataframe_split": {"columns": COLUMNS, "data": "abc"}}), "dataframe_split.data", "must be an array"),
    (
        _body({"dataframe_split": {"columns": [1, 2], "data": [[1, 2]]}}),
        "dataframe_split.columns",
        "column names must be strings",
    ),
    (
        _body({"dataframe_split": {"columns": ["close", "close"], "data": [[1, 2]]}}),
        "dataframe_split.columns",
        "column given more than once: close",
    ),
    (
        _body({"dataframe_split": {"columns": COLUMNS, "data": [ROWS[0][:3]]}}),
        "dataframe_split.data",
        "row 0 has 3 values, expected 7",
    ),
    (
        _body({"dataframe_split": {"columns": COLUMNS, "data": [ROWS[0], [*ROWS[1], 1.0]]}}),
        "dataframe_split.data",
        "row 1 has 8 values, expected 7",
    ),
    (
        _body({"dataframe_split": {"columns": COLUMNS, "data": [ROWS[0], "row"]}}),
        "dataframe_split.data",
        "row 1 must be an array, got a string",
    ),
    (
        _body({"dataframe_split": {"columns": COLUMNS, "data": [{"close": 1}]}}),
        "dataframe_split.data",
        "row 0 must be an array, got an object",
    ),
    (_body({"dataframe_split": {**SPLIT, "index": [1]}}), "dataframe_split.index", "one per row"),
    (
        _body({"dataframe_split": {"columns": COLUMNS, "data": [ROWS[0], [*ROWS[1][:5], [1.0], 3.0]]}}),
        "close",
        "must be strings, numbers, booleans or null, got an array [1.0] at row 1",
    ),
    (_body({"dataframe_split": {"columns": COLUMNS, "data": [[*ROWS[0][:6], {"v": 1}]]}}), "volume", "got an object"),
    (_body({"dataframe_records": {"close": [1.0]}}), "dataframe_records", "must be an array of objects"),
    (_body({"dataframe_records": "x"}), "dataframe_records", "must be an array of objects"),
    (_body({"dataframe_records": [[1, 2]]}), "dataframe_records", "row 0 must be an object"),
    (_body({"dataframe_records": [{"close": 1.0}, 5]}), "dataframe_records", "row 1 must be an object"),
    (_body({"dataframe_records": [{"close": [1.0]}]}), "close", "got an array"),
]


@pytest.mark.parametrize(("body", "field", "fragment"), HOSTILE)
def test_hostile_bodies_are_refused_naming_field_and_rule(body, field, fragment):
    with pytest.raises(KronosInputError) as info:
        parse_scoring_request(body)
    assert info.value.field == field, info.value
    assert fragment in info.value.rule, info.value
    assert len(str(info.value)) < 300


def test_a_huge_bad_value_is_not_echoed_back():
    body = _body({"dataframe_split": {"columns": COLUMNS, "data": [[*ROWS[0][:6], ["x" * 100_000]]]}})
    with pytest.raises(KronosInputError) as info:
        parse_scoring_request(body)
    assert len(str(info.value)) < 300


def test_cells_become_a_frame_that_the_forecaster_checks():
    """Numbers in the timestamp column pass the parser (it checks shapes, not values); the
    forecaster's timestamp rule refuses them."""
    from model_package.frames import split_series

    rows = [[r[0], 1545782400 + i * 86400, *r[2:]] for i, r in enumerate(ROWS)]
    frame, _ = parse_scoring_request(_body({"dataframe_split": {"columns": COLUMNS, "data": rows}}))
    with pytest.raises(KronosInputError, match="must hold datetimes or date/time strings"):
        split_series(frame)
