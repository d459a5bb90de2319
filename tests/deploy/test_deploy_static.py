"""Static checks of the Dockerfile, the compose files and .env.example (no Docker engine).

Every checker also runs on a deliberately broken copy, proving that it catches breakage.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    compose_file_references,
    compose_variables,
    credential_problems,
    default_mismatches,
    dockerfile_copy_sources,
    dockerfile_instructions,
    dockerignore_patterns,
    documented_variables,
    env_values,
    is_dockerignored,
    missing_compose_files,
    missing_copy_sources,
    secrets_recipe,
    variable_problems,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_DEV = ROOT / "docker-compose.dev.yml"
ENV_EXAMPLE = ROOT / ".env.example"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
DOCKER_COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """Lint with hadolint (fails on any finding, info included)."""
    return subprocess.run(
        [HADOLINT, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def compose_config(*files: Path, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` (validates and resolves; needs no Docker engine)."""
    command = [DOCKER_COMPOSE, "--env-file", str(env_file), "--project-directory", str(files[0].parent)]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60)


def _resolved(*files: Path) -> dict[str, Any]:
    result = compose_config(*files)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a resolved service's volumes (short or long syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts[target] = source
    return mounts


# ------------------------------------------------------------------------- Dockerfile


def test_hadolint_is_clean() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    assert "FROM ${PYTHON_IMAGE} AS builder" in text
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url' in text
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert 'CMD ["mlserver", "start", "/app/serving"]' in text
    # the runtime stage is the last (default) one and runs as a non-root user
    runtime = text.rsplit("FROM ", 1)[1]
    assert runtime.startswith("${PYTHON_IMAGE} AS runtime")
    assert "USER 10001:10001" in runtime
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    # sources and build tools stay in the builder
    assert "pip install" not in runtime and "COPY --from=builder /src" not in runtime


def test_image_serves_on_all_interfaces_at_the_ports_the_stack_expects(tmp_path: Path) -> None:
    """Run the Dockerfile's settings.json rewrite on a copy: host 0.0.0.0, ports kept."""
    settings = json.loads((ROOT / "serving" / "settings.json").read_text())
    assert (settings["http_port"], settings["grpc_port"], settings["metrics_port"]) == (
        8080,
        8081,
        8082,
    )  # gateway upstreams, Prometheus target and HEALTHCHECK use these
    (rewrite,) = [
        arguments
        for keyword, arguments in dockerfile_instructions(DOCKERFILE)
        if keyword == "RUN" and "settings.json" in arguments
    ]
    command = shlex.split(rewrite)
    assert command[:2] == ["python", "-c"]
    copy = tmp_path / "settings.json"
    shutil.copy(ROOT / "serving" / "settings.json", copy)
    code = command[2].replace("/app/serving/settings.json", str(copy))
    subprocess.run([sys.executable, "-c", code], check=True)
    assert json.loads(copy.read_text()) == {**settings, "host": "0.0.0.0"}


def test_every_copied_file_exists_and_is_in_the_context() -> None:
    sources = dockerfile_copy_sources(DOCKERFILE)
    assert {
        "pyproject.toml",
        "README.md",
        "model_package",
        "serving",
        "serving/gateway/render.py",
        "serving/gateway/nginx.conf.template",
    } <= set(sources)
    assert missing_copy_sources(DOCKERFILE, ROOT) == []


def test_copy_checker_catches_missing_and_dockerignored_sources(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "x.py").write_text("")
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        "FROM python:3.11-slim AS a\n"
        "COPY pyproject.toml \\\n    README.md /src/\n"
        "COPY --chown=1:1 does_not_exist /x\n"
        "COPY tests /tests\n"
        "COPY --from=a /opt /opt\n"
    )
    assert missing_copy_sources(broken, tmp_path) == [
        "does_not_exist: not in the build context",
        "tests: excluded by .dockerignore",
    ]


def test_image_checks_that_the_demo_model_is_installed_and_readable() -> None:
    """The compose `register` job logs the demo model by default: the image build fails
    without it, checked as the server's user on the installed package (not /src)."""
    runtime = DOCKERFILE.read_text().rsplit("FROM ", 1)[1]
    after_user = runtime.split("USER 10001:10001", 1)[1]
    checks = [a for k, a in dockerfile_instructions(DOCKERFILE) if k == "RUN" and "demo_checkpoints" in a]
    assert len(checks) == 1 and "demo_checkpoints" in after_user
    assert checks[0].startswith("python -I -c ") and "model.safetensors" in checks[0]


