"""The durable side of the Slack channel: post a request's message once, update it when decided.

The store's Lua script enqueues `notify_slack(request_id, status)` on `<ns>:slack` when a request
turns pending and again for its terminal status. The job is idempotent and order-independent:
under a per-request Redis lock it reads the record and makes the Slack message match it.

Slack has no idempotency key for chat.postMessage, so a crash between posting and saving the
message's ts must not lead to a second post. Before posting, a marker (the time) is saved; the
message carries the request id in its `metadata`. A later run that finds the marker without a ts
looks the message up with conversations.history and adopts it; only if it is not there does it
post again (and it deletes any extra copy it finds, so one request never has two live messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TYPE_CHECKING, Any, TypedDict

import structlog
from arq import Retry
from arq.connections import RedisSettings
from redis.exceptions import LockError, RedisError
from slack_sdk.errors import SlackApiError

from sudo_queue.errors import GateUnavailable
from sudo_queue.models import RequestRecord, Status

from .slack_blocks import METADATA_EVENT, Message, render_key, request_message
from .slack_client import SlackIdentity, SlackTransientError, retry_after, transient
from .slack_config import CHANNEL_ID, SlackKeys

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from redis.asyncio import Redis
    from slack_sdk.web.async_client import AsyncWebClient

    from sudo_queue.store import Store

__all__ = [
    "NotifierContext",
    "SlackNotifier",
    "SlackNotifyFailed",
    "notifier_worker_kwargs",
    "notify_slack",
]

log = structlog.get_logger(__name__)

MAX_TRIES = 10
JOB_TIMEOUT_S = 45
# Longer than any one sync (a post with its inline 429 waits and a history lookup), so the lock
# never lapses under a live holder; short enough that a killed worker's lock frees itself.
LOCK_TTL_S = 60.0
# How far before the posting marker the history lookup starts: clock skew between us and Slack.
LOOKUP_SKEW_S = 120
LOOKUP_MAX_PAGES = 10


class SlackNotifyFailed(Exception):
    """Slack refused the call for good (channel_not_found, not_in_channel ...): do not retry."""


class SlackNotifier:
    """Posts and updates the approval message of each request; shared by jobs and clicks."""

    def __init__(
        self,
        *,
        store: Store,
        client: AsyncWebClient,
        identity: SlackIdentity,
        default_channel: str,
        approvers_for: Callable[[Sequence[str]], Sequence[str]],
        namespace: str,
        retention_s: float,
        extra_redact_keys: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.redis: Redis = store.redis
        self.client = client
        self.identity = identity
        self.default_channel = default_channel
        self.approvers_for = approvers_for
        self.namespace = namespace
        self.keys = SlackKeys(namespace)
        self.state_ttl_ms = int((retention_s + 86400) * 1000)
        self.extra_redact_keys = tuple(extra_redact_keys)
        self._channel_ids: dict[str, str] = {}
        self._resolving = asyncio.Lock()

    async def render(self, record: RequestRecord) -> Message:
        # The policy's own `redact.keys`, as the policy worker published them, plus ours.
        policy_keys = await self.store.refresh_redact_keys()
        return request_message(
            record,
            namespace=self.namespace,
            approvers=self.approvers_for(record.approvers),
            extra_redact_keys=(*self.extra_redact_keys, *policy_keys),
        )

    async def message_of(self, request_id: str) -> tuple[str, str] | None:
        """(channel id, ts) of a request's message, if it has been posted."""
        state = await self._guard(self.redis.hgetall(self.keys.message(request_id)))
        if state.get("ts") and state.get("channel"):
            return state["channel"], state["ts"]
        return None

    async def sync(self, request_id: str, *, post: bool, lock_wait_s: float = 5.0) -> str:
        """Make the Slack message match the record; returns what it did.

        `post`: whether a missing message may be posted (only the `pending` job posts; an
        update for a request whose message was never posted does nothing).
        """
        lock = self.redis.lock(
            self.keys.lock(request_id), timeout=LOCK_TTL_S, blocking_timeout=lock_wait_s
        )
        try:
            acquired = await lock.acquire()
        except RedisError as exc:
            raise SlackTransientError(f"cannot lock the request in Redis ({exc})") from exc
        if not acquired:
            raise SlackTransientError("another sync of this request is running", defer_s=1.0)
        try:
            return await self._sync_locked(request_id, post=post)
        finally:
            with contextlib.suppress(LockError, RedisError):
                await lock.release()

    async def _sync_locked(self, request_id: str, *, post: bool) -> str:
        record = await self.store.get(request_id)
        if record is None:
            return "missing"
        key = self.keys.message(request_id)
        state = await self._guard(self.redis.hgetall(key))
        ts, channel = state.get("ts"), state.get("channel")
        if not ts and state.get("posting") and channel:
            ts = await self._adopt(request_id, channel, int(state["posting"]))
            if ts:
                await self._guard(self.redis.hset(key, mapping={"ts": ts, "rendered": ""}))
                log.warning("slack_message_adopted", request_id=request_id, channel=channel, ts=ts)
            await self._guard(self.redis.hdel(key, "posting"))
        if not ts:
            if not post or record.status is not Status.PENDING:
                return "skipped"
            return await self._post(record)
        if not channel:
            raise SlackNotifyFailed(
                f"the Slack state of request {request_id} has a ts but no channel"
            )
        if state.get("rendered") == render_key(record) and not state.get("posting"):
            return "unchanged"
        message = await self.render(record)
        try:
            await self.client.chat_update(
                channel=channel, ts=ts, text=message.text, blocks=message.blocks
            )
        except Exception as exc:
            raise _classify(exc, "chat.update") from exc
        await self._guard(self.redis.hset(key, "rendered", render_key(record)))
        log.info(
            "slack_message_updated",
            request_id=request_id,
            status=record.status.value,
            channel=channel,
            ts=ts,
        )
        return "updated"

    async def _post(self, record: RequestRecord) -> str:
        key = self.keys.message(record.id)
        channel = await self._channel_id(record.channel or self.default_channel)
        message = await self.render(record)
        now_ms = await self.store.server_time_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"channel": channel, "posting": str(now_ms)})
            pipe.pexpire(key, self.state_ttl_ms)
            await self._guard(pipe.execute())
        try:
            reply = await self.client.chat_postMessage(
                channel=channel,
                text=message.text,
                blocks=message.blocks,
                metadata=message.metadata,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as exc:
            if exc.response.status_code in (200, 429):
                # Slack answered, so it did not post: no lookup is needed next time.
                await self._guard(self.redis.hdel(key, "posting"))
            raise _classify(exc, "chat.postMessage") from exc
        except Exception as exc:
            # No answer: the message may exist. The marker stays, and the next try looks it up.
            raise _classify(exc, "chat.postMessage") from exc
        ts, posted_in = str(reply["ts"]), str(reply.get("channel") or channel)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"ts": ts, "channel": posted_in, "rendered": render_key(record)})
            pipe.hdel(key, "posting")
            await self._guard(pipe.execute())
        log.info("slack_message_posted", request_id=record.id, channel=posted_in, ts=ts)
        return "posted"

    async def _adopt(self, request_id: str, channel: str, since_ms: int) -> str | None:
        """Find the message an interrupted post may have left; delete any extra copies."""
        found: list[str] = []
        cursor: str | None = None
        try:
            for _ in range(LOOKUP_MAX_PAGES):
                reply = await self.client.conversations_history(
                    channel=channel,
                    oldest=f"{since_ms / 1000 - LOOKUP_SKEW_S:.6f}",
                    include_all_metadata=True,
                    limit=200,
                    cursor=cursor,
                )
                found += [
                    str(m["ts"]) for m in reply.get("messages") or () if self._ours(m, request_id)
                ]
                cursor = (reply.get("response_metadata") or {}).get("next_cursor") or None
                if not cursor:
                    break
            found.sort(key=float)
            for extra in found[1:]:
                await self.client.chat_delete(channel=channel, ts=extra)
                log.warning("slack_duplicate_deleted", request_id=request_id, ts=extra)
        except Exception as exc:
            raise _classify(exc, "conversations.history") from exc
        return found[0] if found else None

    def _ours(self, message: dict[str, Any], request_id: str) -> bool:
        meta = message.get("metadata") or {}
        payload = meta.get("event_payload") or {}
        return (
            meta.get("event_type") == METADATA_EVENT
            and payload.get("request_id") == request_id
            and payload.get("namespace") == self.namespace
            and (not self.identity.bot_id or message.get("bot_id") == self.identity.bot_id)
        )

    async def _channel_id(self, channel: str) -> str:
        """A channel id as is; a channel name resolved once with conversations.list."""
        if CHANNEL_ID.fullmatch(channel):
            return channel
        name = channel.lstrip("#")
        async with self._resolving:  # one conversations.list at a time, not one per job
            if name not in self._channel_ids:
                await self._list_channels(name)
        if name not in self._channel_ids:
            raise SlackNotifyFailed(
                f"no channel named #{name} that the bot can see; invite the bot to it or set the "
                "channel id (C0123ABCD) in the rule or SUDO_QUEUE_SLACK_CHANNEL"
            )
        return self._channel_ids[name]

    async def _list_channels(self, name: str) -> None:
        """Page through conversations.list until `name` is found (or the list ends)."""
        cursor: str | None = None
        try:
            for _ in range(50):
                reply = await self.client.conversations_list(
                    types="public_channel,private_channel",
                    exclude_archived=True,
                    limit=1000,
                    cursor=cursor,
                )
                for found in reply.get("channels") or ():
                    self._channel_ids[str(found["name"])] = str(found["id"])
                cursor = (reply.get("response_metadata") or {}).get("next_cursor") or None
                if not cursor or name in self._channel_ids:
                    break
        except Exception as exc:
            raise _classify(exc, "conversations.list") from exc

    async def _guard(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise SlackTransientError(f"Redis failed ({type(exc).__name__}: {exc})") from exc


def _classify(exc: BaseException, call: str) -> Exception:
    if isinstance(exc, SlackTransientError | SlackNotifyFailed):
        return exc
    if isinstance(exc, SlackApiError):
        error = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        if transient(exc):
            return SlackTransientError(f"{call} failed: {error}", defer_s=retry_after(exc))
        return SlackNotifyFailed(f"{call} failed: {error}")
    if transient(exc):
        return SlackTransientError(f"{call} failed: {type(exc).__name__}: {exc}")
    return SlackNotifyFailed(f"{call} failed: {type(exc).__name__}: {exc}")


class NotifierContext(TypedDict, total=False):
    """arq's ctx dict as the notifier job sees it."""

    redis: Any
    job_id: str
    job_try: int
    slack: SlackNotifier


def _backoff(job_try: int) -> float:
    return min(2.0**job_try, 60.0) * (0.5 + random.random() / 2)


async def notify_slack(ctx: NotifierContext, request_id: str, status: str) -> str:
    """The job the store enqueues: post (pending) or update (decided) a request's message."""
    job_try = ctx.get("job_try", 1)
    bound = log.bind(request_id=request_id, status=status, job_try=job_try)
    try:
        outcome = await ctx["slack"].sync(request_id, post=status == Status.PENDING.value)
    except SlackNotifyFailed as exc:
        bound.error("slack_notify_failed", error=str(exc))
        return "failed"
    except (SlackTransientError, GateUnavailable) as exc:
        if job_try >= MAX_TRIES:
            bound.error("slack_notify_gave_up", error=str(exc))
            return "gave_up"
        defer = getattr(exc, "defer_s", None)
        defer = defer if defer is not None else _backoff(job_try)
        bound.warning("slack_notify_retry", error=str(exc), retry_in_s=round(defer, 2))
        raise Retry(defer=defer) from exc
    bound.info("slack_notified", outcome=outcome)
    return outcome


def notifier_worker_kwargs(
    notifier: SlackNotifier,
    *,
    redis_url: str,
    job_serializer: Callable[[Any], bytes],
    job_deserializer: Callable[[bytes], Any],
    max_jobs: int = 20,
    poll_delay_s: float = 0.5,
) -> dict[str, Any]:
    """The arq Worker arguments of the notifier: the one place that wires `notify_slack`.

    The caller (the CLI) supplies the JSON serializers and runs the worker; adapters do not
    import the workers package.
    """

    async def startup(ctx: NotifierContext) -> None:
        ctx["slack"] = notifier

    return {
        # arq names a job by its function's __name__: NOTIFY_FUNCTION is what the store enqueues.
        "functions": [notify_slack],
        "queue_name": notifier.keys.queue,
        "redis_settings": RedisSettings.from_dsn(redis_url),
        "on_startup": startup,
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        "max_tries": MAX_TRIES,
        "job_timeout": JOB_TIMEOUT_S,
        "keep_result": 0,
        "max_jobs": max_jobs,
        "poll_delay": poll_delay_s,
        "health_check_interval": 10,
        "handle_signals": False,
    }
