"""Checkpoints in the Hugging Face layout: a directory with `config.json` + `model.safetensors`.

Loading is strict: every parameter must be present with the right shape, and nothing
unknown may be present. The only exceptions are buffers we recompute ourselves
(`*.rotary.inv_freq`, `tokenizer.bsq.basis`, `tokenizer.bsq.group_basis`), which may be
stored or not; stored values are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, KronosConfig, TokenizerConfig
from .model import Kronos
from .tokenizer import KronosTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
RECOMPUTED_BUFFER = re.compile(r"(^|\.)rotary\.inv_freq$|^tokenizer\.bsq\.(group_)?basis$")

ModuleT = TypeVar("ModuleT", bound=nn.Module)
Net = TypeVar("Net", KronosTokenizer, Kronos)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not match the network it should fill."""


def resolve_checkpoint(
    name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local directory, or a hub id downloaded (or found in the local cache).

    The hub is reached through `huggingface_hub`, which honours `HF_HUB_OFFLINE`, `HF_HOME`
    and `HF_HUB_CACHE`; with the hub offline only cached snapshots resolve.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint {name!r}: not a directory and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id=name,
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE],
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise CheckpointError(
            f"checkpoint {name!r}: cannot fetch from the Hugging Face hub{hint}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def read_config(directory: Path) -> dict:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON: {exc}") from exc


def weights_sha256(directory: Path) -> str | None:
    """Hex sha256 of a checkpoint directory's weights file (None when it has none): the
    digest a forecast answer reports and `sha256sum model.safetensors` prints."""
    weights = next((directory / f for f in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE) if (directory / f).is_file()), None)
    if weights is None:
        return None
    digest = hashlib.sha256()
    with weights.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_checkpoint(directory: Path, target: Path) -> Path:
    """Copy only config + weights of a checkpoint dir into `target` (hub snapshots may hold
    other files; their symlinks are resolved)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (directory / name).is_file():
            shutil.copyfile(directory / name, target / name)
    return target


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        return load_file(str(weights))
    legacy = directory / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")


def load_strict(net: Net, state: dict[str, torch.Tensor], where: str) -> Net:
    """Copy `state` into `net`, refusing missing, unexpected or mis-shaped weights."""
    expected = net.state_dict()
    required = {k for k in expected if not RECOMPUTED_BUFFER.search(k)}
    missing = sorted(required - state.keys())
    unexpected = sorted(k for k in state.keys() - expected.keys() if not RECOMPUTED_BUFFER.search(k))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in required & state.keys()
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {', '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the network: " + "; ".join(problems))
    with torch.no_grad():
        for key in required:
            expected[key].copy_(state[key].to(expected[key].dtype))
    return net


def _load(
    cls: type[Net],
    config_cls: type[KronosConfig] | type[TokenizerConfig],
    name_or_path: str | os.PathLike,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
) -> Net:
    directory = resolve_checkpoint(name_or_path, revision, cache_dir)
    try:
        config = config_cls.from_dict(read_config(directory), where=str(directory / CONFIG_FILE))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(str(exc)) from exc
    net = cls(config)  # type: ignore[arg-type]  # the pairs passed below always match
    return load_strict(net, load_state_dict(directory), str(directory)).eval()


def load_tokenizer(
    name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> KronosTokenizer:
    """Load a KronosTokenizer from a directory or a hub id."""
    return _load(KronosTokenizer, TokenizerConfig, name_or_path, revision, cache_dir)


def load_model(
    name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Kronos:
    """Load a Kronos predictor from a directory or a hub id."""
    return _load(Kronos, KronosConfig, name_or_path, revision, cache_dir)


def save_checkpoint(net: KronosTokenizer | Kronos, directory: str | os.PathLike) -> Path:
    """Write `config.json` (sorted keys) and `model.safetensors` (full state dict, buffers
    included, as upstream's `save_pretrained` does)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(net.config.to_dict(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    return out


def random_init_(net: ModuleT, generator: torch.Generator) -> ModuleT:
    """Random weights in the upstream initialisation style: xavier-normal linear weights,
    zero biases, N(0, d^-0.5) embeddings, unit norm weights. Deterministic for a generator."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = (2.0 / (fan_in + fan_out)) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
                d = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * d**-0.5)
    return net


def write_random_checkpoint(
    config: TokenizerConfig | KronosConfig, directory: str | os.PathLike, seed: int = 0
) -> Path:
    """Build a network of any shape with random weights and save it in the HF layout."""
    generator = torch.Generator().manual_seed(seed)
    net = KronosTokenizer(config) if isinstance(config, TokenizerConfig) else Kronos(config)
    random_init_(net, generator)
    return save_checkpoint(net, directory)


def count_parameters(net: nn.Module) -> int:
    """Learnable parameters (frozen sinusoidal tables excluded)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
