"""Redis that dies, restarts, freezes or drops our connections; records that vanish."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from sudo_queue import Gate, GateUnavailable, RequestDenied, Status, WaitTimeout
from sudo_queue.store import Store

from ..helpers import RedisServer, decide_as_policy, run_cli
from .common import status_of, until, worker_ready, write

pytestmark = pytest.mark.redis_server

QUICK_EXPIRY = """\
version: 1
rules:
  - name: quick-approval
    resource: stripe
    decision: require_approval
    expires_in: 1s
"""


async def pending(gate: Gate, store: Store, amount: int) -> str:
    request_id = await gate.submit("stripe", "charge", {"amount": amount})
    await until(lambda: _is_pending(store, request_id))
    return request_id


async def _is_pending(store: Store, request_id: str) -> bool:
    return await status_of(store, request_id) is Status.PENDING


async def test_redis_killed_and_restarted_while_agents_wait(
    aof_redis: RedisServer, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Row 4: Redis killed and restarted (AOF): all reconnect; pending survives; approval works."""
    worker = workers(aof_redis.url)
    async with Redis.from_url(aof_redis.url, decode_responses=True) as redis:
        await worker_ready(redis)
    async with Gate.connect(aof_redis.url, agent="bot") as gate:
        async with Redis.from_url(aof_redis.url, decode_responses=True) as redis:
            store = Store(redis)
            ids = [await pending(gate, store, 5000 + i) for i in range(5)]
        waiters = [asyncio.create_task(gate.wait(i, timeout=60)) for i in ids]
        await asyncio.sleep(1.5)  # appendfsync everysec: the AOF has reached the disk
        aof_redis.kill(signal.SIGKILL)
        await asyncio.sleep(0.5)
        aof_redis.start()
        async with Redis.from_url(aof_redis.url, decode_responses=True) as redis:
            store = Store(redis)
            assert [await status_of(store, i) for i in ids] == [Status.PENDING] * 5
            for request_id in ids:
                assert (await store.approve(request_id, actor="alice")).changed
        decisions = await asyncio.gather(*waiters)
        assert {(d.status, d.decided_by) for d in decisions} == {(Status.APPROVED, "alice")}
        after = await gate.request("stripe", "charge", {"amount": 10}, timeout=30)
    assert after.status is Status.ALLOWED
    assert worker.poll() is None, "the worker must have survived the restart"


async def test_pubsub_connection_killed_then_decided(
    redis_url: str, real_redis: Redis, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Row 5: the pub/sub connection killed and the request decided before it reconnects."""
    workers(redis_url)
    store = Store(real_redis)
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await pending(gate, store, 5000)
        waiter = asyncio.create_task(gate.wait(request_id, timeout=10))
        await until(lambda: _subscribed(real_redis))
        await real_redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        # The approval takes ~1 ms; the reader waits >= 50 ms before reconnecting, so the
        # PUBLISH goes to no subscriber: only the re-read after resubscribing can see it.
        assert (await store.approve(request_id, actor="alice")).changed
        started = time.monotonic()
        decision = await waiter
    assert decision.status is Status.APPROVED
    assert time.monotonic() - started < 3
    assert gate._mux.reconnects >= 1


async def _subscribed(redis: Redis) -> bool:
    clients = await redis.client_list(_type="pubsub")
    return bool(clients) and int(clients[0]["sub"]) >= 1


async def test_decision_between_subscribe_and_confirmation(
    redis_url: str, real_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 6: a decision written after SUBSCRIBE is sent but before it is confirmed: no wait."""
    store = Store(real_redis)
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"amount": 5000})
        original = PubSub.subscribe

        async def subscribe_then_decide(self: PubSub, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, *args, **kwargs)
            await decide_as_policy(store, request_id, Status.ALLOWED)
            return result

        monkeypatch.setattr(PubSub, "subscribe", subscribe_then_decide)
        started = time.monotonic()
        decision = await gate.wait(request_id, timeout=5)
    assert decision.status is Status.ALLOWED
    assert time.monotonic() - started < 1


async def test_frozen_redis_honours_the_timeout(
    aof_redis: RedisServer, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Row 7: Redis SIGSTOPped: wait and request still return within their timeout; no hang."""
    workers(aof_redis.url)
    async with Gate.connect(aof_redis.url, agent="bot") as gate:
        async with Redis.from_url(aof_redis.url, decode_responses=True) as redis:
            request_id = await pending(gate, Store(redis), 5000)
        aof_redis.kill(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(WaitTimeout):
                await gate.wait(request_id, timeout=1)
            assert time.monotonic() - started < 2
            started = time.monotonic()
            with pytest.raises(GateUnavailable, match="did not answer"):
                await gate.request("stripe", "charge", {"amount": 1}, timeout=1)
            assert time.monotonic() - started < 2
        finally:
            aof_redis.kill(signal.SIGCONT)


async def test_redis_down_when_requesting(aof_redis: RedisServer) -> None:
    """Row 8: Redis gone when request() is called: GateUnavailable; the guarded body never runs."""
    ran: list[int] = []
    async with Gate.connect(aof_redis.url, agent="bot") as gate:

        @gate.guard("stripe", "charge", timeout=5)
        async def charge(amount: int) -> None:
            ran.append(amount)

        aof_redis.kill(signal.SIGKILL)
        with pytest.raises(GateUnavailable, match="nothing was allowed"):
            await charge(10)
    assert ran == []


async def test_approval_after_the_deadline_is_refused(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 10: an approval after the deadline is refused (exit 1); the agent got expired."""
    workers(redis_url, write(tmp_path / "p.yaml", QUICK_EXPIRY))
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await pending(gate, Store(real_redis), 5000)
        with pytest.raises(RequestDenied) as info:
            await gate.wait(request_id, timeout=10)
    assert info.value.decision.status is Status.EXPIRED
    late = run_cli(redis_url, "approve", request_id, "--as", "alice")
    assert late.returncode == 1
    assert "expired" in late.stderr
    assert (await Store(real_redis).get(request_id)).status is Status.EXPIRED  # type: ignore[union-attr]


async def test_vanished_record_is_never_allowed(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 11: a record lost while its agent waits ends as denied, never allowed."""
    async with Gate.connect(redis_url, agent="bot") as gate:
        queued = await gate.submit("stripe", "charge", {"amount": 10})
        await real_redis.delete(f"sq:req:{queued}")  # lost before any worker saw it
        workers(redis_url, write(tmp_path / "p.yaml", QUICK_EXPIRY))
        with pytest.raises(RequestDenied) as lost_queued:
            await gate.wait(queued, timeout=15)
        request_id = await pending(gate, Store(real_redis), 5000)
        await real_redis.delete(f"sq:req:{request_id}")  # lost while pending
        with pytest.raises(RequestDenied) as lost_pending:
            await gate.wait(request_id, timeout=15)
    for info in (lost_queued, lost_pending):
        assert info.value.decision.status is Status.DENIED
        assert "missing" in (info.value.decision.reason or "")
    assert run_cli(redis_url, "approve", request_id, "--as", "alice").returncode == 2
