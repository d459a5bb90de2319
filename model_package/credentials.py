"""Secrets from files: `NAME_FILE=/run/secrets/x` fills `NAME` from that file.

MLflow's client reads its credentials only from `MLFLOW_TRACKING_USERNAME` and
`MLFLOW_TRACKING_PASSWORD`; Docker and Kubernetes hand secrets over as files. When
`NAME_FILE` is set and `NAME` is not, `load_secret` copies the file's text (less one trailing
newline) into this process's environment. A plain `NAME` wins over `NAME_FILE`.

Stdlib only. Errors name the variable and the path, never the file's contents.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from pathlib import Path

TRACKING_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
FILE_SUFFIX = "_FILE"


class CredentialsError(ValueError):
    """A secret file that is named but cannot be used (one-line message, no secret in it)."""


def read_secret_file(variable: str, path: str | Path) -> str:
    """The text of secret file `path` (named by `variable`), less one trailing newline.

    Raises CredentialsError when the file cannot be read, is not UTF-8 text or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(f"{variable}: no such file {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{variable}: cannot read {str(path)!r} ({type(exc).__name__})") from None
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            text = text[: -len(ending)]
            break
    if not text:
        raise CredentialsError(f"{variable}: file {str(path)!r} is empty")
    return text


def load_secret(name: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Set `name` from the file `name`_FILE names, unless `name` is already set.

    Returns whether a file was read."""
    environ = os.environ if environ is None else environ
    path = environ.get(name + FILE_SUFFIX)
    if not path or environ.get(name):
        return False
    environ[name] = read_secret_file(name + FILE_SUFFIX, path)
    return True


def load_secrets(names: Iterable[str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """`load_secret` for each name; returns the names that were read from files."""
    return [name for name in names if load_secret(name, environ)]


def load_tracking_credentials(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """MLFLOW_TRACKING_USERNAME_FILE / MLFLOW_TRACKING_PASSWORD_FILE -> the variables the
    MLflow client reads; returns the names that were read from files."""
    return load_secrets(TRACKING_CREDENTIALS, environ)