def test_the_images_install_carries_the_demo_weights(tmp_path: Path) -> None:
    """Build the wheel the builder stage installs (`pip install /src[serving]`) from the
    files its COPY instructions take: the demo checkpoints are package data in it, and the
    kronos-auth MLflow app is an entry point of it."""
    from model_package.demo import DEMO_DIR, demo_checkpoints

    context = tmp_path / "src"
    for source in dict.fromkeys(dockerfile_copy_sources(DOCKERFILE)):  # builder's, runtime's
        if source.startswith("serving/gateway/"):
            continue  # the gateway stage's files (inside serving/, copied with it)
        target = context / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / source, target)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", str(context)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("kronos_serving-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package_root = DEMO_DIR.parent.parent
    checkpoints = {
        str((directory / name).relative_to(package_root))
        for directory in demo_checkpoints()
        for name in ("config.json", "model.safetensors")
    }
    shipped = {
        str(path.relative_to(package_root))
        for path in DEMO_DIR.rglob("*")
        if path.suffix in {".json", ".md", ".safetensors"}
    }
    assert checkpoints <= shipped <= names, sorted(shipped - names)
    # the image's `mlflow server --app-name kronos-auth` finds the app through this entry point
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[mlflow.app]\nkronos-auth = registry_scripts.auth_app:create_app" in text


def test_dockerignore_rules() -> None:
    patterns = [".venv", "**/__pycache__", "tests", "!tests/keep.py"]
    assert is_dockerignored(".venv/bin/python", patterns)
    assert is_dockerignored("serving/__pycache__/x.pyc", patterns)
    assert is_dockerignored("tests/a.py", patterns)
    assert not is_dockerignored("tests/keep.py", patterns)
    assert not is_dockerignored("serving/gateway/render.py", patterns)


# ------------------------------------------------------------------------- compose


def test_compose_config_is_valid_alone_and_with_dev_override() -> None:
    assert compose_config(COMPOSE).returncode == 0, compose_config(COMPOSE).stderr
    result = compose_config(COMPOSE, COMPOSE_DEV)
    assert result.returncode == 0, result.stderr


def test_compose_requires_the_passwords(tmp_path: Path) -> None:
    env = tmp_path / "no-passwords.env"
    env.write_text("".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines() if "PASSWORD" not in line))
    result = compose_config(COMPOSE, env_file=env)
    assert result.returncode != 0
    assert "PASSWORD" in result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace(
            "      postgres:\n        condition: service_healthy",
            "      postgres:\n        condition: when_it_feels_like_it",
        )
    )
    result = compose_config(broken)
    assert result.returncode != 0
    assert "when_it_feels_like_it" in result.stderr


