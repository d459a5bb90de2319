"""`kronos-registry log`: register a Kronos checkpoint as a new version with alias `challenger`.

Weights come from hub ids (default `NeoQuasar/Kronos-small` + its tokenizer; offline they
resolve from the local Hugging Face cache), local checkpoint directories, or `--demo`: the
small demo pair that ships with the project (`model_package/demo_weights`, trained on daily
S&P 500 and NASDAQ bars, see its MODEL_CARD.md), tagged `kronos.demo=true`. `--demo
--demo-seed N` registers RANDOM weights of a small shape instead (tests of the workflow
only: their forecasts are meaningless).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

import model_package
from model_package.demo import DEMO_MAX_CONTEXT, DEMO_SOURCE, demo_checkpoints
from model_package.kronos import KronosConfig, TokenizerConfig, write_random_checkpoint
from model_package.log_model import log_kronos_model

from .errors import NotFoundError
from .events import append_event
from .registry import CHALLENGER, CHAMPION, LOG_EXPERIMENT, ROOT, Registry, start_run

DEFAULT_MODEL = "NeoQuasar/Kronos-small"
DEMO_NOTE = (
    "note: --demo registers the small demo Kronos trained on daily S&P 500 / NASDAQ bars "
    "(model_package/demo_weights/MODEL_CARD.md): for trying the workflow, not for trading"
)
# `--demo --demo-seed N`: random weights of this small shape (registry workflow tests).
RANDOM_MAX_CONTEXT = 256
RANDOM_TOKENIZER = TokenizerConfig(
    d_in=6,
    d_model=32,
    n_heads=2,
    ff_dim=64,
    n_enc_layers=2,
    n_dec_layers=2,
    ffn_dropout_p=0.0,
    attn_dropout_p=0.0,
    resid_dropout_p=0.0,
    s1_bits=8,
    s2_bits=8,
    beta=0.05,
    gamma0=1.0,
    gamma=1.1,
    zeta=0.05,
    group_size=4,
)
RANDOM_MODEL = KronosConfig(
    s1_bits=8,
    s2_bits=8,
    n_layers=2,
    d_model=64,
    n_heads=4,
    ff_dim=128,
    ffn_dropout_p=0.0,
    attn_dropout_p=0.0,
    resid_dropout_p=0.0,
    token_dropout_p=0.0,
    learn_te=True,
)
RANDOM_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: --demo --demo-seed registers RANDOM WEIGHTS (tagged kronos.demo=true).
!! Their forecasts are meaningless: use them only to exercise the registry workflow.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


@dataclass
class LogRequest:
    """What to log: hub ids or directories (or the demo pair) plus options."""

    model: str | None
    tokenizer: str | None
    demo: bool
    demo_seed: int | None  # with demo: random weights of this seed instead of the trained pair
    revision: str | None
    tokenizer_revision: str | None
    max_context: int | None
    if_no_champion: bool
    promote: bool
    reason: str | None


def code_version() -> str:
    """Package version plus the git commit of the project (`-dirty` with local changes)."""
    version = model_package.__version__
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'-dirty' if dirty else ''}" if commit else version


def config_digest(metadata: dict) -> str:
    """sha256 (first 16 hex) of the model + tokenizer configs: same digest, same network shape."""
    configs = {k: metadata.get(k) for k in ("model_config", "tokenizer_config")}
    return hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:16]


def _source_tag(source: dict | None) -> tuple[str, str]:
    """(source, revision) strings of one weight_source() dict."""
    source = source or {}
    if source.get("kind") == "hub":
        revision = source.get("resolved_revision") or source.get("revision") or "unknown"
        return f"hub:{source.get('id')}", str(revision)
    return f"path:{source.get('path')}", f"sha256:{str(source.get('weights_sha256'))[:16]}"


def version_tags(
    metadata: dict,
    *,
    source: str | None = None,
    tokenizer_source: str | None = None,
    demo: bool = False,
    warning: str | None = None,
) -> dict[str, str]:
    """The tags every logged version carries: weight source + revision, digests, code version.
    `source` / `tokenizer_source` replace the sources read from the metadata (a demo pair,
    a fine-tune whose weights were written to a temporary directory)."""
    model_source, model_revision = _source_tag(metadata.get("model_source"))
    tokenizer_tag, tokenizer_revision = _source_tag(metadata.get("tokenizer_source"))
    tags = {
        "kronos.weights.source": source or model_source,
        "kronos.weights.revision": model_revision,
        "kronos.tokenizer.source": tokenizer_source or source or tokenizer_tag,
        "kronos.tokenizer.revision": tokenizer_revision,
        "kronos.weights.sha256": str((metadata.get("model_source") or {}).get("weights_sha256")),
        "kronos.config_digest": config_digest(metadata),
        "kronos.max_context": str(metadata.get("max_context")),
        "kronos.code_version": code_version(),
        "kronos.demo": "true" if demo else "false",
    }
    if warning:
        tags["kronos.warning"] = warning
    return tags


def _demo_pair() -> tuple[Path, Path]:
    """The shipped demo checkpoints, or NotFoundError (exit 5) when they are missing."""
    try:
        return demo_checkpoints()
    except FileNotFoundError as exc:
        raise NotFoundError(str(exc)) from None


def _log(registry: Registry, request: LogRequest, workdir: Path) -> mlflow.models.model.ModelInfo:
    """Log + register the pyfunc inside a run of the log experiment."""
    tokenizer: str | Path | None = request.tokenizer
    model: str | Path = request.model or DEFAULT_MODEL
    max_context = request.max_context
    if request.demo and request.demo_seed is not None:
        tokenizer = write_random_checkpoint(RANDOM_TOKENIZER, workdir / "tokenizer", request.demo_seed)
        model = write_random_checkpoint(RANDOM_MODEL, workdir / "model", request.demo_seed + 1)
        max_context = max_context or RANDOM_MAX_CONTEXT
    elif request.demo:
        tokenizer, model = _demo_pair()
        max_context = max_context or DEMO_MAX_CONTEXT
    run_name = "log-demo" if request.demo else f"log-{Path(str(model)).name}"
    with start_run(registry, LOG_EXPERIMENT, run_name):
        mlflow.set_tag("kronos.demo", "true" if request.demo else "false")
        return log_kronos_model(
            tokenizer,
            model,
            registered_model_name=registry.model_name,
            max_context=max_context,
            revision=request.revision,
            tokenizer_revision=request.tokenizer_revision,
        )


def log_version(registry: Registry, request: LogRequest) -> str | None:
    """Register a new version (alias challenger, optionally champion); returns its number,
    or None when `if_no_champion` found a champion already."""
    if request.if_no_champion:
        existing = registry.alias_version(CHAMPION)
        if existing is not None:
            print(f"{registry.model_name}@{CHAMPION} is version {existing}; nothing to do")
            return None
    random_weights = request.demo and request.demo_seed is not None
    if random_weights:
        print(RANDOM_WARNING, file=sys.stderr, flush=True)
    elif request.demo:
        _demo_pair()  # missing weights fail before anything is logged
        print(DEMO_NOTE, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="kronos-registry-") as tmp:
        info = _log(registry, request, Path(tmp))
    version = str(info.registered_model_version)
    client, name = registry.client, registry.model_name
    if random_weights:
        tags = version_tags(
            info.metadata or {},
            source=f"demo:random(seed={request.demo_seed})",
            demo=True,
            warning="RANDOM DEMO WEIGHTS - forecasts are meaningless",
        )
    else:
        tags = version_tags(info.metadata or {}, source=DEMO_SOURCE if request.demo else None, demo=request.demo)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    print(f"logged {name} version {version} (alias {CHALLENGER}) run {info.run_id}")
    if request.promote:
        previous = registry.alias_version(CHAMPION)
        client.set_registered_model_alias(name, CHAMPION, version)
        client.delete_registered_model_alias(name, CHALLENGER)
        append_event(
            registry,
            "promote",
            version,
            previous,
            request.reason or "log --promote (bootstrap)",
            forced=True,
            gate=None,
        )
        print(f"promoted {name} version {version} to {CHAMPION} (previous: {previous or 'none'})")
    return version
