"""The model repository MLServer is configured with (`settings.json`:
`model_repository_implementation`): MLServer's own, found through this module so that
importing it installs `serving.patches` at the right moment.

MLServer imports this class while it validates `settings.json`, before it creates its REST
and gRPC servers, and again in every inference worker process when the settings arrive
there. Nothing else of MLServer needs changing for the patches to apply.
"""

from __future__ import annotations

from mlserver.repository import SchemalessModelRepository

from model_package.credentials import load_tracking_credentials

from . import patches
from .settings import ServingSettings

load_tracking_credentials()  # MLFLOW_TRACKING_PASSWORD_FILE -> MLFLOW_TRACKING_PASSWORD, before any registry call
patches.install(ServingSettings.model_fields["retry_after_s"].default)


class KronosModelRepository(SchemalessModelRepository):
    """MLServer's schemaless repository (model-settings.json files under the root)."""
