"""The agent's API: ask before acting, and wait (event-driven) for the answer."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .constants import DEFAULT_NAMESPACE, DEFAULT_RETENTION_S
from .errors import (
    GateUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    RequestDenied,
    RequestNotFound,
    WaitTimeout,
)
from .models import (
    DEFAULT_MAX_ARGS_BYTES,
    Decision,
    RequestRecord,
    Status,
    canonical_json,
    check_name,
    digest,
    ms_to_datetime,
)
from .multiplexer import Multiplexer, Wake
from .store import CreateResult, Outcome, Store

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from datetime import datetime
    from types import TracebackType

__all__ = ["Gate"]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# A waiter whose deadline passed asks the server (whose clock decides) to expire the request;
# if the server says "not yet", it asks again after the remaining time, but never more often.
_MIN_RECHECK_S = 0.05
# A queued request is decided within milliseconds; one still queued after this is re-read, so a
# lost write (the record vanished) or a lost wake-up cannot leave its waiter hanging. Pending
# requests are not re-read: they can wait for hours, and 10,000 of them must cost Redis nothing.
_QUEUED_RECHECK_S = 5.0


def _redis_down(exc: GateUnavailable) -> bool:
    return isinstance(exc.__cause__, RedisError | OSError)


class Gate:
    """A connection to sudo-queue for one agent.

    ```python
    async with Gate.connect("redis://127.0.0.1:6379/0", agent="billing-bot") as gate:
        decision = await gate.request("stripe", "charge", {"amount": 5000}, key="order-123")
    ```
    """

    def __init__(
        self,
        redis: Redis,
        *,
        agent: str,
        namespace: str = DEFAULT_NAMESPACE,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
        retention_s: float = DEFAULT_RETENTION_S,
        owns_redis: bool = False,
    ) -> None:
        self.agent = check_name(agent, "agent")
        self.max_args_bytes = max_args_bytes
        self._redis = redis
        self._owns_redis = owns_redis
        self.store = Store(redis, namespace=namespace, retention_s=retention_s)
        self._mux = Multiplexer(redis)
        # Every transition of a request this Gate creates also sends the request id here, so
        # that one subscription, made once, serves all of its `request` calls.
        self._inbox = self.store.keys.inbox(uuid.uuid4().hex)
        self._closed = False

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        agent: str,
        namespace: str = DEFAULT_NAMESPACE,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
        retention_s: float = DEFAULT_RETENTION_S,
    ) -> Self:
        """A Gate with its own connection pool to `url`; use it as `async with`."""
        redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            # Bounds a command against a frozen server; waits have their own timeouts.
            socket_timeout=10,
            client_name=f"sudo-queue:{agent}"[:64].replace(" ", "_"),
        )
        return cls(
            redis,
            agent=agent,
            namespace=namespace,
            max_args_bytes=max_args_bytes,
            retention_s=retention_s,
            owns_redis=True,
        )

    async def __aenter__(self) -> Self:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            await self.aclose()
            raise GateUnavailable(
                f"cannot reach Redis ({type(exc).__name__}: {exc}); no request can be made. "
                "Start Redis or fix the URL (SUDO_QUEUE_REDIS_URL)"
            ) from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pub/sub connection (and the pool, if the Gate made it); safe twice."""
        if self._closed:
            return
        self._closed = True
        await self._mux.aclose()
        if self._owns_redis:
            await self._redis.aclose()

    # -- asking --------------------------------------------------------------------------------

    async def submit(
        self,
        resource: str,
        action: str,
        args: Any = None,
        *,
        key: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> str:
        """Create the request (or re-attach to the one `key` names) and return its id."""
        found, _ = await self._submit(resource, action, args, key, context, uuid.uuid4().hex, "")
        return found.request_id

    async def _submit(
        self,
        resource: str,
        action: str,
        args: Any,
        key: str | None,
        context: dict[str, Any] | None,
        request_id: str,
        inbox: str,
    ) -> tuple[CreateResult, str]:
        """The request created (or re-attached to), and the digest of `args`."""
        check_name(resource, "resource")
        check_name(action, "action")
        if key is not None and (not isinstance(key, str) or not key or len(key) > 256):
            raise InvalidRequest(f"key must be a non-empty string of at most 256 chars: {key!r}")
        if context is not None and not isinstance(context, dict):
            raise InvalidRequest(f"context must be a dict, got {type(context).__name__}")
        args_json = canonical_json(
            {} if args is None else args, what="args", max_bytes=self.max_args_bytes
        )
        context_json = canonical_json(context or {}, what="context", max_bytes=self.max_args_bytes)
        args_digest = digest(args_json)
        result = await self.store.create(
            request_id,
            agent=self.agent,
            resource=resource,
            action=action,
            args_json=args_json,
            args_digest=args_digest,
            context_json=context_json,
            key=key,
            inbox=inbox,
        )
        if not result.same_call:
            assert key is not None  # only a key can point at an existing request
            raise IdempotencyConflict(self.agent, key, result.request_id)
        log.debug(
            "request_submitted" if result.created else "request_reattached",
            request_id=result.request_id,
            agent=self.agent,
            resource=resource,
            action=action,
            status=result.status.value,
        )
        return result, args_digest

    async def request(
        self,
        resource: str,
        action: str,
        args: Any = None,
        *,
        key: str | None = None,
        context: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Decision:
        """Ask and wait: a granted Decision, or RequestDenied / WaitTimeout / GateUnavailable.

        `timeout` bounds the whole call, submitting included, so a frozen Redis cannot hold the
        agent longer than it asked for.
        """
        started = time.monotonic()
        # Once the Gate's inbox is subscribed (the first call starts that, without waiting for
        # it), registering for the new id before creating the request is DESIGN.md's
        # subscribe-then-read: the create's own answer (queued) is the read, and any transition
        # after it reaches this waiter. A re-attached request keeps the wake-ups of its creator;
        # it is waited for on its own channel, as `wait` does.
        if await self._mux.keep(self._inbox):
            # `listen` below waits for a confirmation outside `timeout`, but never here: keep()
            # just saw the inbox confirmed, and neither call suspends in between for an existing
            # subscription, so a reconnect cannot clear it first.
            new_id = uuid.uuid4().hex
            async with self._mux.listen(self._inbox, key=new_id) as wake:
                found, args_digest = await self._submit_within(
                    timeout, resource, action, args, key, context, new_id, self._inbox
                )
                if found.created:
                    return await self._decided(
                        new_id,
                        self._wait_on(new_id, wake, created_digest=args_digest),
                        _left(timeout, started),
                        reported=timeout,
                    )
        else:
            found, _ = await self._submit_within(
                timeout, resource, action, args, key, context, uuid.uuid4().hex, ""
            )
        return await self._decided(
            found.request_id,
            self._wait(found.request_id),
            _left(timeout, started),
            reported=timeout,
        )

    async def _submit_within(self, timeout: float | None, *args: Any) -> tuple[CreateResult, str]:
        try:
            async with asyncio.timeout(timeout):
                return await self._submit(*args)
        except TimeoutError:
            raise GateUnavailable(
                f"Redis did not answer within {timeout:g}s while submitting; nothing was "
                "allowed. The request may or may not exist: retry with the same key to "
                "re-attach safely"
            ) from None

    async def wait(self, request_id: str, timeout: float | None = None) -> Decision:
        """Wait for the request's decision; the request stays open if `timeout` runs out."""
        return await self._decided(request_id, self._wait(request_id), timeout)

    async def _decided(
        self,
        request_id: str,
        waiting: Coroutine[Any, Any, Decision],
        timeout: float | None,
        *,
        reported: float | None = None,
    ) -> Decision:
        """Await `waiting` within `timeout`; RequestDenied unless granted, WaitTimeout (saying
        `reported`, the caller's whole timeout, if given) when time runs out."""
        try:
            async with asyncio.timeout(timeout):
                decision = await waiting
        except TimeoutError:
            shown = timeout if reported is None else reported
            raise WaitTimeout(request_id, shown or 0) from None
        if not decision.granted:
            raise RequestDenied(decision)
        return decision

    async def get(self, request_id: str) -> RequestRecord:
        """The request's current record."""
        record = await self.store.get(request_id)
        if record is None:
            raise RequestNotFound(request_id)
        return record

    async def cancel(self, request_id: str, reason: str = "") -> Decision:
        """Cancel an open request; returns its final Decision (which may predate the cancel)."""
        result = await self.store.cancel(request_id, actor=self.agent, reason=reason)
        if result.outcome is Outcome.MISSING:
            raise RequestNotFound(request_id)
        return (await self.get(request_id)).decision()

    # -- waiting -------------------------------------------------------------------------------

    async def _wait(self, request_id: str) -> Decision:
        # The request's channel carries the plain status, read on every wake-up: this path
        # (`wait`, a re-attached request) is not the hot one.
        async with self._mux.listen(self.store.keys.channel(request_id)) as wake:
            return await self._wait_on(request_id, wake)

    async def _wait_on(
        self, request_id: str, wake: Wake, *, created_digest: str | None = None
    ) -> Decision:
        """Wait until the request is decided, re-reading on wake-ups; `wake` is subscribed.

        `created_digest`: the args digest of a request this Gate has just created, with its
        inbox as `wake`. The request is then known to be queued, so the first read is skipped
        (a wake-up that came meanwhile stays set), and an inbox message that carries the
        decision (`_inbox_news`) stands in for the read.
        """
        status, expires_at = Status.QUEUED, None
        unread = created_digest is not None
        while True:
            if unread:
                unread = False
            else:
                news = _inbox_news(request_id, wake, created_digest)
                wake.clear()
                if news is None:
                    news = await self._read(request_id)
                decision, expires_at = news
                if decision.status.terminal:
                    return decision
                # A parked waiter keeps its status and deadline, neither the record (with up
                # to 64 KiB of args) nor a Decision: 10,000 of them must stay small.
                status = decision.status
                del news, decision
            sleep_for: float | None = _QUEUED_RECHECK_S if status is Status.QUEUED else None
            if status is Status.PENDING and expires_at is not None:
                sleep_for = expires_at.timestamp() - time.time()
                if sleep_for <= 0:
                    result = await self.store.expire(request_id)
                    if result.outcome is Outcome.NOT_DUE:
                        sleep_for = max(result.remaining_ms / 1000, _MIN_RECHECK_S)
                    else:
                        continue
                sleep_for = max(sleep_for, _MIN_RECHECK_S)
            await wake.wait(sleep_for)

    async def _read(self, request_id: str) -> tuple[Decision, datetime | None]:
        """The request's decision so far and its deadline, from the record.

        Through a Redis restart it keeps trying (the subscription comes back by itself) until
        the caller's timeout says otherwise.
        """
        backoff = 0.05
        while True:
            try:
                record = await self.store.get(request_id, votes=False)
            except GateUnavailable as exc:
                if not _redis_down(exc):
                    raise
                log.warning("wait_redis_unavailable", request_id=request_id, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if record is None:
                return _vanished(request_id), None
            return record.decision(), record.expires_at

    # -- decorating ----------------------------------------------------------------------------

    def guard(
        self,
        resource: str,
        action: str,
        *,
        key: Callable[..., str] | None = None,
        timeout: float | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """Decorate an async function so that it runs only when the gate grants the call.

        The call's bound arguments become `args`; `key`, if given, computes the idempotency key
        from the same arguments.
        """

        def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"gate.guard wraps async functions; {fn!r} is not one")
            signature = inspect.signature(fn)

            @functools.wraps(fn)
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
                try:
                    bound = signature.bind(*args, **kwargs)
                except TypeError as exc:
                    raise InvalidRequest(f"{fn.__qualname__}: {exc}") from exc
                bound.apply_defaults()
                call_args = {
                    name: value
                    for name, value in bound.arguments.items()
                    if name not in ("self", "cls")
                }
                call_key = key(*args, **kwargs) if key is not None else None
                await self.request(resource, action, call_args, key=call_key, timeout=timeout)
                return await fn(*args, **kwargs)

            return guarded

        return decorate


def _left(timeout: float | None, started: float) -> float | None:
    """What remains of `timeout` seconds counted from `started` (time.monotonic)."""
    return None if timeout is None else max(timeout - (time.monotonic() - started), 0)


def _inbox_news(
    request_id: str, wake: Wake, args_digest: str | None
) -> tuple[Decision, datetime | None] | None:
    """The decision and deadline an inbox message brought, or None: then read the record.

    transitions.lua's `wake_up` sends the record's decision fields to the inbox of the Gate that
    created the request (`args_digest` given), so that a waiter returns without a read. Fail
    closed: a message that is not exactly that, for these args, gives None, and the waiter reads
    the truth. After a resubscription only a terminal decision stands (it can never change);
    a pending one may be stale news.
    """
    if args_digest is None or not wake.news:
        return None  # no message, or the request id alone: the record tells the rest
    try:
        fields = json.loads(wake.news)
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise ValueError("not a JSON object of strings")
        if fields.get("args_digest") != args_digest:
            raise ValueError("not about the args this Gate asked for")
        # The same fields, read the same way, as store.parse_record and RequestRecord.decision.
        decision = Decision(
            request_id=request_id,
            status=Status(fields["status"]),
            reason=fields.get("reason") or None,
            rule=fields.get("rule") or None,
            decided_by=fields.get("decided_by") or None,
            decided_at=ms_to_datetime(fields.get("decided_at")),
            args_digest=args_digest,
        )
        expires_at = ms_to_datetime(fields.get("expires_at"))
    except (KeyError, ValueError, ArithmeticError, OSError, RecursionError) as exc:
        log.warning("wake_up_unusable", request_id=request_id, error=str(exc)[:200])
        return None
    if wake.stale and not decision.status.terminal:
        return None
    return decision, expires_at


def _vanished(request_id: str) -> Decision:
    log.error("request_record_missing", request_id=request_id)
    return Decision(
        request_id=request_id,
        status=Status.DENIED,
        reason="the request's record is missing from Redis (lost write or past retention); "
        "failing closed",
        args_digest="",
    )
