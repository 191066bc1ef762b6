"""`sudo-queue doctor`: check a deployment and print a checklist.

Checks, in order: Redis answers (and is new enough), Redis keeps what it is given (AOF on, no
eviction), the policy file loads, a policy worker is alive (arq's health-check key, which the
worker refreshes every 30 s), and, when SLACK_BOT_TOKEN is set, that Slack accepts the token
(`auth.test`). A check that cannot run because an earlier one failed is skipped, not failed.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from .constants import Keys
from .embedded import display_url
from .errors import PolicyError
from .policy import Policy

__all__ = ["Check", "DoctorOptions", "Level", "SlackEnv", "exit_code", "render", "run_checks"]

# BLPOP with a fractional timeout (the worker's wake-up) needs Redis 6.0.
MIN_REDIS = (6, 0)
# A queued request is decided in milliseconds; older than this means no worker is keeping up.
STUCK_QUEUED_MS = 30_000
# The bot scopes of config/slack-manifest.yaml (tests/test_doctor.py keeps the two equal).
SLACK_SCOPES = (
    "chat:write",
    "channels:history",
    "groups:history",
    "channels:read",
    "groups:read",
    "usergroups:read",
)
DEFAULT_SLACK_API_URL = "https://slack.com/api/"


class SlackEnv(BaseSettings):
    """The Slack variables, read the way the Slack app reads them (environment, then `.env`).

    Only presence matters here; the Slack app validates them in full when it starts.
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    bot_token: str | None = Field(None, validation_alias="SLACK_BOT_TOKEN")
    signing_secret: str | None = Field(None, validation_alias="SLACK_SIGNING_SECRET")
    app_token: str | None = Field(None, validation_alias="SLACK_APP_TOKEN")
    api_url: str = Field(DEFAULT_SLACK_API_URL, validation_alias="SUDO_QUEUE_SLACK_API_URL")

    @property
    def configured(self) -> bool:
        """A bot token and a way to receive clicks (HTTP signing secret or Socket Mode)."""
        return bool(self.bot_token) and bool(self.signing_secret or self.app_token)


class Level(StrEnum):
    """How a check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the checklist."""

    name: str
    level: Level
    detail: str


@dataclass(frozen=True, kw_only=True)
class DoctorOptions:
    """What to check; the CLI builds it from its arguments and the environment."""

    redis_url: str
    namespace: str
    policy_path: Path
    slack: SlackEnv | None = None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


async def _check_redis(redis: Redis, url: str) -> Check:
    started = time.perf_counter()
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        return Check(
            "redis",
            Level.FAIL,
            f"cannot reach Redis at {display_url(url)} ({type(exc).__name__}: {exc}); start it "
            "or fix SUDO_QUEUE_REDIS_URL",
        )
    rtt_ms = (time.perf_counter() - started) * 1000
    try:
        info = await redis.info("server")
        version = str(info.get("redis_version", "unknown"))
    except ResponseError:  # INFO can be disabled (managed services rename it)
        version = "unknown"
    where = f"at {display_url(url)} ({rtt_ms:.1f} ms)"
    if version != "unknown" and _version(version) < MIN_REDIS:
        return Check(
            "redis",
            Level.FAIL,
            f"Redis {version} {where} is too old: sudo-queue needs "
            f"{'.'.join(map(str, MIN_REDIS))} or newer",
        )
    return Check("redis", Level.OK, f"Redis {version} answers {where}")


async def _config(redis: Redis, name: str) -> str | None:
    """A CONFIG value, or None where CONFIG is disabled (managed Redis services)."""
    try:
        values = await redis.config_get(name)
    except ResponseError:
        return None
    value = values.get(name)
    return None if value is None else str(value)


