"""`kronos-registry auth-setup`: the accounts and permissions of an authenticated registry.

Run as the MLflow admin (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` or
`..._PASSWORD_FILE`) against a server started with `--app-name kronos-auth`. Idempotent:

- three accounts, created or given their configured password (rotation = rerun):
  serving (READ: resolve and download the champion), scientist (EDIT: log versions, set
  tags, evaluate, fine-tune) and manager (MANAGE: promote, roll back, delete);
- the registered model (created when missing, so that no one else becomes its owner)
  and the experiments the CLI logs to, with READ / EDIT / MANAGE on the model and READ /
  EDIT / EDIT on the experiments (a grant at another level is replaced).

Names: `KRONOS_AUTH_{SERVING,SCIENTIST,MANAGER}_USER`; passwords (at least 12 characters):
`KRONOS_AUTH_{ROLE}_PASSWORD_FILE` or `KRONOS_AUTH_{ROLE}_PASSWORD`, never arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_package.credentials import CredentialsError, load_secret

from . import errors
from .errors import CliError
from .registry import EVAL_EXPERIMENT, LOG_EXPERIMENT, Registry

if TYPE_CHECKING:  # importing it loads MLflow's server-side auth package: only when needed
    from mlflow.server.auth.client import AuthServiceClient

MIN_PASSWORD_CHARS = 12  # MLflow's own rule for basic-auth passwords
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


class AccountSettings(BaseSettings):
    """The three account names (prefix `KRONOS_AUTH_`)."""

    model_config = SettingsConfigDict(env_prefix="KRONOS_AUTH_", extra="ignore")

    serving_user: str = Field("kronos-serving", min_length=1, description="read-only account of the model servers")
    scientist_user: str = Field("kronos-scientist", min_length=1, description="logs and evaluates versions (EDIT)")
    manager_user: str = Field("kronos-manager", min_length=1, description="promotes and rolls back (MANAGE)")


@dataclass(frozen=True)
class Account:
    role: str  # serving | scientist | manager
    username: str
    model_permission: str  # on the registered model
    experiment_permission: str  # on the CLI's experiments


def accounts(settings: AccountSettings) -> list[Account]:
    """The three accounts with their permission levels."""
    return [
        Account("serving", settings.serving_user, "READ", "READ"),
        Account("scientist", settings.scientist_user, "EDIT", "EDIT"),
        Account("manager", settings.manager_user, "MANAGE", "EDIT"),
    ]


def experiments() -> tuple[str, ...]:
    """The experiments `log`, `evaluate` and `finetune` write runs to."""
    from .finetune import FINETUNE_EXPERIMENT

    return (LOG_EXPERIMENT, EVAL_EXPERIMENT, FINETUNE_EXPERIMENT)


def account_password(role: str, environ: dict[str, str] | None = None) -> str:
    """KRONOS_AUTH_{ROLE}_PASSWORD, else the file KRONOS_AUTH_{ROLE}_PASSWORD_FILE names."""
    name = f"KRONOS_AUTH_{role.upper()}_PASSWORD"
    environ = dict(os.environ if environ is None else environ)
    try:
        load_secret(name, environ)  # a copy: the password stays out of this process's environment
    except CredentialsError as exc:
        raise CliError(str(exc), errors.USAGE) from None
    password = environ.get(name, "")
    if not password:
        raise CliError(f"{name}_FILE (or {name}): not set; the {role} account needs a password", errors.USAGE)
    if len(password) < MIN_PASSWORD_CHARS:
        raise CliError(f"{name}: must be at least {MIN_PASSWORD_CHARS} characters", errors.USAGE)
    return password


def check_names(users: list[Account]) -> None:
    """Three distinct account names."""
    names = [account.username for account in users]
    if len(set(names)) != len(names):
        raise CliError(f"KRONOS_AUTH_*_USER: the three accounts need distinct names, got {names}", errors.USAGE)


def check_admin(auth: AuthServiceClient, users: list[Account]) -> str:
    """The user running this (MLFLOW_TRACKING_USERNAME), an MLflow admin that is none of the
    role accounts (provisioning would take its admin rights away)."""
    runner = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if not auth.get_user(runner).is_admin:  # anonymous: 401 (exit 7)
        raise CliError(f"auth-setup: user {runner!r} is not an MLflow admin", errors.PERMISSION_DENIED)
    if runner in {account.username for account in users}:
        raise CliError(f"KRONOS_AUTH_*_USER: {runner!r} is the admin running auth-setup, not a role", errors.USAGE)
    return runner


def _already_exists(exc: MlflowException) -> bool:
    return exc.error_code == ALREADY_EXISTS


def ensure_user(auth: AuthServiceClient, username: str, password: str) -> str:
    """Create `username`, or set its password and drop admin rights; returns what was done."""
    try:
        auth.create_user(username, password)
        return "created"
    except MlflowException as exc:
        if not _already_exists(exc):
            raise
    auth.update_user_password(username, password)
    if auth.get_user(username).is_admin:
        auth.update_user_admin(username, False)
        return "password set, admin rights removed"
    return "password set"


def ensure_grant(auth: AuthServiceClient, username: str, resource_type: str, resource_id: str, permission: str) -> str:
    """Grant `permission` on a resource, replacing a grant at another level; returns what was done."""
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
        return "granted"
    except MlflowException as exc:
        if not _already_exists(exc):
            raise
    current = auth.get_user_permission(username, resource_type, resource_id).permission
    if current == permission:
        return "kept"
    auth.revoke_user_permission(username, resource_type, resource_id)
    auth.grant_user_permission(username, resource_type, resource_id, permission)
    return f"changed from {current}"


def ensure_model(registry: Registry) -> str:
    """Create the registered model unless it exists (its creator would otherwise own it)."""
    if registry.model_exists():
        return "exists"
    try:
        registry.client.create_registered_model(registry.model_name)
    except MlflowException as exc:
        if not _already_exists(exc):
            raise
        return "exists"
    return "created"


def auth_setup(registry: Registry) -> list[str]:
    """Provision accounts, the model, the experiments and the grants; returns report lines."""
    from mlflow.server.auth.client import AuthServiceClient

    if not registry.uri.startswith(("http://", "https://")):
        raise CliError(
            f"auth-setup needs an MLflow server with --app-name kronos-auth (MLFLOW_TRACKING_URI=http://...), "
            f"got {registry.uri}; an embedded sqlite registry has no users",
            errors.USAGE,
        )
    users = accounts(AccountSettings())
    check_names(users)
    passwords = {account.role: account_password(account.role) for account in users}  # all checked before any change
    auth = AuthServiceClient(registry.uri)
    check_admin(auth, users)
    lines = [f"user {a.username} ({a.role}): {ensure_user(auth, a.username, passwords[a.role])}" for a in users]
    lines.append(f"registered model {registry.model_name}: {ensure_model(registry)}")
    for account in users:
        done = ensure_grant(auth, account.username, "registered_model", registry.model_name, account.model_permission)
        lines.append(f"{account.model_permission} on model {registry.model_name} for {account.username}: {done}")
    for name in experiments():
        experiment_id = registry.experiment_id(name)
        for account in users:
            permission = account.experiment_permission
            done = ensure_grant(auth, account.username, "experiment", experiment_id, permission)
            lines.append(f"{permission} on experiment {name} for {account.username}: {done}")
    return lines
