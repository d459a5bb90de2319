"""Our code for the Spark executors: `batch` and `model_package` as one zip on their path.

The function Spark runs on each group is pickled by reference to `batch.series` and
`model_package`; an executor on another machine has neither unless the project is
installed there. `ship_code` adds a zip of both packages to the job (`addPyFile`), so the
executors need only the third-party packages: the model's logged requirements plus
pyarrow. The zip leaves out the shipped demo weights and caches.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from pyspark.sql import SparkSession

import batch
import model_package

PACKAGES = (Path(batch.__file__).resolve().parent, Path(model_package.__file__).resolve().parent)
SKIPPED_PARTS = frozenset({"__pycache__", "demo_weights"})


def code_archive(target_dir: Path) -> Path:
    """Write `kronos-batch-code.zip` (the Python files of `batch` and `model_package`)."""
    archive = target_dir / "kronos-batch-code.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for package in PACKAGES:
            for path in sorted(package.rglob("*.py")):
                relative = path.relative_to(package.parent)
                if SKIPPED_PARTS.isdisjoint(relative.parts):
                    bundle.write(path, relative.as_posix())
    return archive


def ship_code(spark: SparkSession) -> Path:
    """Add the code zip to `spark`'s jobs (executors put it on their Python path)."""
    archive = code_archive(Path(tempfile.mkdtemp(prefix="kronos-batch-")))
    spark.sparkContext.addPyFile(str(archive))
    return archive