async def _check_persistence(redis: Redis) -> list[Check]:
    appendonly = await _config(redis, "appendonly")
    if appendonly is None:
        return [
            Check(
                "persistence",
                Level.WARN,
                "cannot read CONFIG (disabled here?): make sure Redis runs with appendonly yes, "
                "appendfsync everysec and maxmemory-policy noeviction",
            )
        ]
    checks = []
    fsync = await _config(redis, "appendfsync") or "?"
    if appendonly != "yes":
        checks.append(
            Check(
                "persistence",
                Level.WARN,
                "AOF is off (appendonly no): a Redis restart loses the requests written since "
                "the last snapshot, and their agents fail closed. Run Redis with "
                "--appendonly yes --appendfsync everysec",
            )
        )
    elif fsync == "no":
        checks.append(
            Check(
                "persistence",
                Level.WARN,
                "AOF is on but appendfsync is 'no': the OS decides when writes reach the disk; "
                "use appendfsync everysec",
            )
        )
    else:
        checks.append(Check("persistence", Level.OK, f"AOF on (appendfsync {fsync})"))
    policy = await _config(redis, "maxmemory-policy") or "?"
    if policy != "noeviction":
        checks.append(
            Check(
                "eviction",
                Level.WARN,
                f"maxmemory-policy is {policy}: under memory pressure Redis may delete request "
                "records and queued jobs; use noeviction",
            )
        )
    else:
        checks.append(Check("eviction", Level.OK, "maxmemory-policy noeviction"))
    return checks


def _check_policy(path: Path) -> Check:
    if not path.is_file():
        return Check(
            "policy",
            Level.FAIL,
            f"no policy file at {path}: pass --policy FILE or set SUDO_QUEUE_POLICY",
        )
    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        return Check("policy", Level.FAIL, str(exc))
    rules = f"{len(policy.rules)} rule{'' if len(policy.rules) == 1 else 's'}"
    return Check("policy", Level.OK, f"{path} loads: {rules}, {policy.version}")


async def _check_worker(redis: Redis, namespace: str) -> list[Check]:
    keys = Keys(namespace)
    health_key = f"{keys.queue}:health-check"
    try:
        health = await redis.get(health_key)
        sec, usec = await redis.time()
        cutoff = int(sec) * 1000 + int(usec) // 1000 - STUCK_QUEUED_MS
        stuck = await redis.zcount(keys.queued, "-inf", cutoff)
    except RedisError as exc:
        return [Check("worker", Level.FAIL, f"cannot read the worker's health key ({exc})")]
    checks = []
    if health is None:
        checks.append(
            Check(
                "worker",
                Level.FAIL,
                f"no policy worker has reported on namespace {namespace!r} in the last 11 s "
                f"(no {health_key}): start `sudo-queue worker --policy FILE`; until then every "
                "request waits",
            )
        )
    else:
        state = str(health).split(" ", 2)[-1]
        checks.append(Check("worker", Level.OK, f"a policy worker is alive ({state})"))
    if stuck:
        checks.append(
            Check(
                "queue",
                Level.WARN,
                f"{stuck} request{'s have' if stuck != 1 else ' has'} been queued for more than "
                f"{STUCK_QUEUED_MS // 1000}s: the policy worker is not keeping up or not running",
            )
        )
    return checks


def _auth_test(token: str, api_url: str) -> dict[str, Any]:
    """Slack's auth.test with the bot token; raises what slack_sdk raises."""
    slack_sdk = importlib.import_module("slack_sdk")
    client = slack_sdk.WebClient(token=token, base_url=api_url.rstrip("/") + "/", timeout=10)
    response = client.auth_test()
    scopes = response.headers.get("x-oauth-scopes") or response.headers.get("X-OAuth-Scopes")
    return {**response.data, "_scopes": scopes}


