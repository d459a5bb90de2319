"""Published Kronos checkpoints: their shapes, their paired tokenizer and their context."""

from __future__ import annotations

from dataclasses import dataclass

from .config import KronosConfig, TokenizerConfig


@dataclass(frozen=True)
class Preset:
    """A published predictor with the tokenizer it was trained with and its context length."""

    model_id: str
    tokenizer_id: str
    max_context: int
    model_config: KronosConfig
    tokenizer_config: TokenizerConfig


def _tokenizer_config(group_size: int) -> TokenizerConfig:
    return TokenizerConfig(
        d_in=6,
        d_model=256,
        n_heads=4,
        ff_dim=512,
        n_enc_layers=4,
        n_dec_layers=4,
        ffn_dropout_p=0.0,
        attn_dropout_p=0.0,
        resid_dropout_p=0.0,
        s1_bits=10,
        s2_bits=10,
        beta=0.05,
        gamma0=1.0,
        gamma=1.1,
        zeta=0.05,
        group_size=group_size,
    )


def _model_config(
    n_layers: int, d_model: int, n_heads: int, ff_dim: int, dropout: tuple[float, float, float, float]
) -> KronosConfig:
    ffn_p, attn_p, resid_p, token_p = dropout
    return KronosConfig(
        s1_bits=10,
        s2_bits=10,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        ff_dim=ff_dim,
        ffn_dropout_p=ffn_p,
        attn_dropout_p=attn_p,
        resid_dropout_p=resid_p,
        token_dropout_p=token_p,
        learn_te=True,
    )


TOKENIZER_BASE = "NeoQuasar/Kronos-Tokenizer-base"
TOKENIZER_2K = "NeoQuasar/Kronos-Tokenizer-2k"

PRESETS: dict[str, Preset] = {
    "NeoQuasar/Kronos-mini": Preset(
        "NeoQuasar/Kronos-mini",
        TOKENIZER_2K,
        2048,
        _model_config(4, 256, 4, 512, (0.2, 0.0, 0.2, 0.0)),
        _tokenizer_config(5),
    ),
    "NeoQuasar/Kronos-small": Preset(
        "NeoQuasar/Kronos-small",
        TOKENIZER_BASE,
        512,
        _model_config(8, 512, 8, 1024, (0.25, 0.1, 0.25, 0.1)),
        _tokenizer_config(4),
    ),
    "NeoQuasar/Kronos-base": Preset(
        "NeoQuasar/Kronos-base",
        TOKENIZER_BASE,
        512,
        _model_config(12, 832, 16, 2048, (0.2, 0.0, 0.2, 0.0)),
        _tokenizer_config(4),
    ),
}

DEFAULT_MAX_CONTEXT = 512

# A few thousand parameters of the same architecture: what tests and local demos generate
# with random weights (fast on any CPU; forecasts meaningless).
TINY_TOKENIZER_CONFIG = TokenizerConfig(
    d_in=6, d_model=32, n_heads=2, ff_dim=64, n_enc_layers=3, n_dec_layers=3, ffn_dropout_p=0.0,
    attn_dropout_p=0.0, resid_dropout_p=0.0, s1_bits=8, s2_bits=8, beta=0.05, gamma0=1.0, gamma=1.1,
    zeta=0.05, group_size=4,
)  # fmt: skip
TINY_MODEL_CONFIG = KronosConfig(
    s1_bits=8, s2_bits=8, n_layers=2, d_model=48, n_heads=3, ff_dim=96, ffn_dropout_p=0.0,
    attn_dropout_p=0.0, resid_dropout_p=0.0, token_dropout_p=0.0, learn_te=True,
)  # fmt: skip


# The demo pair that `make demo-model` trains from scratch on the daily S&P 500 and NASDAQ
# candles shipped by `arch` (model_package/demo_weights, about 4 MB of safetensors).
DEMO_TOKENIZER_CONFIG = TokenizerConfig(
    d_in=6, d_model=64, n_heads=4, ff_dim=128, n_enc_layers=3, n_dec_layers=3, ffn_dropout_p=0.0,
    attn_dropout_p=0.0, resid_dropout_p=0.0, s1_bits=8, s2_bits=8, beta=0.05, gamma0=1.0, gamma=1.1,
    zeta=0.05, group_size=4,
)  # fmt: skip
DEMO_MODEL_CONFIG = KronosConfig(
    s1_bits=8, s2_bits=8, n_layers=4, d_model=128, n_heads=4, ff_dim=256, ffn_dropout_p=0.1,
    attn_dropout_p=0.0, resid_dropout_p=0.1, token_dropout_p=0.0, learn_te=True,
)  # fmt: skip
DEMO_MAX_CONTEXT = 256


def preset_by_name(name: str) -> Preset | None:
    """The preset for a hub id (`NeoQuasar/Kronos-small`) or a short name (`small`, `kronos-small`)."""
    if name in PRESETS:
        return PRESETS[name]
    short = name.lower().removeprefix("kronos-")
    for preset in PRESETS.values():
        if preset.model_id.lower().endswith("-" + short):
            return preset
    return None


def preset_for_config(config: KronosConfig) -> Preset | None:
    """The preset whose network has this exact shape, if any (dropouts ignored)."""
    for preset in PRESETS.values():
        p = preset.model_config
        if (p.n_layers, p.d_model, p.n_heads, p.ff_dim, p.s1_bits, p.s2_bits) == (
            config.n_layers,
            config.d_model,
            config.n_heads,
            config.ff_dim,
            config.s1_bits,
            config.s2_bits,
        ):
            return preset
    return None
