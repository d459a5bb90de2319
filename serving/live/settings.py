"""Settings of live accuracy, read from `KRONOS_LIVE_*` environment variables by the model
server (recording, gauges, the ingest endpoint) and by `kronos-registry live`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_package.settings import ENV_PREFIX

LIVE_ENV_PREFIX = f"{ENV_PREFIX}LIVE_"
WEEK_S = 7 * 24 * 3600.0


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URL of a sqlite file (absolute)."""
    return f"sqlite:///{path.expanduser().resolve()}"


def default_store_uri() -> str:
    """A sqlite file beside the server's default model cache
    (`~/.cache/kronos-serving/live.db`); the launcher and compose set their own."""
    from serving.settings import default_model_cache_dir  # not at import: settings imports this module's users

    return sqlite_uri(default_model_cache_dir().parent / "live.db")


class LiveSettings(BaseSettings):
    """Where answered forecasts and realised candles are kept, and how accuracy is reported."""

    model_config = SettingsConfigDict(env_prefix=LIVE_ENV_PREFIX, extra="ignore")

    store_uri: str = Field(
        default_factory=default_store_uri,
        description="SQLAlchemy URL of the live store: sqlite:///path (default) or postgresql+psycopg://...",
    )
    store_password_file: Path | None = Field(
        None, description="a file holding the store's password (a compose secret), joined to store_uri"
    )
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of answered requests recorded (by request id hash); 0 = none"
    )
    window_s: float = Field(WEEK_S, gt=0, description="rolling window of the accuracy gauges (s, by answer time)")
    refresh_s: float = Field(30.0, ge=0, description="seconds between recomputations of the gauges; 0 = never")
    retention_s: float = Field(
        4 * WEEK_S, ge=0, description="forecasts and realised candles older than this are deleted (s); 0 = kept"
    )
    queue_records: int = Field(
        100_000, ge=1, description="forecast candles waiting for the store writer; beyond: dropped and counted"
    )

    def store_url(self) -> str:
        """`store_uri` with the password from `store_password_file` when one is named (the
        URL's own password otherwise). Never log the result."""
        if self.store_password_file is None:
            return self.store_uri
        from sqlalchemy.engine import make_url

        password = self.store_password_file.read_text().strip()
        return make_url(self.store_uri).set(password=password).render_as_string(hide_password=False)
