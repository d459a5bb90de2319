"""The demo Kronos pair that ships with the project: trained by `make demo-model` on real
daily candles (S&P 500 and NASDAQ from `arch`), small enough to commit (about 4 MB), used
wherever the project needs a model offline (`make serve`, `kronos-registry log --demo`, the
compose `register` job, load tests). Its model card is `demo_weights/MODEL_CARD.md`.
"""

from __future__ import annotations

from pathlib import Path

from .kronos.presets import DEMO_MAX_CONTEXT, DEMO_MODEL_CONFIG, DEMO_TOKENIZER_CONFIG

DEMO_DIR = Path(__file__).resolve().parent / "demo_weights"
DEMO_SOURCE = "demo:kronos-demo"  # kronos.weights.source of every registered copy (bootstrap, log --demo)

__all__ = [
    "DEMO_DIR",
    "DEMO_MAX_CONTEXT",
    "DEMO_MODEL_CONFIG",
    "DEMO_SOURCE",
    "DEMO_TOKENIZER_CONFIG",
    "demo_checkpoints",
]


def demo_checkpoints() -> tuple[Path, Path]:
    """(tokenizer_dir, model_dir) of the shipped demo pair (Hugging Face layout)."""
    tokenizer, model = DEMO_DIR / "tokenizer", DEMO_DIR / "model"
    for directory in (tokenizer, model):
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"demo weights missing at {directory}: run `make demo-model`")
    return tokenizer, model
