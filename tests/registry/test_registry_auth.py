"""Registry authentication: a real `mlflow server --app-name kronos-auth` on a real
PostgreSQL cluster (users and permissions in the same database), provisioned with
`kronos-registry auth-setup`, then used by each role through the CLI and the client.

Roles (docs/registry-auth.md): serving = READ, scientist = EDIT, manager = MANAGE on the
registered model; only MANAGE moves champion.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from registry_helpers import CLI_TIMEOUT_S, ROOT, cli_env, one_line_error
from support import Postgres, start_mlflow_server

from model_package.credentials import CredentialsError, load_secret, load_tracking_credentials
from registry_scripts import errors
from registry_scripts.auth_app import ServerAuthSettings, auth_database_uri
from registry_scripts.auth_setup import experiments

MODEL = "kronos"
ADMIN = "admin"
USERS = {"serving": "kronos-serving", "scientist": "kronos-scientist", "manager": "kronos-manager"}
API = "/api/2.0/mlflow"
HTTP_TIMEOUT_S = 30


@dataclass
class AuthRegistry:
    """The running server, its database and the secret files of every account."""

    url: str
    database_url: str
    secrets: Path
    provisioned: str  # stdout of the first auth-setup

    def secret(self, account: str) -> Path:
        return self.secrets / account

    def password(self, account: str) -> str:
        return self.secret(account).read_text().rstrip("\n")

    def auth(self, account: str) -> tuple[str, str]:
        """(user, password) of an account for requests' basic auth."""
        return (USERS.get(account, ADMIN), self.password(account))


