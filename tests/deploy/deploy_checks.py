"""Static checks of the deployment files, as plain functions that return what is wrong.

Each checker is tested on the real files (must find nothing) and on broken copies (must
find the breakage), so a check that silently checks nothing fails the suite.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")
_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")
_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}")


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, arguments = current.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def dockerfile_copy_sources(dockerfile: Path) -> list[str]:
    """Build-context paths that COPY/ADD read (COPY --from=stage is not from the context)."""
    sources: list[str] = []
    for keyword, arguments in dockerfile_instructions(dockerfile):
        if keyword not in {"COPY", "ADD"}:
            continue
        json_form = arguments.startswith("[")
        parts = list(json.loads(arguments)) if json_form else shlex.split(arguments)
        flags = [part for part in parts if part.startswith("--")]
        if any(flag.startswith("--from") for flag in flags):
            continue
        paths = [part for part in parts if not part.startswith("--")]
        sources.extend(paths[:-1])  # the last one is the destination
    return sources


def dockerignore_patterns(context: Path) -> list[str]:
    """Patterns of the context's .dockerignore (empty without one)."""
    path = context / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def is_dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether a context path (or a directory above it) is excluded; `!` re-includes."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = {pattern, pattern.replace("**/", "")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            ignored = not negate
    return ignored


def missing_copy_sources(dockerfile: Path, context: Path) -> list[str]:
    """COPY/ADD sources that do not exist in the context or that .dockerignore excludes."""
    patterns = dockerignore_patterns(context)
    problems = []
    for source in dockerfile_copy_sources(dockerfile):
        if source.startswith(("http://", "https://")):
            continue
        matches = (
            sorted(context.glob(source))
            if any(c in source for c in "*?[")
            else ([context / source] if (context / source).exists() else [])
        )
        if not matches:
            problems.append(f"{source}: not in the build context")
        elif all(is_dockerignored(str(m.relative_to(context)), patterns) for m in matches):
            problems.append(f"{source}: excluded by .dockerignore")
    return problems


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                sources.append(source)
        elif volume.get("type") == "bind":
            sources.append(volume["source"])
    return sources


def compose_file_references(compose_file: Path) -> list[str]:
    """Host paths a compose file needs: bind mounts, build contexts and Dockerfiles,
    env_file, and file-based configs and secrets (relative to the compose file)."""
    data = yaml.safe_load(compose_file.read_text()) or {}
    references: list[str] = []
    for service in (data.get("services") or {}).values():
        references.extend(_bind_sources(service))
        build = service.get("build")
        if isinstance(build, str):
            references.append(build)
        elif isinstance(build, dict):
            context = build.get("context", ".")
            references.append(context)
            if "dockerfile" in build:
                references.append(str(Path(context) / build["dockerfile"]))
            elif "context" in build:
                references.append(str(Path(context) / "Dockerfile"))
        env_files = service.get("env_file", [])
        references.extend([env_files] if isinstance(env_files, str) else env_files)
    for section in ("configs", "secrets"):
        for item in (data.get(section) or {}).values():
            if isinstance(item, dict) and "file" in item:
                references.append(item["file"])
    return references


def missing_compose_files(compose_file: Path, operator_files: tuple[str, ...] = ()) -> list[str]:
    """Referenced host paths that do not exist, except those under `operator_files`
    prefixes (files each deployment creates itself, such as ./secrets/)."""
    base = compose_file.parent
    return [
        ref
        for ref in compose_file_references(compose_file)
        if not ref.startswith(operator_files) and not (base / Path(ref).expanduser()).exists()
    ]


def compose_variables(compose_file: Path) -> set[str]:
    """Names of the variables interpolated in a compose file (`$$` is a literal `$`)."""
    names = set()
    for line in compose_file.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in _VARIABLE.finditer(line.replace("$$", "")):
            names.add(match.group(1) or match.group(2))
    return names


def documented_variables(env_example: Path) -> dict[str, str]:
    """Variables set in an .env example, with the comment block above each (may be shared)."""
    documented: dict[str, str] = {}
    comment: list[str] = []
    after_assignment = False
    for raw in env_example.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if after_assignment:
                comment, after_assignment = [], False
            text = line.lstrip("#").strip()
            if text and not text.startswith("---"):
                comment.append(text)
            continue
        match = _ENV_LINE.match(line)
        if match:
            documented[match.group(1)] = " ".join(comment)
            after_assignment = True
        elif not line:
            comment, after_assignment = [], False
    return documented


