"""Settings read from the environment by entry points (the CLI); library objects take kwargs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .constants import DEFAULT_NAMESPACE, DEFAULT_REDIS_URL, DEFAULT_RETENTION_S

__all__ = ["Settings"]


class Settings(BaseSettings):
    """`SUDO_QUEUE_*` environment variables (and a `.env` file in the working directory)."""

    model_config = SettingsConfigDict(
        env_prefix="SUDO_QUEUE_", env_file=".env", extra="ignore", frozen=True
    )

    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis URL, redis:// or rediss://")
    namespace: str = Field(DEFAULT_NAMESPACE, description="prefix of every Redis key")
    policy: Path = Field(Path("config/policy.yaml"), description="policy file of the worker")
    retention_s: float = Field(
        DEFAULT_RETENTION_S, gt=0, description="how long decided requests are kept (seconds)"
    )
    max_args_bytes: int = Field(64 * 1024, gt=0, description="largest args accepted, as JSON")
    audit_maxlen: int = Field(0, ge=0, description="audit entries kept (0: all)")
    log_format: str = Field("auto", pattern="^(auto|console|json)$")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
