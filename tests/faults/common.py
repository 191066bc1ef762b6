"""Helpers shared by the fault tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from sudo_queue.models import Status
from sudo_queue.store import Store

# An evaluation that takes seconds on purpose (O(n^2) over 4,000 items, ~20 KB of args), so a
# test can kill the worker while it is evaluating.
SLOW_ARGS = {"items": list(range(4000))}
SLOW_POLICY = """\
version: 1
default: deny
rules:
  - name: slow-but-allowed
    resource: slow
    when: "args.items.all(a, args.items.all(b, a != b || a == b))"
    decision: allow
  - name: quick-allow
    resource: quick
    decision: allow
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def until(check: Callable[[], Awaitable[object]], limit: float = 15) -> None:
    """Wait until `check()` is truthy, at most `limit` seconds (then fail)."""
    async with asyncio.timeout(limit):
        while not await check():  # noqa: ASYNC110  # polling Redis, not an in-process event
            await asyncio.sleep(0.02)


async def worker_ready(redis: Redis, namespace: str = "sq") -> None:
    """A worker has started its poll loop once arq's health-check key exists."""
    await until(lambda: redis.exists(f"{namespace}:queue:health-check"))


async def status_of(store: Store, request_id: str) -> Status | None:
    record = await store.get(request_id)
    return None if record is None else record.status


async def audit_events(redis: Redis, request_id: str) -> list[str]:
    return [
        fields["event"]
        for _, fields in await redis.xrange("sq:audit")
        if fields.get("request_id") == request_id
    ]