def test_stack_services_networks_healthchecks_limits() -> None:
    config = _resolved(COMPOSE)
    services = config["services"]
    assert set(services) == {
        "postgres",
        "mlflow",
        "auth-setup",
        "register",
        "kronos",
        "kronos-challenger",
        "gateway",
        "gateway-exporter",
        "prometheus",
        "grafana",
    }
    assert config["networks"]["serving"]["internal"] is True
    assert config["networks"]["monitoring"]["internal"] is True
    for name, service in services.items():
        if name in ("auth-setup", "register"):  # one-shot jobs
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
        limits = service["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"], name
    # the model server is reachable only through the gateway
    assert "ports" not in services["kronos"] and "ports" not in services["kronos-challenger"]
    # the shadow challenger: the champion's server on the challenger alias, opt-in (profile)
    challenger = services["kronos-challenger"]
    assert challenger["profiles"] == ["shadow"]
    assert challenger["environment"]["KRONOS_MODEL_URI"] == "models:/kronos@challenger"
    shared = {k: v for k, v in challenger["environment"].items() if k != "KRONOS_MODEL_URI"}
    assert shared == {k: v for k, v in services["kronos"]["environment"].items() if k != "KRONOS_MODEL_URI"}
    assert challenger["environment"]["KRONOS_LIVE_STORE_URI"].startswith("postgresql+psycopg://")
    assert set(challenger["networks"]) == {"serving", "monitoring"}
    assert set(services["kronos"]["networks"]) == {"serving", "monitoring"}
    assert "serving" not in services["prometheus"]["networks"]
    assert services["postgres"]["networks"].keys() == {"serving"}
    kronos_deps = services["kronos"]["depends_on"]
    assert kronos_deps["register"]["condition"] == "service_completed_successfully"
    assert kronos_deps["mlflow"]["condition"] == "service_healthy"
    assert services["register"]["depends_on"]["auth-setup"]["condition"] == "service_completed_successfully"
    assert services["auth-setup"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["kronos"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_and_register_commands() -> None:
    services = _resolved(COMPOSE)["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow["command"]
    assert mlflow["command"][mlflow["command"].index("--workers") + 1] == "1"
    assert "--artifacts-destination" in mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert services["register"]["command"][:2] == ["sh", "-c"]  # see test_register_job_*
    assert services["kronos"]["environment"]["KRONOS_MODEL_URI"] == "models:/kronos@champion"
    gateway_env = services["gateway"]["environment"]
    assert gateway_env["KRONOS_GATEWAY_UPSTREAM_HTTP"] == "kronos:8080"
    assert (
        gateway_env["KRONOS_GATEWAY_SERVER_DEADLINE_S"]
        == services["kronos"]["environment"]["KRONOS_DEFAULT_DEADLINE_S"]
    )


def _register_job() -> tuple[str, dict[str, str]]:
    """The resolved `register` job's shell script (`$$` unescaped) and environment."""
    register = _resolved(COMPOSE)["services"]["register"]
    command = register["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    return command[2].replace("$$", "$"), {k: str(v) for k, v in register["environment"].items()}


def test_register_job_defaults_to_the_shipped_demo_model() -> None:
    """No model configured (.env.example's default): `kronos-registry log --demo`, only when
    there is no champion; a hub model only when KRONOS_DEFAULT_MODEL names one."""
    script, environment = _register_job()
    assert environment["KRONOS_DEFAULT_MODEL"] == "" and environment["KRONOS_DEFAULT_TOKENIZER"] == ""
    lines = [line.strip() for line in script.strip().splitlines()]
    assert shlex.split(lines[-1]) == ["exec", "kronos-registry", "log", "--demo", "--if-no-champion", "--promote"]
    assert lines[0] == 'if [ -n "${KRONOS_DEFAULT_MODEL}" ]; then'
    hub = shlex.split(lines[1])
    assert hub[:4] == ["kronos-registry", "log", "--if-no-champion", "--promote"]
    assert hub[4:6] == ["--model", "${KRONOS_DEFAULT_MODEL}"]


def _run_register_script(
    tmp_path: Path, registry_exit: int, **environment: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the job's script with `sh` and a stand-in `kronos-registry` on PATH that records
    its arguments and exits with `registry_exit` unless it logs the demo model."""
    script, compose_environment = _register_job()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "kronos-registry"
    stand_in.write_text(
        '#!/bin/sh\necho "$*" >> "$CALLS"\ncase " $* " in *" --demo "*) exit 0;; esac\nexit "$REGISTRY_EXIT"\n'
    )
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        **compose_environment,
        **environment,
        "CALLS": str(calls),
        "REGISTRY_EXIT": str(registry_exit),
    }
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)
    return done, calls.read_text().splitlines() if calls.exists() else []


DEMO_CALL = "log --demo --if-no-champion --promote"
HUB_CALL = "log --if-no-champion --promote --model NeoQuasar/Kronos-small"


def test_register_job_uses_a_configured_hub_model_and_falls_back_to_the_demo(tmp_path: Path) -> None:
    done, calls = _run_register_script(tmp_path, 0)
    assert (done.returncode, calls) == (0, [DEMO_CALL])
    done, calls = _run_register_script(tmp_path, 0, KRONOS_DEFAULT_MODEL="NeoQuasar/Kronos-small")
    assert (done.returncode, calls) == (0, [HUB_CALL])
    tokenizer = {"KRONOS_DEFAULT_TOKENIZER": "NeoQuasar/Kronos-Tokenizer-base"}
    done, calls = _run_register_script(tmp_path, 0, KRONOS_DEFAULT_MODEL="NeoQuasar/Kronos-small", **tokenizer)
    assert (done.returncode, calls) == (0, [f"{HUB_CALL} --tokenizer NeoQuasar/Kronos-Tokenizer-base"])
    # exit 5: the checkpoint cannot be resolved (hub unreachable, not cached) -> the demo model
    done, calls = _run_register_script(tmp_path, 5, KRONOS_DEFAULT_MODEL="NeoQuasar/Kronos-small")
    assert (done.returncode, calls) == (0, [HUB_CALL, DEMO_CALL])
    assert "registering the shipped demo model instead" in done.stderr
    # any other failure (4: registry unreachable) fails the job: no demo model behind its back
    done, calls = _run_register_script(tmp_path, 4, KRONOS_DEFAULT_MODEL="NeoQuasar/Kronos-small")
    assert (done.returncode, calls) == (4, [HUB_CALL])


@pytest.mark.integration
def test_register_job_offline_registers_the_demo_model_with_the_real_cli(tmp_path: Path) -> None:
    """The job's script with the real `kronos-registry`, a hub model configured, the hub
    off and an empty cache: the CLI exits 5 and the job registers the shipped demo pair."""
    import hashlib

    from mlflow import MlflowClient

    from model_package.demo import demo_checkpoints

    script, compose_environment = _register_job()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_", "KRONOS_"))}
    env.update(compose_environment)
    password = tmp_path / "mlflow_manager_password"  # the job's secret (sqlite ignores it)
    password.write_text("manager-password-1\n")
    env.update(
        MLFLOW_TRACKING_PASSWORD_FILE=str(password),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        MLFLOW_TRACKING_URI=uri,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        KRONOS_DEFAULT_MODEL="NeoQuasar/Kronos-small",
    )
    done = subprocess.run(
        ["sh", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "registering the shipped demo model instead" in done.stderr
    assert "RANDOM" not in done.stderr
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("kronos", "champion")
    assert champion.tags["kronos.demo"] == "true"
    shipped = hashlib.sha256((demo_checkpoints()[1] / "model.safetensors").read_bytes()).hexdigest()
    assert champion.tags["kronos.weights.sha256"] == shipped
    assert len(client.search_model_versions("name='kronos'")) == 1  # the failed hub log registered nothing


def test_dev_override_mounts_sources_for_hot_reload() -> None:
    kronos = _resolved(COMPOSE, COMPOSE_DEV)["services"]["kronos"]
    assert kronos["command"][0] == "watchfiles"
    assert kronos["environment"]["PYTHONPATH"] == "/app/src"
    assert kronos["working_dir"] == "/app/src"
    assert "mlserver start /app/serving" in kronos["command"]
    targets = set(_mounts(kronos))
    assert {"/app/src/serving", "/app/src/model_package", "/app/src/registry_scripts"} <= targets


def test_every_mounted_config_exists() -> None:
    for compose_file in (COMPOSE, COMPOSE_DEV):
        references = compose_file_references(compose_file)
        assert references, compose_file
        assert missing_compose_files(compose_file, operator_files=("./secrets/",)) == [], compose_file
    references = set(compose_file_references(COMPOSE))
    assert {
        "./serving/monitoring/prometheus.yml",
        "./serving/monitoring/alerts.yml",
        "./serving/monitoring/grafana/provisioning",
        "./serving/monitoring/grafana/dashboards",
        "./serving/live/postgres-init.sh",
        ".",
        "Dockerfile",
    } <= references


def test_the_model_servers_write_the_live_store_with_their_own_credentials() -> None:
    """The live store is the kronos_live role's own database, its password a secret file:
    the model servers hold nothing of the MLflow backend store."""
    services = _resolved(COMPOSE)["services"]
    for name in ("kronos", "kronos-challenger"):
        environment = services[name]["environment"]
        assert environment["KRONOS_LIVE_STORE_URI"] == "postgresql+psycopg://kronos_live@postgres:5432/kronos_live"
        assert environment["KRONOS_LIVE_STORE_PASSWORD_FILE"] == "/run/secrets/live_db_password"
        assert "live_db_password" in [s if isinstance(s, str) else s["source"] for s in services[name]["secrets"]]
        assert not any("change-me" in str(value) for value in environment.values()), name  # no POSTGRES_PASSWORD
    postgres = services["postgres"]
    assert "live_db_password" in [s if isinstance(s, str) else s["source"] for s in postgres["secrets"]]
    assert _mounts(postgres)["/docker-entrypoint-initdb.d/20-kronos-live.sh"].endswith("serving/live/postgres-init.sh")


def test_mount_checker_catches_a_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace("./serving/monitoring/alerts.yml", "./serving/monitoring/alert-rules.yml")
    )
    missing = missing_compose_files(broken)
    assert "./serving/monitoring/alert-rules.yml" in missing


def test_monitoring_mounts_match_the_paths_the_configs_expect() -> None:
    services = _resolved(COMPOSE)["services"]
    mounts = _mounts(services["prometheus"])
    rules = yaml.safe_load((ROOT / "serving/monitoring/prometheus.yml").read_text())
    for rule_file in rules["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts
    providers = yaml.safe_load((ROOT / "serving/monitoring/grafana/provisioning/dashboards/kronos.yml").read_text())
    grafana_targets = set(_mounts(services["grafana"]))
    assert providers["providers"][0]["options"]["path"] in grafana_targets
    assert "/etc/grafana/provisioning" in grafana_targets


# ------------------------------------------------------------------------- registry authentication


def _example_passwords() -> list[str]:
    """The example passwords of .env.example (what a leaked password would contain)."""
    return [value for name, value in env_values(ENV_EXAMPLE).items() if "PASSWORD" in name and value]


def test_mlflow_runs_the_kronos_auth_app() -> None:
    """The server runs `--app-name kronos-auth`, which the project registers as an
    `mlflow.app` entry point (the image installs the project, so it has it too)."""
    import importlib.metadata
    import tomllib

    from registry_scripts import auth_app

    mlflow = _resolved(COMPOSE)["services"]["mlflow"]
    command = mlflow["command"]
    assert command[command.index("--app-name") + 1] == "kronos-auth"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mlflow.app"]
    assert declared == {"kronos-auth": "registry_scripts.auth_app:create_app"}
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="mlflow.app")}
    assert installed["kronos-auth"] == declared["kronos-auth"], "rerun pip install -e . (entry points)"
    assert callable(auth_app.create_app)
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == "/run/secrets/mlflow_admin_password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == "/run/secrets/mlflow_flask_secret_key"
    assert env["KRONOS_AUTH_MANAGED_ALIASES"] == "champion"
    # the healthcheck needs no credentials: MLflow's auth leaves /health open
    assert "http://127.0.0.1:5000/health" in " ".join(mlflow["healthcheck"]["test"])


def test_each_service_authenticates_as_its_role() -> None:
    """Model servers read (serving account), `register` promotes (manager), `auth-setup`
    provisions (admin); names agree between the jobs and with auth_setup's defaults."""
    from registry_scripts.auth_setup import AccountSettings

    services = _resolved(COMPOSE)["services"]
    kronos, register, setup = (services[n]["environment"] for n in ("kronos", "register", "auth-setup"))
    assert (kronos["MLFLOW_TRACKING_USERNAME"], kronos["MLFLOW_TRACKING_PASSWORD_FILE"]) == (
        setup["KRONOS_AUTH_SERVING_USER"],
        setup["KRONOS_AUTH_SERVING_PASSWORD_FILE"],
    )
    assert (register["MLFLOW_TRACKING_USERNAME"], register["MLFLOW_TRACKING_PASSWORD_FILE"]) == (
        setup["KRONOS_AUTH_MANAGER_USER"],
        setup["KRONOS_AUTH_MANAGER_PASSWORD_FILE"],
    )
    server = services["mlflow"]["environment"]
    assert setup["MLFLOW_TRACKING_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert setup["MLFLOW_TRACKING_PASSWORD_FILE"] == server["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"]
    assert services["auth-setup"]["command"] == ["kronos-registry", "auth-setup"]
    defaults = AccountSettings()
    assert (defaults.serving_user, defaults.scientist_user, defaults.manager_user) == (
        setup["KRONOS_AUTH_SERVING_USER"],
        setup["KRONOS_AUTH_SCIENTIST_USER"],
        setup["KRONOS_AUTH_MANAGER_USER"],
    )
    assert len({kronos["MLFLOW_TRACKING_PASSWORD_FILE"], register["MLFLOW_TRACKING_PASSWORD_FILE"]}) == 2


def test_registry_credentials_are_secrets_never_variables_or_arguments() -> None:
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_DEV)):
        assert credential_problems(_resolved(*files), _example_passwords()) == [], files


def test_credential_checker_catches_leaks() -> None:
    import copy

    leaky = copy.deepcopy(_resolved(COMPOSE))
    services = leaky["services"]
    services["auth-setup"]["command"] = ["kronos-registry", "auth-setup", "--admin-password", "x"]
    services["gateway"]["healthcheck"]["test"] = ["CMD", "curl", "-u", "admin:change-me", "http://x"]
    services["kronos"]["environment"]["MLFLOW_TRACKING_PASSWORD"] = "inline"
    services["register"]["secrets"] = []
    assert credential_problems(leaky, _example_passwords()) == [
        "auth-setup: a password on the command line: 'kronos-registry auth-setup --admin-password x'",
        "gateway: a password on the command line: 'CMD curl -u admin:change-me http://x'",
        "kronos: MLFLOW_TRACKING_PASSWORD is a plain variable (use MLFLOW_TRACKING_PASSWORD_FILE and a secret)",
        "register: MLFLOW_TRACKING_PASSWORD_FILE names secret 'mlflow_manager_password', "
        "which the service does not mount",
    ]
    del leaky["secrets"]["mlflow_serving_password"]
    assert credential_problems(leaky, [])[-3:] == [
        "kronos: MLFLOW_TRACKING_PASSWORD_FILE names secret 'mlflow_serving_password', which the file does not define",
        "kronos-challenger: MLFLOW_TRACKING_PASSWORD_FILE names secret 'mlflow_serving_password', "
        "which the file does not define",
        "register: MLFLOW_TRACKING_PASSWORD_FILE names secret 'mlflow_manager_password', "
        "which the service does not mount",
    ]


def test_the_documented_recipe_creates_every_secret_file_once(tmp_path: Path) -> None:
    """The command in docker-compose.yml's header makes each file the `secrets:` section
    names (readable by the containers' user, in a 700 directory) and keeps existing ones."""
    config = yaml.safe_load(COMPOSE.read_text())
    files = sorted(item["file"] for item in config["secrets"].values())
    assert files and all(f.startswith("./secrets/") for f in files)
    recipe = secrets_recipe(COMPOSE)
    assert recipe.startswith("mkdir")
    subprocess.run(["sh", "-c", recipe], cwd=tmp_path, check=True, timeout=60)
    first = {}
    for name in files:
        path = tmp_path / name
        first[name] = path.read_text()
        assert len(first[name].strip()) >= 12, name  # MLflow's minimum password length
        assert path.stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    subprocess.run(["sh", "-c", recipe], cwd=tmp_path, check=True, timeout=60)
    assert {name: (tmp_path / name).read_text() for name in files} == first
    # never committed, never sent to the image build
    ignored = subprocess.run(["git", "check-ignore", "-q", "secrets/mlflow_admin_password"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0
    assert is_dockerignored("secrets/mlflow_admin_password", dockerignore_patterns(ROOT))


# ------------------------------------------------------------------------- variables


def test_every_compose_variable_is_documented() -> None:
    used = compose_variables(COMPOSE) | compose_variables(COMPOSE_DEV)
    assert {"POSTGRES_PASSWORD", "KRONOS_GATEWAY_ALLOW_CIDRS", "TORCH_INDEX_URL"} <= used
    assert variable_problems([COMPOSE, COMPOSE_DEV], ENV_EXAMPLE) == []


def test_variable_checker_catches_undocumented_and_stale_variables(tmp_path: Path) -> None:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(COMPOSE.read_text() + "\n# ${IN_A_COMMENT}\nx-extra: ${NEW_SECRET}\n")
    env = tmp_path / ".env.example"
    env.write_text(ENV_EXAMPLE.read_text() + "\nORPHAN=1\n")
    assert variable_problems([compose, COMPOSE_DEV], env) == [
        "NEW_SECRET: used but not in .env.example",
        "ORPHAN: in .env.example but used nowhere",
        "ORPHAN: no comment explains it",
    ]


def test_documented_values_are_the_compose_defaults(tmp_path: Path) -> None:
    assert default_mismatches([COMPOSE, COMPOSE_DEV], ENV_EXAMPLE) == []
    drifted = tmp_path / ".env.example"
    drifted.write_text(
        ENV_EXAMPLE.read_text().replace("KRONOS_GATEWAY_RATE_LIMIT=20r/s", "KRONOS_GATEWAY_RATE_LIMIT=50r/s")
    )
    assert default_mismatches([COMPOSE, COMPOSE_DEV], drifted) == [
        "KRONOS_GATEWAY_RATE_LIMIT: docker-compose.yml falls back to ['20r/s'], .env.example says '50r/s'"
    ]


def test_env_parser_reads_comment_blocks(tmp_path: Path) -> None:
    env = tmp_path / ".env.example"
    env.write_text("# --- section ---\n# The rate.\nRATE=1\nBURST=2\n# Other.\nX=3\n\nY=4\n")
    assert documented_variables(env) == {"RATE": "The rate.", "BURST": "The rate.", "X": "Other.", "Y": ""}


@pytest.mark.parametrize("literal", ['pg_isready -U "$$POSTGRES_USER"'])
def test_double_dollar_is_not_a_variable(tmp_path: Path, literal: str) -> None:
    compose = tmp_path / "c.yml"
    compose.write_text(f"services:\n  a:\n    command: {literal} ${{REAL}}\n")
    assert compose_variables(compose) == {"REAL"}


# ------------------------------------------------------------------------- same config, locally


def test_compose_gateway_environment_renders_a_config_nginx_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's compose environment, rendered and checked by the real nginx.

    Only what cannot exist outside Docker changes: upstream host names (nginx -t resolves
    them) and the log path (a volume in the stack)."""
    from serving.gateway.render import GatewaySettings, check_config, prepare_prefix

    environment = _resolved(COMPOSE)["services"]["gateway"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("KRONOS_GATEWAY_UPSTREAM_HTTP", "127.0.0.1:8080")
    monkeypatch.setenv("KRONOS_GATEWAY_UPSTREAM_GRPC", "127.0.0.1:8081")
    monkeypatch.setenv("KRONOS_GATEWAY_ACCESS_LOG", "logs/access.log")
    settings = GatewaySettings()
    assert settings.rate_limit == "20r/s" and settings.max_body_size == "16m"
    assert settings.server_deadline_s == 300
    assert settings.shadow_http == settings.shadow_grpc == [] and settings.shadow_percent == 100  # opt-in
    prepare_prefix(settings, tmp_path)
    check_config(tmp_path)
    # with the shadow challenger on (its host name replaced, as above)
    shadowed = settings.model_copy(
        update={"shadow_http": ["127.0.0.1:8090"], "shadow_grpc": ["127.0.0.1:8091"], "shadow_percent": 12.5}
    )
    prepare_prefix(shadowed, tmp_path / "shadowed")
    check_config(tmp_path / "shadowed")


def test_ports_agree_across_settings_dockerfile_compose_and_prometheus() -> None:
    from serving.gateway.render import GatewaySettings

    dockerfile = DOCKERFILE.read_text()
    gateway_defaults = GatewaySettings()
    # the gateway image's HEALTHCHECK and EXPOSE use the renderer's defaults
    assert f"127.0.0.1:{gateway_defaults.status_port}/gateway/health" in dockerfile
    assert f"EXPOSE {gateway_defaults.http_port} {gateway_defaults.grpc_port} 9145" in dockerfile
    services = _resolved(COMPOSE)["services"]
    published = {
        str(p["target"]) if isinstance(p, dict) else p.split(":")[-1].split("/")[0]
        for p in services["gateway"]["ports"]
    }
    assert published == {
        services["gateway"]["environment"]["KRONOS_GATEWAY_HTTP_PORT"],
        services["gateway"]["environment"]["KRONOS_GATEWAY_GRPC_PORT"],
    }
    assert "9145" in services["gateway-exporter"]["command"]
    prometheus = yaml.safe_load((ROOT / "serving/monitoring/prometheus.yml").read_text())
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for config in job.get("static_configs", [])
        for target in config["targets"]
    }
    assert "gateway-exporter:9145" in targets
    mlserver = json.loads((ROOT / "serving" / "settings.json").read_text())
    kronos_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "kronos")
    assert kronos_job["dns_sd_configs"][0]["port"] == mlserver["metrics_port"]


def test_service_environment_names_are_real_settings() -> None:
    """A misspelt KRONOS_* variable stops the server at start-up: none in the stack."""
    from model_package.settings import ModelSettings, settings_variables
    from serving.gateway.render import GatewaySettings
    from serving.live.settings import LiveSettings
    from serving.settings import ServingSettings

    services = _resolved(COMPOSE, COMPOSE_DEV)["services"]
    serving_fields = settings_variables(ModelSettings, ServingSettings, LiveSettings)
    for server in ("kronos", "kronos-challenger"):
        kronos_env = {name for name in services[server]["environment"] if name.startswith("KRONOS_")}
        assert kronos_env and kronos_env <= serving_fields, kronos_env - serving_fields
    gateway_fields = {f"KRONOS_GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    gateway_env = set(services["gateway"]["environment"])
    assert gateway_env <= gateway_fields, gateway_env - gateway_fields