async def _check_slack(options: DoctorOptions) -> list[Check]:
    slack = options.slack
    token = slack.bot_token if slack is not None else None
    if slack is None or not token:
        return [Check("slack", Level.SKIP, "not configured (SLACK_BOT_TOKEN is unset)")]
    checks = []
    if not (slack.signing_secret or slack.app_token):
        checks.append(
            Check(
                "slack app",
                Level.FAIL,
                "SLACK_BOT_TOKEN is set but neither SLACK_SIGNING_SECRET (HTTP mode) nor "
                "SLACK_APP_TOKEN (Socket Mode): the app cannot receive button clicks",
            )
        )
    if slack.app_token and not slack.app_token.startswith("xapp-"):
        checks.append(Check("slack app", Level.WARN, "SLACK_APP_TOKEN does not start with xapp-"))
    if not token.startswith("xoxb-"):
        checks.append(
            Check("slack", Level.WARN, "SLACK_BOT_TOKEN does not start with xoxb- (a bot token)")
        )
    try:
        data = await asyncio.to_thread(_auth_test, token, slack.api_url)
    except ImportError:
        return [
            *checks,
            Check("slack", Level.FAIL, "slack_sdk is missing: pip install 'sudo-queue[slack]'"),
        ]
    except Exception as exc:  # slack_sdk raises SlackApiError, URLError, TimeoutError ...
        error = getattr(getattr(exc, "response", None), "data", None)
        why = error.get("error") if isinstance(error, dict) else f"{type(exc).__name__}: {exc}"
        return [
            *checks,
            Check(
                "slack",
                Level.FAIL,
                f"auth.test at {slack.api_url} refused the bot token ({why}); "
                "check SLACK_BOT_TOKEN",
            ),
        ]
    who = f"bot {data.get('user', '?')} ({data.get('user_id', '?')}) in {data.get('team', '?')}"
    checks.append(Check("slack", Level.OK, f"auth.test ok: {who}"))
    scopes = data.get("_scopes")
    if isinstance(scopes, str):
        missing = [s for s in SLACK_SCOPES if s not in {x.strip() for x in scopes.split(",")}]
        if missing:
            checks.append(
                Check(
                    "slack scopes",
                    Level.WARN,
                    f"the bot token lacks {', '.join(missing)}: "
                    + (
                        "it cannot post approval messages"
                        if "chat:write" in missing
                        else "interrupted posts, channel names or @group approvers may fail"
                    ),
                )
            )
    return checks


async def run_checks(options: DoctorOptions) -> list[Check]:
    """Every check, in checklist order."""
    checks: list[Check] = []
    redis = Redis.from_url(
        options.redis_url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5
    )
    try:
        reachable = await _check_redis(redis, options.redis_url)
        up = reachable.level is not Level.FAIL
        skipped = "skipped: Redis is unreachable"
        checks.append(reachable)
        checks += (
            await _check_persistence(redis) if up else [Check("persistence", Level.SKIP, skipped)]
        )
        checks.append(_check_policy(options.policy_path))
        checks += (
            await _check_worker(redis, options.namespace)
            if up
            else [Check("worker", Level.SKIP, skipped)]
        )
    finally:
        await redis.aclose()
    checks += await _check_slack(options)
    return checks


def render(checks: list[Check], options: DoctorOptions) -> str:
    """The checklist as text."""
    width = max(len(c.name) for c in checks)
    lines = [
        f"sudo-queue doctor: {display_url(options.redis_url)}, namespace {options.namespace!r}",
        "",
    ]
    lines += [f"  [{c.level.value:^4}] {c.name:<{width}}  {c.detail}" for c in checks]
    failures = sum(c.level is Level.FAIL for c in checks)
    warnings = sum(c.level is Level.WARN for c in checks)
    lines += [
        "",
        f"{failures or 'no'} failure{'' if failures == 1 else 's'}, "
        f"{warnings or 'no'} warning{'' if warnings == 1 else 's'}",
    ]
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """3 when Redis is unreachable, 1 on any other failure, 0 otherwise (warnings pass)."""
    if any(c.name == "redis" and c.level is Level.FAIL for c in checks):
        return 3
    return 1 if any(c.level is Level.FAIL for c in checks) else 0
