"""The Slack Web API client sudo-queue uses: base URL, 429 handling, identity, error kinds."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from .slack_config import SlackSettings, SlackSetupError

if TYPE_CHECKING:
    from slack_sdk.http_retry.request import HttpRequest
    from slack_sdk.http_retry.response import HttpResponse
    from slack_sdk.http_retry.state import RetryState

__all__ = [
    "CappedRateLimitHandler",
    "SlackIdentity",
    "SlackTransientError",
    "make_client",
    "retry_after",
    "transient",
    "whoami",
]

# A 429 whose Retry-After is at most this is waited out in place; a longer one goes back to the
# job queue (arq's deferred retry) so that no job sits on a worker slot for a minute.
INLINE_RETRY_AFTER_S = 5
CLIENT_TIMEOUT_S = 10
_TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited"}
)


class CappedRateLimitHandler(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler (sleeps Retry-After, then retries) for short waits only.

    A 429 means Slack did not act on the call, so retrying any method, chat.postMessage
    included, cannot duplicate anything.
    """

    def __init__(self, *, max_retry_count: int = 2, cap_s: float = INLINE_RETRY_AFTER_S) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.cap_s = cap_s

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if response is None or response.status_code != 429:
            return False
        wait = _header_seconds(response.headers)
        return wait is not None and wait <= self.cap_s


def _header_seconds(headers: object) -> float | None:
    """Retry-After in seconds from a dict of lists (retry handlers) or aiohttp's multidict."""
    if not isinstance(headers, Mapping):
        return None
    for name, value in headers.items():
        if str(name).lower() == "retry-after":
            raw = value[0] if isinstance(value, list) and value else value
            try:
                return max(0.0, float(str(raw)))
            except ValueError:
                return None
    return None


def retry_after(exc: SlackApiError) -> float | None:
    """Seconds Slack asked us to wait (429 Retry-After), or None if it did not ask."""
    if exc.response.status_code != 429:
        return None
    wait = _header_seconds(exc.response.headers)
    return (wait if wait is not None else 1.0) + random.random()


def transient(exc: BaseException) -> bool:
    """True when trying the same call again later may succeed."""
    if isinstance(exc, SlackApiError):
        status = exc.response.status_code
        return status == 429 or status >= 500 or exc.response.get("error") in _TRANSIENT_ERRORS
    return isinstance(exc, SlackClientError | aiohttp.ClientError | OSError | TimeoutError)


class SlackTransientError(Exception):
    """A Slack call failed in a way that may pass: try again after `defer_s` (None: backoff)."""

    def __init__(self, message: str, defer_s: float | None = None) -> None:
        super().__init__(message)
        self.defer_s = defer_s


def make_client(settings: SlackSettings) -> AsyncWebClient:
    """The bot's Web API client, on SUDO_QUEUE_SLACK_API_URL, waiting out short 429s."""
    return AsyncWebClient(
        token=settings.bot_token.get_secret_value(),
        base_url=settings.api_url,
        timeout=CLIENT_TIMEOUT_S,
        retry_handlers=[CappedRateLimitHandler()],
    )


@dataclass(frozen=True, slots=True)
class SlackIdentity:
    """Who the bot token is: the workspace and app whose requests this app accepts."""

    team_id: str
    app_id: str
    bot_id: str
    user_id: str


async def whoami(client: AsyncWebClient, settings: SlackSettings) -> SlackIdentity:
    """auth.test, checked against SUDO_QUEUE_SLACK_TEAM_ID / _APP_ID; SlackSetupError if not."""
    try:
        reply = await client.auth_test()
    except SlackApiError as exc:
        raise SlackSetupError(
            f"Slack refused SLACK_BOT_TOKEN ({exc.response.get('error')}); copy the Bot User "
            "OAuth Token from the app's OAuth & Permissions page"
        ) from None
    except (SlackClientError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise SlackSetupError(
            f"cannot reach the Slack API at {settings.api_url} ({type(exc).__name__}: {exc}); "
            "check the network or SUDO_QUEUE_SLACK_API_URL"
        ) from None
    team_id = str(reply.get("team_id") or "")
    if settings.team_id and settings.team_id != team_id:
        raise SlackSetupError(
            f"SLACK_BOT_TOKEN belongs to workspace {team_id}, not SUDO_QUEUE_SLACK_TEAM_ID="
            f"{settings.team_id}; fix one of the two"
        )
    app_id = str(reply.get("app_id") or "")
    if settings.app_id and app_id and settings.app_id != app_id:
        raise SlackSetupError(
            f"SLACK_BOT_TOKEN belongs to app {app_id}, not SUDO_QUEUE_SLACK_APP_ID="
            f"{settings.app_id}; fix one of the two"
        )
    app_id = settings.app_id or app_id
    if not team_id or not app_id:
        raise SlackSetupError(
            "Slack's auth.test did not name the app of SLACK_BOT_TOKEN; set "
            "SUDO_QUEUE_SLACK_APP_ID (Basic Information > App ID) so that requests from other "
            "apps can be refused"
        )
    return SlackIdentity(
        team_id=team_id,
        app_id=app_id,
        bot_id=str(reply.get("bot_id") or ""),
        user_id=str(reply.get("user_id") or ""),
    )
