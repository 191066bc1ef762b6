"""Settings read from the environment by entry points (the CLI); library objects take kwargs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
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
    audit_key: SecretStr | None = Field(
        None,
        description="HMAC key of the audit chain (workers, CLI and Slack app; not agents)",
    )
    notify: str = Field(
        "", description="approval channels the worker notifies, comma-separated (slack)"
    )
    log_format: str = Field("auto", pattern="^(auto|console|json)$")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")

    @field_validator("audit_key")
    @classmethod
    def _check_audit_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None  # SUDO_QUEUE_AUDIT_KEY= (empty) means no key
        if len(value.get_secret_value().encode()) < 16:
            raise ValueError(
                "SUDO_QUEUE_AUDIT_KEY is shorter than 16 bytes; generate one with "
                '`python -c "import secrets; print(secrets.token_hex(32))"`'
            )
        return value

    def audit_key_bytes(self) -> bytes | None:
        """The audit HMAC key as bytes for `Store(audit_key=...)`, or None when unset."""
        return self.audit_key.get_secret_value().encode() if self.audit_key else None
