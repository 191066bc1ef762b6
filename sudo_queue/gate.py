"""The agent's API: ask before acting, and wait (event-driven) for the answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
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
)
from .multiplexer import Multiplexer
from .store import Outcome, Store

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

__all__ = ["Gate"]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# A waiter whose deadline passed asks the server (whose clock decides) to expire the request;
# if the server says "not yet", it asks again after the remaining time, but never more often.
_MIN_RECHECK_S = 0.05


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
            uuid.uuid4().hex,
            agent=self.agent,
            resource=resource,
            action=action,
            args_json=args_json,
            args_digest=args_digest,
            context_json=context_json,
            key=key,
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
        return result.request_id

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
        try:
            async with asyncio.timeout(timeout):
                request_id = await self.submit(resource, action, args, key=key, context=context)
        except TimeoutError:
            raise GateUnavailable(
                f"Redis did not answer within {timeout:g}s while submitting; nothing was allowed. "
                "The request may or may not exist: retry with the same key to re-attach safely"
            ) from None
        remaining = None if timeout is None else max(timeout - (time.monotonic() - started), 0)
        try:
            return await self.wait(request_id, timeout=remaining)
        except WaitTimeout:
            raise WaitTimeout(request_id, timeout or 0) from None

    async def wait(self, request_id: str, timeout: float | None = None) -> Decision:
        """Wait for the request's decision; the request stays open if `timeout` runs out."""
        try:
            async with asyncio.timeout(timeout):
                decision = await self._wait(request_id)
        except TimeoutError:
            raise WaitTimeout(request_id, timeout or 0) from None
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
        backoff = 0.05
        async with self._mux.listen(self.store.keys.channel(request_id)) as wake:
            while True:
                wake.clear()
                try:
                    record = await self.store.get(request_id)
                except GateUnavailable as exc:
                    if not _redis_down(exc):
                        raise
                    # A Redis restart: the subscription comes back by itself; keep trying
                    # until the caller's timeout says otherwise.
                    log.warning("wait_redis_unavailable", request_id=request_id, error=str(exc))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if record is None:
                    return _vanished(request_id)
                if record.status.terminal:
                    return record.decision()
                sleep_for: float | None = None
                if record.status is Status.PENDING and record.expires_at is not None:
                    sleep_for = record.expires_at.timestamp() - time.time()
                    if sleep_for <= 0:
                        result = await self.store.expire(request_id)
                        if result.outcome is Outcome.NOT_DUE:
                            sleep_for = max(result.remaining_ms / 1000, _MIN_RECHECK_S)
                        else:
                            continue
                    sleep_for = max(sleep_for, _MIN_RECHECK_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), sleep_for)

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


def _vanished(request_id: str) -> Decision:
    log.error("request_record_missing", request_id=request_id)
    return Decision(
        request_id=request_id,
        status=Status.DENIED,
        reason="the request's record is missing from Redis (lost write or past retention); "
        "failing closed",
        args_digest="",
    )
