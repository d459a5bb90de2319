"""Constructor arguments of the two Kronos networks, exactly as stored in `config.json`.

The field names and the set of keys match the published checkpoints, so a config round-trips
through `config.json` unchanged. Dropout probabilities act only while a network is trained;
inference always runs in eval mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A `config.json` that does not describe a Kronos network."""


def _from_mapping(cls: type, raw: dict[str, Any], where: str) -> Any:
    names = [f.name for f in fields(cls)]
    missing = sorted(set(names) - set(raw))
    unknown = sorted(set(raw) - set(names))
    if missing or unknown:
        raise ConfigError(
            f"{where}: config keys do not match {cls.__name__}: "
            f"missing {missing or 'none'}, unexpected {unknown or 'none'}"
        )
    return cls(**{name: raw[name] for name in names})


@dataclass(frozen=True)
class TokenizerConfig:
    """KronosTokenizer (BSQ tokenizer) arguments; block counts are `n_enc_layers - 1` etc."""

    d_in: int
    d_model: int
    n_heads: int
    ff_dim: int
    n_enc_layers: int
    n_dec_layers: int
    ffn_dropout_p: float
    attn_dropout_p: float
    resid_dropout_p: float
    s1_bits: int
    s2_bits: int
    beta: float
    gamma0: float
    gamma: float
    zeta: float
    group_size: int

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"tokenizer d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("tokenizer head_dim must be even (rotary embedding)")
        if self.n_enc_layers < 1 or self.n_dec_layers < 1:
            raise ConfigError("tokenizer n_enc_layers and n_dec_layers must be >= 1")
        if (self.s1_bits + self.s2_bits) % self.group_size:
            raise ConfigError("tokenizer group_size must divide s1_bits + s2_bits")

    @property
    def codebook_dim(self) -> int:
        return self.s1_bits + self.s2_bits

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "tokenizer config") -> TokenizerConfig:
        return _from_mapping(cls, raw, where)

    def to_dict(self) -> dict[str, Any]:
        return dict(sorted(asdict(self).items()))


@dataclass(frozen=True)
class KronosConfig:
    """Kronos decoder-only predictor arguments."""

    s1_bits: int
    s2_bits: int
    n_layers: int
    d_model: int
    n_heads: int
    ff_dim: int
    ffn_dropout_p: float
    attn_dropout_p: float
    resid_dropout_p: float
    token_dropout_p: float
    learn_te: bool

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"model d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model head_dim must be even (rotary embedding)")
        if self.d_model % (2 * DEPENDENCY_HEADS):
            raise ConfigError(f"model d_model must be divisible by {2 * DEPENDENCY_HEADS}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "model config") -> KronosConfig:
        return _from_mapping(cls, raw, where)

    def to_dict(self) -> dict[str, Any]:
        return dict(sorted(asdict(self).items()))


# The s2 head's cross-attention always uses 4 heads, whatever the trunk's n_heads.
DEPENDENCY_HEADS = 4
