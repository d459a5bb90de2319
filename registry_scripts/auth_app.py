"""`mlflow server --app-name kronos-auth`: MLflow's basic-auth app with stricter registry rules.

MLflow's own rules (per registered model: READ reads, EDIT logs versions and sets tags,
MANAGE deletes and grants) let an EDIT user move any alias. Here the record of what is
served needs MANAGE on the registered model:

- setting or deleting a managed alias (`KRONOS_AUTH_MANAGED_ALIASES`, default `champion`;
  `*` for every alias): promotion and rollback;
- renaming the registered model (else an EDIT user could rename it away and create a new
  one of the same name, which would be theirs to MANAGE);
- setting or deleting registered-model tags (the promotion / rollback event log).

Anonymous requests get MLflow's 401, refused ones MLflow's 403. `/health` stays open.

Configuration (environment of `mlflow server`):
- `MLFLOW_AUTH_ADMIN_PASSWORD` or `MLFLOW_AUTH_ADMIN_PASSWORD_FILE`: the admin's password,
  used once, to create the admin (`MLFLOW_AUTH_ADMIN_USERNAME`, default `admin`) on first start;
- `MLFLOW_FLASK_SERVER_SECRET_KEY` or `..._FILE`: the CSRF key MLflow's auth app requires;
- the auth database: `KRONOS_AUTH_DATABASE_URI`, else `database_uri` of the ini file that
  `MLFLOW_AUTH_CONFIG_PATH` names, else the server's backend store (the same database:
  MLflow's auth tables and migration table do not clash with the tracking tables);
- everything else as MLflow's basic-auth (`default_permission` READ unless an ini says otherwise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVER_SECRETS = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
ALL_ALIASES = "*"

Validator = Callable[[], bool]
_logger = logging.getLogger("kronos.auth")


class ServerAuthSettings(BaseSettings):
    """What the kronos-auth app reads besides MLflow's own auth settings (prefix `KRONOS_AUTH_`)."""

    model_config = SettingsConfigDict(env_prefix="KRONOS_AUTH_", extra="ignore")

    managed_aliases: str = Field(
        "champion", description="comma-separated aliases whose moves need MANAGE; * = every alias"
    )
    database_uri: str | None = Field(
        None, description="SQLAlchemy URI of the users/permissions store (default: the backend store)"
    )

    def alias_is_managed(self, alias: object) -> bool:
        """Whether moving `alias` needs MANAGE (compared case-insensitively)."""
        names = {name.strip().casefold() for name in self.managed_aliases.split(",") if name.strip()}
        return ALL_ALIASES in names or str(alias).strip().casefold() in names


def auth_database_uri(settings: ServerAuthSettings, environ: dict[str, str] | None = None) -> str | None:
    """The auth store URI to impose, or None to keep the ini file's (`MLFLOW_AUTH_CONFIG_PATH`)."""
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR

    environ = dict(os.environ) if environ is None else environ
    if settings.database_uri:
        return settings.database_uri
    if environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        return None
    backend = environ.get(BACKEND_STORE_URI_ENV_VAR) or environ.get("MLFLOW_BACKEND_STORE_URI") or ""
    if "://" not in backend:
        raise ValueError(
            f"KRONOS_AUTH_DATABASE_URI: not set and the backend store ({backend or 'unset'}) is not a database; "
            "name the users/permissions database"
        )
    return backend


def _stricter(auth: Any, original: Validator, alias_only: bool, settings: ServerAuthSettings) -> Validator:
    """`original` and, for a managed alias (or always, when not `alias_only`), MANAGE on the model."""

    def validate() -> bool:
        if not original():
            return False
        if alias_only and not settings.alias_is_managed(auth._get_request_param("alias")):
            return True
        return bool(auth._get_permission_from_registered_model_or_prompt_name().can_manage)

    validate.__name__ = f"kronos_{getattr(original, '__name__', 'validator')}"
    return validate


def install_rules(auth: Any, settings: ServerAuthSettings) -> list[tuple[str, str]]:
    """Replace the before-request validators of the alias, rename and model-tag routes of
    `mlflow.server.auth`; returns the (path, method) pairs replaced."""
    from mlflow.protos import model_registry_pb2 as registry
    from mlflow.server.handlers import get_service_endpoints

    # request class -> whether only managed aliases need MANAGE (False: every request does)
    rules: dict[type, bool] = {
        registry.SetRegisteredModelAlias: True,
        registry.DeleteRegisteredModelAlias: True,
        registry.RenameRegisteredModel: False,
        registry.SetRegisteredModelTag: False,
        registry.DeleteRegisteredModelTag: False,
    }
    endpoints = get_service_endpoints(registry.ModelRegistryService, lambda cls: cls)
    missing = {cls.__name__ for cls in rules} - {cls.__name__ for _, cls, _ in endpoints}
    if missing or not hasattr(auth, "_get_permission_from_registered_model_or_prompt_name"):
        raise RuntimeError(f"kronos-auth: this MLflow lacks what the rules need {sorted(missing)}; review auth_app.py")
    validators = auth.BEFORE_REQUEST_VALIDATORS
    replaced: dict[tuple[str, str], Validator] = {}
    for path, request_class, methods in endpoints:
        if request_class not in rules:
            continue
        for method in methods:
            original = validators.get((path, method))
            if original is None:  # a route MLflow no longer checks here: refuse to start unsafely
                raise RuntimeError(f"kronos-auth: MLflow has no validator for {method} {path}; review auth_app.py")
            replaced[(path, method)] = _stricter(auth, original, rules[request_class], settings)
    validators.update(replaced)
    return sorted(replaced)


def create_app() -> Any:
    """The app factory `mlflow server --app-name kronos-auth` runs in each worker (the
    `mlflow server` process only imports this module: it stays light)."""
    from model_package.credentials import load_secrets

    load_secrets(SERVER_SECRETS)  # before mlflow.server.auth reads its configuration at import
    settings = ServerAuthSettings()
    database_uri = auth_database_uri(settings)
    from mlflow.server import auth

    if database_uri is not None:
        auth.auth_config = auth.auth_config._replace(database_uri=database_uri)
    replaced = install_rules(auth, settings)
    _logger.info(
        "kronos-auth: MANAGE needed to move aliases %s, rename the model or change its tags (%d routes)",
        settings.managed_aliases,
        len(replaced),
    )
    return auth.create_app()
