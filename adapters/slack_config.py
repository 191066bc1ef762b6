"""What the Slack channel needs to know before it starts: settings, names and Redis keys.

This module imports no Slack library, so `sudo-queue worker --notify slack` can name the Slack
notification queue without the `slack` extra installed.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sudo_queue.constants import DEFAULT_NAMESPACE
from sudo_queue.errors import SudoQueueError

__all__ = [
    "NOTIFY_FUNCTION",
    "SlackKeys",
    "SlackSettings",
    "SlackSetupError",
    "load_settings",
    "notify_target",
]

# The arq job the policy worker enqueues (through the store's Lua script) for the Slack channel.
NOTIFY_FUNCTION = "notify_slack"
DEFAULT_API_URL = "https://slack.com/api/"

USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")
GROUP_ID = re.compile(r"S[A-Z0-9]{2,}")
GROUP_HANDLE = re.compile(r"@[a-z0-9][a-z0-9._-]*")
CHANNEL_ID = re.compile(r"[CG][A-Z0-9]{2,}")
CHANNEL_NAME = re.compile(r"#?[a-z0-9][a-z0-9._-]{0,79}")

_VARIABLES = {
    "bot_token": "SLACK_BOT_TOKEN",
    "signing_secret": "SLACK_SIGNING_SECRET",
    "app_token": "SLACK_APP_TOKEN",
    "channel": "SUDO_QUEUE_SLACK_CHANNEL",
    "api_url": "SUDO_QUEUE_SLACK_API_URL",
    "approvers": "SUDO_QUEUE_SLACK_APPROVERS",
    "team_id": "SUDO_QUEUE_SLACK_TEAM_ID",
    "app_id": "SUDO_QUEUE_SLACK_APP_ID",
    "group_cache_s": "SUDO_QUEUE_SLACK_GROUP_CACHE_S",
    "redact_keys": "SUDO_QUEUE_SLACK_REDACT_KEYS",
}


class SlackSetupError(SudoQueueError, ValueError):
    """The Slack app cannot start: a setting is missing or malformed, or Slack refused the token."""


def notify_target(namespace: str = DEFAULT_NAMESPACE) -> tuple[str, str]:
    """The (arq queue, function) pair the policy worker notifies for Slack."""
    return (SlackKeys(namespace).queue, NOTIFY_FUNCTION)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[\s,]+", value.strip()) if part)


def is_approver_entry(entry: str) -> bool:
    """A Slack user id (U..., W...), a user-group handle (@name) or a user-group id (S...)."""
    return any(p.fullmatch(entry) for p in (USER_ID, GROUP_HANDLE, GROUP_ID))


class SlackSettings(BaseSettings):
    """Slack's own `SLACK_*` variables plus `SUDO_QUEUE_SLACK_*` (and a `.env` file)."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    bot_token: SecretStr = Field(validation_alias="SLACK_BOT_TOKEN")
    signing_secret: SecretStr | None = Field(None, validation_alias="SLACK_SIGNING_SECRET")
    app_token: SecretStr | None = Field(None, validation_alias="SLACK_APP_TOKEN")
    channel: str = Field(validation_alias="SUDO_QUEUE_SLACK_CHANNEL")
    api_url: str = Field(DEFAULT_API_URL, validation_alias="SUDO_QUEUE_SLACK_API_URL")
    approvers: str = Field("", validation_alias="SUDO_QUEUE_SLACK_APPROVERS")
    team_id: str | None = Field(None, validation_alias="SUDO_QUEUE_SLACK_TEAM_ID")
    app_id: str | None = Field(None, validation_alias="SUDO_QUEUE_SLACK_APP_ID")
    group_cache_s: float = Field(60.0, gt=0, validation_alias="SUDO_QUEUE_SLACK_GROUP_CACHE_S")
    redact_keys: str = Field("", validation_alias="SUDO_QUEUE_SLACK_REDACT_KEYS")

    @field_validator("bot_token")
    @classmethod
    def _bot_token(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith("xoxb-"):
            raise ValueError("must be a bot token starting with xoxb- (OAuth & Permissions page)")
        return value

    @field_validator("app_token")
    @classmethod
    def _app_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("xapp-"):
            raise ValueError("must be an app-level token starting with xapp- (Basic Information)")
        return value

    @field_validator("signing_secret")
    @classmethod
    def _signing_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (Basic Information > Signing Secret)")
        return value

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        value = value.strip()
        if not (CHANNEL_ID.fullmatch(value) or CHANNEL_NAME.fullmatch(value)):
            raise ValueError(
                f"{value!r} is neither a channel id (C0123ABCD) nor a channel name (#approvals)"
            )
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL such as {DEFAULT_API_URL}")
        return value.strip().rstrip("/") + "/"

    @field_validator("approvers")
    @classmethod
    def _approvers(cls, value: str) -> str:
        bad = [entry for entry in _split(value) if not is_approver_entry(entry)]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))}: list Slack user ids (U0123ABCD) or user-group "
                "handles (@finance-leads), separated by commas"
            )
        return value

    @field_validator("team_id", "app_id")
    @classmethod
    def _ids(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Z][A-Z0-9]{2,}", value.strip()):
            raise ValueError(f"{value!r} is not a Slack id (T0123ABCD, A0123ABCD)")
        return value.strip() if value else None

    @property
    def default_approvers(self) -> tuple[str, ...]:
        """Who decides when a rule names no approvers."""
        return _split(self.approvers)

    @property
    def extra_redact_keys(self) -> tuple[str, ...]:
        return _split(self.redact_keys)


def load_settings(*, socket: bool, **overrides: Any) -> SlackSettings:
    """Read the settings, or raise SlackSetupError naming each bad or missing variable."""
    try:
        settings = SlackSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            name = _VARIABLES.get(name, name)
            problem = "is not set" if error["type"] == "missing" else error["msg"]
            problems.append(f"{name} {problem}".replace("Value error, ", ""))
        raise SlackSetupError(
            "cannot start the Slack app: " + "; ".join(problems) + ". See README, Slack set-up"
        ) from None
    if socket and settings.app_token is None:
        raise SlackSetupError(
            "cannot start the Slack app in Socket Mode: SLACK_APP_TOKEN is not set (an xapp- "
            "token with connections:write, from Basic Information > App-Level Tokens)"
        )
    if not socket and settings.signing_secret is None:
        raise SlackSetupError(
            "cannot start the Slack app in HTTP mode: SLACK_SIGNING_SECRET is not set (Basic "
            "Information > Signing Secret); or run with --socket"
        )
    return settings


class SlackKeys:
    """The Redis keys of the Slack channel, beside the core's (sudo_queue.constants.Keys)."""

    __slots__ = ("lock_prefix", "message_prefix", "queue", "seen_prefix")

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.queue = f"{namespace}:slack"  # the arq queue of the notifier jobs
        self.message_prefix = f"{namespace}:slack:msg:"
        self.lock_prefix = f"{namespace}:slack:lock:"
        self.seen_prefix = f"{namespace}:slack:seen:"

    def message(self, request_id: str) -> str:
        """Hash of one request's Slack message: channel, ts, posting marker, rendered state."""
        return self.message_prefix + request_id

    def lock(self, request_id: str) -> str:
        return self.lock_prefix + request_id

    def seen(self, fingerprint: str) -> str:
        return self.seen_prefix + fingerprint