def variable_problems(compose_files: list[Path], env_example: Path) -> list[str]:
    """Variables used but not documented, documented but unused, or without a comment."""
    used: set[str] = set()
    for compose_file in compose_files:
        used |= compose_variables(compose_file)
    documented = documented_variables(env_example)
    problems = [f"{name}: used but not in {env_example.name}" for name in sorted(used - documented.keys())]
    problems += [f"{name}: in {env_example.name} but used nowhere" for name in sorted(documented.keys() - used)]
    problems += [f"{name}: no comment explains it" for name, text in sorted(documented.items()) if not text]
    return problems


def compose_defaults(compose_file: Path) -> dict[str, set[str]]:
    """The fallback values written as `${NAME:-default}` (a name may appear several times)."""
    defaults: dict[str, set[str]] = {}
    for match in _DEFAULT.finditer(compose_file.read_text().replace("$$", "")):
        defaults.setdefault(match.group(1), set()).add(match.group(2))
    return defaults


def env_values(env_example: Path) -> dict[str, str]:
    """NAME=value assignments of an .env file."""
    values = {}
    for raw in env_example.read_text().splitlines():
        match = _ENV_LINE.match(raw.strip())
        if match:
            values[match.group(1)] = raw.strip()[len(match.group(0)) :]
    return values


def default_mismatches(compose_files: list[Path], env_example: Path) -> list[str]:
    """Variables whose compose fallback differs from the value .env.example documents."""
    values = env_values(env_example)
    problems = []
    for compose_file in compose_files:
        for name, defaults in sorted(compose_defaults(compose_file).items()):
            if name in values and defaults != {values[name]}:
                problems.append(
                    f"{name}: {compose_file.name} falls back to {sorted(defaults)}, "
                    f"{env_example.name} says {values[name]!r}"
                )
    return problems


# Variables that hold a registry credential: only their *_FILE form (a compose secret) may
# appear in the stack's environment.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
SECRETS_DIR = "/run/secrets/"


def _is_credential(name: str) -> bool:
    return name in CREDENTIAL_VARIABLES or (name.startswith("KRONOS_AUTH_") and name.endswith("_PASSWORD"))


def _mounted_secrets(service: dict[str, Any]) -> set[str]:
    return {item if isinstance(item, str) else item["source"] for item in service.get("secrets", [])}


def _command_lines(service: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("command", "entrypoint"):
        value = service.get(key)
        if value:
            lines.append(value if isinstance(value, str) else " ".join(map(str, value)))
    test = (service.get("healthcheck") or {}).get("test")
    if test:
        lines.append(test if isinstance(test, str) else " ".join(map(str, test)))
    return lines


def credential_problems(config: dict[str, Any], secret_values: list[str]) -> list[str]:
    """In a resolved compose config (`docker-compose config`): registry credentials that are
    plain variables instead of *_FILE secrets, *_FILE paths naming a secret the service does
    not mount or the file does not define, and passwords (the word or a known value) on a
    command line or in a healthcheck."""
    defined = set((config.get("secrets") or {}).keys())
    problems = []
    for name, service in sorted((config.get("services") or {}).items()):
        environment = service.get("environment") or {}
        mounted = _mounted_secrets(service)
        for variable, value in sorted(environment.items()):
            if _is_credential(variable):
                problems.append(f"{name}: {variable} is a plain variable (use {variable}_FILE and a secret)")
            if isinstance(value, str) and value.startswith(SECRETS_DIR):
                secret = value[len(SECRETS_DIR) :]
                if secret not in mounted:
                    problems.append(f"{name}: {variable} names secret {secret!r}, which the service does not mount")
                if secret not in defined:
                    problems.append(f"{name}: {variable} names secret {secret!r}, which the file does not define")
        for line in _command_lines(service):
            lowered = line.lower()
            if "password" in lowered or any(value and value in line for value in secret_values):
                problems.append(f"{name}: a password on the command line: {line[:80]!r}")
    return problems


def secrets_recipe(compose_file: Path) -> str:
    """The shell command the compose file's header comment gives to create its secret files:
    the `#   ` lines after "Create the missing ones once"."""
    lines = compose_file.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Create the missing ones once" in line) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        recipe.append(line[4:])
    return "\n".join(recipe)
