"""What the registry shows about a logged Kronos: signature with params and defaults,
input example from real data, metadata, pinned requirements."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path

import huggingface_hub.constants
import mlflow
import pandas as pd
from mlflow.models import get_model_info, validate_serving_input
from mlflow.types import DataType
from packaging.requirements import Requirement
from pyfunc_helpers import MODEL_NAME, TINY_MAX_CONTEXT

import model_package
from model_package.kronos import count_parameters, load_model
from model_package.log_model import MODEL_REQUIREMENTS, log_kronos_model
from model_package.signature import kronos_signature

ROOT = Path(__file__).resolve().parents[2]


def test_params_schema_with_defaults_in_registry(tracking):
    signature = get_model_info(f"models:/{MODEL_NAME}/1").signature
    params = {p.name: (p.dtype, p.default, p.shape) for p in signature.params.params}
    assert params == {
        "pred_len": (DataType.long, 10, None),
        "temperature": (DataType.double, 1.0, None),
        "top_k": (DataType.long, 0, None),
        "top_p": (DataType.double, 0.9, None),
        "sample_count": (DataType.long, 1, None),
        "seed": (DataType.long, None, None),
        "quantiles": (DataType.double, [], (-1,)),
        "freq": (DataType.string, None, None),
        "calendar": (DataType.string, None, None),
        "strict_candles": (DataType.boolean, True, None),
        "repair_candles": (DataType.boolean, False, None),
    }
    assert signature == kronos_signature()


def test_input_and_output_schema(tracking):
    signature = get_model_info(f"models:/{MODEL_NAME}@champion").signature
    inputs = {c.name: (c.type, c.required) for c in signature.inputs.inputs}
    assert inputs == {
        "series_id": (DataType.string, False),
        "timestamp": (DataType.datetime, True),
        "open": (DataType.double, True),
        "high": (DataType.double, True),
        "low": (DataType.double, True),
        "close": (DataType.double, True),
        "volume": (DataType.double, False),
        "amount": (DataType.double, False),
    }
    assert signature.outputs.input_names() == [
        "series_id",
        "timestamp",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "amount",
    ]


def test_logged_input_example_is_real_data_and_serves(tracking, tmp_path):
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path), tracking_uri=tracking.tracking_uri
        )
    )
    serving_input = (model_dir / "serving_input_example.json").read_text()
    payload = json.loads(serving_input)
    split = payload["inputs"] if "inputs" in payload else payload["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])
    assert len(frame) == 64 and set(frame["series_id"]) == {"SP500"}
    assert frame["timestamp"].iloc[-1].startswith("2018-12-31")
    forecast = validate_serving_input(str(model_dir), serving_input)
    assert len(forecast) == payload["params"]["pred_len"]
    assert {"close_q0.1", "close_q0.9"} <= set(forecast.columns)
    assert (forecast["timestamp"] > pd.Timestamp("2018-12-31")).all()


def test_metadata_records_source_configs_and_sizes(tracking, tiny_checkpoints):
    metadata = get_model_info(f"models:/{MODEL_NAME}/1").metadata
    tokenizer_dir, model_dir = tiny_checkpoints
    assert metadata["kronos_serving_version"] == model_package.__version__
    assert metadata["max_context"] == TINY_MAX_CONTEXT
    assert metadata["model_source"]["kind"] == "path"
    assert metadata["model_source"]["path"] == str(model_dir.resolve())
    assert len(metadata["tokenizer_source"]["weights_sha256"]) == 64
    model = load_model(model_dir)
    assert metadata["model_config"] == model.config.to_dict()
    assert metadata["model_parameters"] == count_parameters(model)
    assert metadata["tokenizer_config"]["d_model"] == 32 and metadata["tokenizer_parameters"] > 0


def test_requirements_are_our_pins(tracking, tmp_path):
    requirements = (
        Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{MODEL_NAME}/1/requirements.txt",
                dst_path=str(tmp_path),
                tracking_uri=tracking.tracking_uri,
            )
        )
        .read_text()
        .split()
    )
    assert [Requirement(r) for r in requirements] == [Requirement(r) for r in MODEL_REQUIREMENTS]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {Requirement(r).name: Requirement(r) for r in project}
    for requirement in map(Requirement, MODEL_REQUIREMENTS):
        # the same version pin (the project may install extras the model does not need,
        # e.g. mlflow[auth] for the tracking server's login)
        ours = pinned[requirement.name]
        assert ours.specifier == requirement.specifier, f"{requirement} differs from pyproject ({ours})"
        assert requirement.extras <= ours.extras, f"{requirement} needs extras pyproject lacks ({ours})"


def test_hub_ids_resolve_offline_from_the_cache(tracking, tiny_checkpoints, tmp_path, monkeypatch):
    """Hub ids work without network when cached; metadata names id and resolved revision."""
    cache, revision = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    for repo, source in zip(("acme/kronos-tiny-tokenizer", "acme/kronos-tiny"), tiny_checkpoints, strict=True):
        folder = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(source, folder / "snapshots" / revision)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with mlflow.start_run(experiment_id=tracking.experiment_id):
        info = log_kronos_model(
            "acme/kronos-tiny-tokenizer", "acme/kronos-tiny", max_context=32, cache_dir=cache, example_rows=16
        )
    weights = (tiny_checkpoints[1] / "model.safetensors").read_bytes()
    assert info.metadata["model_source"] == {
        "kind": "hub",
        "id": "acme/kronos-tiny",
        "revision": None,
        "resolved_revision": revision,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    assert info.metadata["tokenizer_source"]["id"] == "acme/kronos-tiny-tokenizer"
    assert info.metadata["max_context"] == 32
    assert info.registered_model_version is None
