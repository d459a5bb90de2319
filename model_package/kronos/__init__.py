"""Kronos in plain PyTorch: tokenizer, predictor, sampling, generation, checkpoints."""

from .checkpoint import (
    CheckpointError,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
    save_checkpoint,
    write_random_checkpoint,
)
from .config import ConfigError, KronosConfig, TokenizerConfig
from .engine import Admission, Engine
from .generation import GENERATION_MODES, generate
from .model import Kronos
from .presets import PRESETS, Preset, preset_by_name, preset_for_config
from .series import GenerationStats, SeriesInput, SeriesOutput
from .tokenizer import KronosTokenizer

__all__ = [
    "GENERATION_MODES",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "Admission",
    "Engine",
    "GenerationStats",
    "Kronos",
    "KronosConfig",
    "KronosTokenizer",
    "Preset",
    "SeriesInput",
    "SeriesOutput",
    "TokenizerConfig",
    "count_parameters",
    "generate",
    "load_model",
    "load_tokenizer",
    "preset_by_name",
    "preset_for_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_random_checkpoint",
]