def run_as(
    registry: AuthRegistry, account: str | None, *args: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    """`python -m registry_scripts ARGS` as `account` (user + password FILE; None: anonymous)."""
    env = cli_env(registry.url)
    if account is not None:
        env["MLFLOW_TRACKING_USERNAME"] = USERS.get(account, ADMIN)
        env["MLFLOW_TRACKING_PASSWORD_FILE"] = str(registry.secret(account))
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-m", "registry_scripts", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def provision(registry_url: str, secrets: Path) -> subprocess.CompletedProcess[str]:
    """`kronos-registry auth-setup` as the admin, the accounts' passwords from files."""
    registry = AuthRegistry(registry_url, "", secrets, "")
    files = {f"KRONOS_AUTH_{role.upper()}_PASSWORD_FILE": str(secrets / role) for role in USERS}
    return run_as(registry, "admin", "auth-setup", **files)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _request(registry: AuthRegistry, method: str, path: str, body: dict[str, str], account: str) -> requests.Response:
    """One MLflow REST call as `account` (GET: query parameters, else a JSON body)."""
    where = "params" if method == "GET" else "json"
    return requests.request(
        method, f"{registry.url}{API}/{path}", auth=registry.auth(account), timeout=HTTP_TIMEOUT_S, **{where: body}
    )


def _aliases(registry: AuthRegistry) -> dict[str, str]:
    response = _request(registry, "GET", "registered-models/get", {"name": MODEL}, "admin")
    assert response.status_code == 200, response.text
    return {a["alias"]: a["version"] for a in response.json()["registered_model"].get("aliases", [])}


def _champion(registry: AuthRegistry) -> str:
    return _aliases(registry)["champion"]


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """One authenticated server for the module, provisioned once."""
    root = tmp_path_factory.mktemp("auth-registry")
    secrets = root / "secrets"
    secrets.mkdir()
    for account in ("admin", "flask-key", *USERS):
        (secrets / account).write_text(f"{account}-password-0001\n")  # compose secrets end with a newline
    cluster = Postgres.start()
    try:
        server = start_mlflow_server(
            cluster.url,
            root / "artifacts",
            root / "server.log",
            extra_args=("--app-name", "kronos-auth"),
            extra_env={
                "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(secrets / "admin"),
                "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(secrets / "flask-key"),
            },
        )
        try:
            provisioned = _ok(provision(server.url, secrets))
            yield AuthRegistry(server.url, cluster.url, secrets, provisioned)
        finally:
            server.stop()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def champion_and_challenger(auth_registry: AuthRegistry) -> AuthRegistry:
    """v1 logged by the scientist (`log`, a tiny random pair) and promoted by the manager;
    v2 registered by the scientist from v1's files over the REST API, as a notebook would,
    and given the alias challenger (data scientists may move it)."""
    _ok(run_as(auth_registry, "scientist", "log", "--demo", "--demo-seed", "1"))
    _ok(run_as(auth_registry, "manager", "promote", "--force", "--reason", "bootstrap"))
    scientist = auth_registry.auth("scientist")
    first = _request(auth_registry, "GET", "model-versions/get", {"name": MODEL, "version": "1"}, "admin")
    source = first.json()["model_version"]["source"]  # models:/m-<logged model id>
    files = {"source": source, "model_id": source.removeprefix("models:/")}
    created = requests.post(
        f"{auth_registry.url}{API}/model-versions/create",
        json={"name": MODEL, **files},
        auth=scientist,
        timeout=HTTP_TIMEOUT_S,
    )
    assert created.status_code == 200, created.text
    assert created.json()["model_version"]["version"] == "2"
    challenger = {"name": MODEL, "alias": "challenger", "version": "2"}
    assert _request(auth_registry, "POST", "registered-models/alias", challenger, "scientist").status_code == 200
    return auth_registry


# ------------------------------------------------------------------------- without a server


def test_secret_files_fill_the_variables_mlflow_reads(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("kronos-serving\n")
    (tmp_path / "password").write_text("pa ss:word\r\n")  # one trailing newline goes, the rest stays
    environ = {
        "MLFLOW_TRACKING_USERNAME_FILE": str(tmp_path / "user"),
        "MLFLOW_TRACKING_PASSWORD_FILE": str(tmp_path / "password"),
    }
    assert load_tracking_credentials(environ) == ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    assert (environ["MLFLOW_TRACKING_USERNAME"], environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "kronos-serving",
        "pa ss:word",
    )
    # a plain variable wins over its file; nothing named, nothing done
    environ = {"MLFLOW_TRACKING_PASSWORD": "plain", "MLFLOW_TRACKING_PASSWORD_FILE": str(tmp_path / "password")}
    assert load_tracking_credentials(environ) == [] and environ["MLFLOW_TRACKING_PASSWORD"] == "plain"
    assert load_tracking_credentials({}) == []


def test_unusable_secret_files_are_one_line_errors_without_the_secret(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe-secret")
    cases = {
        str(tmp_path / "missing"): "MLFLOW_TRACKING_PASSWORD_FILE: no such file",
        str(tmp_path / "empty"): "is empty",
        str(tmp_path / "binary"): "cannot read",
        str(tmp_path): "cannot read",  # a directory
    }
    for path, expected in cases.items():
        with pytest.raises(CredentialsError) as caught:
            load_secret("MLFLOW_TRACKING_PASSWORD", {"MLFLOW_TRACKING_PASSWORD_FILE": path})
        message = str(caught.value)
        assert expected in message and path in message and "\n" not in message
        assert "secret" not in message.replace(str(tmp_path), "")


def test_auth_app_settings() -> None:
    """Which aliases need MANAGE, and where the users/permissions live."""
    settings = ServerAuthSettings()
    assert settings.alias_is_managed("champion") and settings.alias_is_managed(" Champion ")
    assert not settings.alias_is_managed("challenger")
    assert ServerAuthSettings(managed_aliases="*").alias_is_managed("challenger")
    assert ServerAuthSettings(managed_aliases="champion, canary").alias_is_managed("canary")
    backend = {"_MLFLOW_SERVER_FILE_STORE": "postgresql+psycopg://u:p@db/mlflow"}
    assert auth_database_uri(settings, backend) == backend["_MLFLOW_SERVER_FILE_STORE"]
    assert auth_database_uri(settings, {**backend, "MLFLOW_AUTH_CONFIG_PATH": "/x.ini"}) is None  # the ini's
    explicit = ServerAuthSettings(database_uri="sqlite:////tmp/auth.db")
    assert auth_database_uri(explicit, {**backend, "MLFLOW_AUTH_CONFIG_PATH": "/x.ini"}) == "sqlite:////tmp/auth.db"
    with pytest.raises(ValueError, match="KRONOS_AUTH_DATABASE_URI"):
        auth_database_uri(settings, {"_MLFLOW_SERVER_FILE_STORE": "./mlruns"})


def test_auth_setup_covers_the_experiments_the_cli_writes_to() -> None:
    from registry_scripts.finetune import FINETUNE_EXPERIMENT
    from registry_scripts.registry import EVAL_EXPERIMENT, LOG_EXPERIMENT

    assert set(experiments()) == {LOG_EXPERIMENT, EVAL_EXPERIMENT, FINETUNE_EXPERIMENT}


# ------------------------------------------------------------------------- on the authenticated server


@pytest.mark.integration
def test_anonymous_requests_get_401_and_health_stays_open(auth_registry: AuthRegistry) -> None:
    url = auth_registry.url
    assert requests.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
    read = requests.get(f"{url}{API}/registered-models/get", params={"name": MODEL}, timeout=HTTP_TIMEOUT_S)
    assert read.status_code == 401 and "Basic" in read.headers["WWW-Authenticate"]
    move = requests.post(
        f"{url}{API}/registered-models/alias",
        json={"name": MODEL, "alias": "champion", "version": "1"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert move.status_code == 401
    wrong = requests.get(
        f"{url}{API}/registered-models/get",
        params={"name": MODEL},
        auth=(USERS["manager"], "not-the-password"),
        timeout=HTTP_TIMEOUT_S,
    )
    assert wrong.status_code == 401


@pytest.mark.integration
def test_provisioning_creates_users_model_experiments_and_grants(auth_registry: AuthRegistry) -> None:
    from sqlalchemy import create_engine, inspect

    lines = auth_registry.provisioned.splitlines()
    assert "user kronos-serving (serving): created" in lines
    assert f"registered model {MODEL}: created" in lines
    for line in (
        "READ on model kronos for kronos-serving: granted",
        "EDIT on model kronos for kronos-scientist: granted",
        "MANAGE on model kronos for kronos-manager: granted",
        "EDIT on experiment kronos-evaluation for kronos-scientist: granted",
    ):
        assert line in lines
    assert not any(auth_registry.password(account) in auth_registry.provisioned for account in USERS)
    # users and permissions live in the tracking server's PostgreSQL database, beside its tables
    engine = create_engine(auth_registry.database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"users", "role_permissions", "alembic_version_auth", "registered_models", "alembic_version"} <= tables


@pytest.mark.integration
def test_provisioning_again_repairs_grants_and_rotates_passwords(auth_registry: AuthRegistry) -> None:
    """A rerun keeps what is right, puts back a grant changed behind its back, and sets
    each account's password from its file (rotation)."""
    admin = auth_registry.auth("admin")
    grant = {"username": USERS["scientist"], "resource_type": "registered_model", "resource_id": MODEL}
    revoked = requests.post(
        f"{auth_registry.url}/api/3.0/mlflow/users/permissions/revoke", json=grant, auth=admin, timeout=HTTP_TIMEOUT_S
    )
    raised = requests.post(
        f"{auth_registry.url}/api/3.0/mlflow/users/permissions/grant",
        json={**grant, "permission": "MANAGE"},
        auth=admin,
        timeout=HTTP_TIMEOUT_S,
    )
    assert revoked.status_code == raised.status_code == 200
    old = auth_registry.password("serving")
    auth_registry.secret("serving").write_text("rotated-serving-password-02\n")

    lines = _ok(provision(auth_registry.url, auth_registry.secrets)).splitlines()
    assert "user kronos-serving (serving): password set" in lines
    assert f"registered model {MODEL}: exists" in lines
    assert "EDIT on model kronos for kronos-scientist: changed from MANAGE" in lines
    assert "MANAGE on model kronos for kronos-manager: kept" in lines
    assert "READ on experiment kronos-serving for kronos-serving: kept" in lines

    def read_as(password: str) -> int:
        return requests.get(
            f"{auth_registry.url}{API}/registered-models/get",
            params={"name": MODEL},
            auth=(USERS["serving"], password),
            timeout=HTTP_TIMEOUT_S,
        ).status_code

    assert (read_as(old), read_as(auth_registry.password("serving"))) == (401, 200)


@pytest.mark.integration
def test_provisioning_refuses_short_passwords_and_non_admins(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    (tmp_path / "short").write_text("too-short\n")
    refused = run_as(
        auth_registry,
        "admin",
        "auth-setup",
        KRONOS_AUTH_SERVING_PASSWORD=auth_registry.password("serving"),
        KRONOS_AUTH_SCIENTIST_PASSWORD=auth_registry.password("scientist"),
        KRONOS_AUTH_MANAGER_PASSWORD_FILE=str(tmp_path / "short"),
    )
    message = one_line_error(refused, errors.USAGE)
    assert "KRONOS_AUTH_MANAGER_PASSWORD: must be at least 12 characters" in message
    files = {f"KRONOS_AUTH_{role.upper()}_PASSWORD_FILE": str(auth_registry.secret(role)) for role in USERS}
    message = one_line_error(run_as(auth_registry, "manager", "auth-setup", **files), errors.PERMISSION_DENIED)
    assert message.endswith("auth-setup: user 'kronos-manager' is not an MLflow admin")


@pytest.mark.integration
def test_cli_without_or_with_wrong_credentials_exits_7(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    message = one_line_error(run_as(auth_registry, None, "history"), errors.UNAUTHENTICATED)
    assert "no credentials were given" in message and "MLFLOW_TRACKING_PASSWORD_FILE" in message
    (tmp_path / "wrong").write_text("wrong-password-0001\n")
    wrong = run_as(auth_registry, "manager", "history", MLFLOW_TRACKING_PASSWORD_FILE=str(tmp_path / "wrong"))
    assert "'kronos-manager' and its password were rejected" in one_line_error(wrong, errors.UNAUTHENTICATED)
    unreadable = run_as(auth_registry, "manager", "history", MLFLOW_TRACKING_PASSWORD_FILE=str(tmp_path / "none"))
    message = one_line_error(unreadable, errors.UNAUTHENTICATED)
    assert "MLFLOW_TRACKING_PASSWORD_FILE: no such file" in message


@pytest.mark.integration
@pytest.mark.slow
def test_scientist_logs_and_tags_but_cannot_move_champion(champion_and_challenger: AuthRegistry) -> None:
    registry = champion_and_challenger
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}
    tag = {"name": MODEL, "version": "2", "key": "reviewed", "value": "yes"}
    assert _request(registry, "POST", "model-versions/set-tag", tag, "scientist").status_code == 200
    # evaluate's runs: the scientist writes to the evaluation experiment, the serving account cannot
    experiment = _request(registry, "GET", "experiments/get-by-name", {"experiment_name": "kronos-evaluation"}, "admin")
    run = {"experiment_id": experiment.json()["experiment"]["experiment_id"]}
    assert _request(registry, "POST", "runs/create", run, "scientist").status_code == 200
    assert _request(registry, "POST", "runs/create", run, "serving").status_code == 403

    promoted = run_as(registry, "scientist", "promote", "--force", "--reason", "try")
    message = one_line_error(promoted, errors.PERMISSION_DENIED)
    assert "kronos-scientist" in message and "registered-models/alias" in message and "MANAGE" in message
    rolled = run_as(registry, "scientist", "rollback", "--to-version", "2", "--reason", "try")
    assert "registered-models/alias" in one_line_error(rolled, errors.PERMISSION_DENIED)
    assert _champion(registry) == "1"

    # nor behind the CLI's back: delete the alias, rename the model away, forge the event log,
    # delete a version
    for method, path, body in (
        ("POST", "registered-models/alias", {"name": MODEL, "alias": "Champion", "version": "2"}),
        ("DELETE", "registered-models/alias", {"name": MODEL, "alias": "champion"}),
        ("POST", "registered-models/rename", {"name": MODEL, "new_name": "mine"}),
        ("POST", "registered-models/set-tag", {"name": MODEL, "key": "kronos.event.9999", "value": "{}"}),
        ("DELETE", "model-versions/delete", {"name": MODEL, "version": "1"}),
    ):
        refused = _request(registry, method, path, body, "scientist")
        assert refused.status_code == 403, (method, path, refused.status_code, refused.text)
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}


@pytest.mark.integration
@pytest.mark.slow
def test_serving_reads_and_downloads_champion_but_cannot_move_it(
    champion_and_challenger: AuthRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mlflow.artifacts

    registry = champion_and_challenger
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERS["serving"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", registry.password("serving"))
    client = MlflowClient(tracking_uri=registry.url, registry_uri=registry.url)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    location = client.get_model_version_download_uri(MODEL, "1")  # where the files are (proxied)
    downloaded = Path(mlflow.artifacts.download_artifacts(location, dst_path=str(tmp_path), tracking_uri=registry.url))
    assert (downloaded / "MLmodel").is_file()
    assert any(path.suffix == ".safetensors" for path in downloaded.rglob("*"))

    with pytest.raises(MlflowException) as caught:
        client.set_registered_model_alias(MODEL, "champion", "2")
    assert caught.value.get_http_status_code() == 403
    with pytest.raises(MlflowException) as caught:
        client.set_model_version_tag(MODEL, "2", "reviewed", "no")
    assert caught.value.get_http_status_code() == 403
    message = one_line_error(run_as(registry, "serving", "promote", "2", "--force", "--reason", "x"), 8)
    assert "kronos-serving" in message
    assert _champion(registry) == "1"


@pytest.mark.integration
@pytest.mark.slow
def test_manager_promotes_and_rolls_back(champion_and_challenger: AuthRegistry) -> None:
    registry = champion_and_challenger
    promoted = _ok(run_as(registry, "manager", "promote", "2", "--force", "--reason", "reviewed"))
    assert "promoted kronos version 2" in promoted and _champion(registry) == "2"
    _ok(run_as(registry, "manager", "rollback", "--reason", "regression"))
    assert _champion(registry) == "1"
