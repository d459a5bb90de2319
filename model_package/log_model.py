"""`log_kronos_model`: put a Kronos checkpoint pair into MLflow as a self-contained pyfunc.

The tokenizer and model directories are copied into the logged model as artifacts (a
logged version never needs the hub again), our package goes in with `code_paths` (the
model loads where the project is not installed), and the metadata says where the
weights came from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.models.model import ModelInfo

from . import __version__
from .forecaster import KronosForecaster
from .kronos import resolve_checkpoint
from .kronos.checkpoint import copy_checkpoint, weights_sha256
from .kronos.presets import preset_by_name
from .pyfunc import MAX_CONTEXT_KEY, MODEL_ARTIFACT, TOKENIZER_ARTIFACT
from .signature import input_example, kronos_signature

PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_FILE = PACKAGE_DIR / "pyfunc_entry.py"

# What the logged model needs to run: our pins (pyproject.toml's core), minus the serving
# stack. This is what a model server installs to load the pyfunc (`mlflow models serve`
# with a virtualenv/conda env manager, `mlflow.pyfunc.spark_udf`, a Docker image built by
# `mlflow models build-docker`). pandas stays `>=2.2` without the `<3` cap: the pyfunc works
# with pandas 2 and 3 (`make test-pandas3`), and so does `mlflow models serve`; only the
# MLServer layer needs pandas < 3, and its environment comes from the project's `serving`
# extra (the Docker image, `make serve`), never from these requirements. Capping here
# would force a pandas downgrade on every Spark or pandas-3 environment that loads the model.
MODEL_REQUIREMENTS = [
    "torch==2.13.0",
    "mlflow==3.17.2",
    "numpy>=1.26",
    "pandas>=2.2",
    "safetensors>=0.4",
    "huggingface_hub>=0.33",
    "pydantic-settings>=2.0",
    "exchange_calendars>=4.6",  # the `calendar` param
]


def weight_source(name_or_path: str | Path, revision: str | None, directory: Path) -> dict:
    """Where a checkpoint came from: hub id + requested and resolved revision, or a path;
    plus the sha256 of its weights file."""
    digest = weights_sha256(directory)
    if Path(name_or_path).expanduser().is_dir():
        return {"kind": "path", "path": str(Path(name_or_path).expanduser().resolve()), "weights_sha256": digest}
    resolved = directory.name if directory.parent.name == "snapshots" else None
    return {
        "kind": "hub",
        "id": str(name_or_path),
        "revision": revision,
        "resolved_revision": resolved,
        "weights_sha256": digest,
    }


def _stage_code(target: Path) -> Path:
    """A copy of our package without caches and without the shipped demo weights (a logged
    model carries its own weights as artifacts), for `code_paths`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "demo_weights")
    return Path(shutil.copytree(PACKAGE_DIR, target / PACKAGE_DIR.name, ignore=ignore))


def log_kronos_model(
    tokenizer: str | Path | None,
    model: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    max_context: int | None = None,
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    cache_dir: str | Path | None = None,
    example_rows: int = 64,
    tags: dict[str, str] | None = None,
) -> ModelInfo:
    """Log (and optionally register) a Kronos pyfunc from hub ids or local directories.

    `tokenizer=None` takes the tokenizer a published model ships with; `max_context=None`
    the checkpoint's own default. Hub ids resolve through the local cache when offline.
    The checkpoint is loaded once here, so a broken pair fails at log time.
    """
    forecaster = KronosForecaster.from_pretrained(
        tokenizer,
        model,
        max_context=max_context,
        device="cpu",
        revision=revision,
        tokenizer_revision=tokenizer_revision,
        cache_dir=cache_dir,
    )
    if tokenizer is None:
        preset = preset_by_name(str(model))
        tokenizer = preset.tokenizer_id if preset is not None else forecaster.source["tokenizer"]
    tokenizer_dir = resolve_checkpoint(tokenizer, tokenizer_revision, cache_dir)
    model_dir = resolve_checkpoint(model, revision, cache_dir)
    described = forecaster.describe()
    metadata = {
        "kronos_serving_version": __version__,
        "max_context": forecaster.max_context,
        "model_source": weight_source(model, revision, model_dir),
        "tokenizer_source": weight_source(tokenizer, tokenizer_revision, tokenizer_dir),
        "model_config": described["model_config"],
        "tokenizer_config": described["tokenizer_config"],
        "model_parameters": described["model_parameters"],
        "tokenizer_parameters": described["tokenizer_parameters"],
    }
    with tempfile.TemporaryDirectory(prefix="kronos-log-") as staging:
        root = Path(staging)
        artifacts = {
            TOKENIZER_ARTIFACT: str(copy_checkpoint(tokenizer_dir, root / TOKENIZER_ARTIFACT)),
            MODEL_ARTIFACT: str(copy_checkpoint(model_dir, root / MODEL_ARTIFACT)),
        }
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY_FILE),
            artifacts=artifacts,
            code_paths=[str(_stage_code(root / "code"))],
            signature=kronos_signature(),
            input_example=input_example(example_rows),
            pip_requirements=list(MODEL_REQUIREMENTS),
            metadata=metadata,
            model_config={MAX_CONTEXT_KEY: forecaster.max_context},
            registered_model_name=registered_model_name,
            tags=tags,
        )
