"""The agent's API on fakeredis: ask, wait through pub/sub, re-attach, guard, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fakeredis
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sudo_queue import (
    Decision,
    Gate,
    IdempotencyConflict,
    InvalidRequest,
    RequestDenied,
    RequestRecord,
    Status,
    WaitTimeout,
)
from sudo_queue.gate import _inbox_news
from sudo_queue.multiplexer import Wake
from sudo_queue.policy import Policy, Verdict
from sudo_queue.store import Outcome, Store

from .helpers import POLICY, decide_as_policy

STATUS = {Verdict.ALLOW: Status.ALLOWED, Verdict.DENY: Status.DENIED}


async def decide_queued(store: Store, policy: Policy) -> int:
    """Stand-in for the policy worker: evaluate every queued request once."""
    decided = 0
    for record in await store.records(await store.open_ids(Status.QUEUED)):
        evaluation = policy.evaluate(
            agent=record.agent,
            resource=record.resource,
            action=record.action,
            args=record.args,
            context=record.context,
        )
        await store.decide(
            record.id,
            status=STATUS.get(evaluation.decision, Status.PENDING),
            agent=record.agent,
            resource=record.resource,
            action=record.action,
            args_digest=record.args_digest,
            rule=evaluation.rule,
            reason=evaluation.reason,
            policy_version=policy.version,
            actor="policy",
            expires_in_s=evaluation.expires_in,
            approvers=evaluation.approvers,
            min_approvals=evaluation.min_approvals,
        )
        decided += 1
    return decided


@pytest_asyncio.fixture
async def gate(fake_redis: Redis) -> AsyncIterator[Gate]:
    async with Gate(fake_redis, agent="billing-bot") as g:
        yield g


@pytest_asyncio.fixture
async def worker(store: Store) -> AsyncIterator[None]:
    """A background decider using config/policy.yaml, polling fakeredis (tests only)."""
    policy = Policy.load(POLICY)

    async def loop() -> None:
        while True:
            await decide_queued(store, policy)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_for_status(store: Store, request_id: str, status: Status) -> None:
    async with asyncio.timeout(5):
        while True:
            record = await store.get(request_id)
            if record is not None and record.status is status:
                return
            await asyncio.sleep(0.005)


@pytest.mark.usefixtures("worker")
async def test_allowed_request_returns_a_granted_decision(gate: Gate) -> None:
    """A call a rule allows returns at once with the rule named."""
    decision = await gate.request("stripe", "charge", {"amount": 10}, timeout=5)
    assert decision.granted
    assert (decision.status, decision.rule) == (Status.ALLOWED, "small-charges")


@pytest.mark.usefixtures("worker")
async def test_denied_request_raises_permission_error(gate: Gate) -> None:
    """A denied call raises RequestDenied, which plain `except PermissionError` also catches."""
    with pytest.raises(PermissionError) as info:
        await gate.request("postgres", "drop_table", {"table": "users"}, timeout=5)
    assert isinstance(info.value, RequestDenied)
    assert info.value.decision.status is Status.DENIED
    assert info.value.decision.rule == "never-drop"
    assert "never-drop" in str(info.value)


@pytest.mark.usefixtures("worker")
async def test_approval_resumes_the_waiting_agent(gate: Gate, store: Store) -> None:
    """A pending request resumes as approved by U123 as soon as U123 approves."""
    request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    waiter = asyncio.create_task(gate.wait(request_id, timeout=5))
    await wait_for_status(store, request_id, Status.PENDING)
    assert not waiter.done()
    await store.approve(request_id, actor="U123")
    decision = await asyncio.wait_for(waiter, 2)
    assert (decision.status, decision.decided_by, decision.granted) == (
        Status.APPROVED,
        "U123",
        True,
    )


@pytest.mark.usefixtures("worker")
async def test_rejection_reason_reaches_the_agent(gate: Gate, store: Store) -> None:
    """A reject with a reason raises RequestDenied carrying that reason and the rejecter."""
    request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    await wait_for_status(store, request_id, Status.PENDING)
    await store.reject(request_id, actor="U9", reason="customer disputed")
    with pytest.raises(RequestDenied) as info:
        await gate.wait(request_id, timeout=2)
    assert info.value.decision.reason == "customer disputed"
    assert info.value.decision.decided_by == "U9"
    assert info.value.decision.status is Status.REJECTED


@pytest.mark.usefixtures("worker")
async def test_timeout_leaves_request_pending_then_reattach(gate: Gate, store: Store) -> None:
    """WaitTimeout leaves the request open; the same key re-attaches and gets the decision."""
    with pytest.raises(WaitTimeout) as info:
        await gate.request("stripe", "charge", {"amount": 5000}, key="order-7", timeout=0.3)
    request_id = info.value.request_id
    record = await store.get(request_id)
    assert record is not None
    assert record.status is Status.PENDING
    await store.approve(request_id, actor="alice")
    decision = await gate.request("stripe", "charge", {"amount": 5000}, key="order-7", timeout=2)
    assert (decision.request_id, decision.decided_by) == (request_id, "alice")


@pytest.mark.usefixtures("worker")
async def test_same_key_different_args_conflicts(gate: Gate) -> None:
    """Reusing a key for different args raises IdempotencyConflict naming the key."""
    await gate.request("stripe", "charge", {"amount": 10}, key="order-9", timeout=5)
    with pytest.raises(IdempotencyConflict, match="order-9"):
        await gate.request("stripe", "charge", {"amount": 11}, key="order-9", timeout=5)
    with pytest.raises(IdempotencyConflict):
        await gate.request("stripe", "refund", {"amount": 10}, key="order-9", timeout=5)


async def test_keys_are_per_agent(fake_redis: Redis) -> None:
    """Two agents using the same key get two requests."""
    async with Gate(fake_redis, agent="a") as one, Gate(fake_redis, agent="b") as two:
        first = await one.submit("stripe", "charge", {"amount": 1}, key="k")
        second = await two.submit("stripe", "charge", {"amount": 1}, key="k")
    assert first != second


async def test_deadline_expires_without_a_worker(gate: Gate, store: Store) -> None:
    """A waiting agent expires its own overdue request through the server-clock transition."""
    request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    await decide_as_policy(store, request_id, Status.PENDING, expires_in_s=0.2)
    with pytest.raises(RequestDenied) as info:
        await gate.wait(request_id, timeout=3)
    assert info.value.decision.status is Status.EXPIRED


async def test_vanished_record_is_denied(gate: Gate, fake_redis: Redis) -> None:
    """A request whose record disappeared is treated as denied, never allowed."""
    request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    await fake_redis.delete(f"sq:req:{request_id}")
    with pytest.raises(RequestDenied) as info:
        await gate.wait(request_id, timeout=2)
    assert info.value.decision.status is Status.DENIED
    assert "missing" in (info.value.decision.reason or "")


async def test_decided_before_waiting_returns_at_once(gate: Gate, store: Store) -> None:
    """A decision written before the agent subscribes is found by the read after subscribing."""
    request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    await decide_as_policy(store, request_id, Status.ALLOWED)
    decision = await gate.wait(request_id, timeout=1)
    assert decision.status is Status.ALLOWED


@pytest.mark.usefixtures("worker")
async def test_many_waiters_share_one_subscription_reader(gate: Gate, store: Store) -> None:
    """50 concurrent waiters all resume when approved; channels are released afterwards."""
    ids = [await gate.submit("stripe", "charge", {"amount": 5000 + i}) for i in range(50)]
    waiters = [asyncio.create_task(gate.wait(i, timeout=10)) for i in ids]
    for request_id in ids:
        await wait_for_status(store, request_id, Status.PENDING)
    await asyncio.sleep(0.05)
    assert gate._mux.channel_count == 50
    for request_id in ids:
        await store.approve(request_id, actor="U1")
    decisions = await asyncio.gather(*waiters)
    assert {d.status for d in decisions} == {Status.APPROVED}
    assert gate._mux.channel_count == 0


@pytest.mark.usefixtures("worker")
async def test_cancel_ends_the_wait(gate: Gate, store: Store) -> None:
    """Cancelling a pending request wakes its waiter with RequestDenied(cancelled)."""
    request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    waiter = asyncio.create_task(gate.wait(request_id, timeout=5))
    await wait_for_status(store, request_id, Status.PENDING)
    decision = await gate.cancel(request_id)
    assert decision.status is Status.CANCELLED
    with pytest.raises(RequestDenied):
        await waiter


@pytest.mark.usefixtures("worker")
async def test_guard_runs_only_when_granted(gate: Gate) -> None:
    """@gate.guard passes the bound arguments as args and skips the body on a denial."""
    ran: list[dict[str, Any]] = []

    @gate.guard("stripe", "charge", timeout=5)
    async def charge(amount: int, currency: str = "usd") -> str:
        ran.append({"amount": amount, "currency": currency})
        return "charged"

    @gate.guard("postgres", "drop_table", timeout=5)
    async def drop(table: str) -> None:
        ran.append({"table": table})

    assert await charge(10) == "charged"
    with pytest.raises(RequestDenied):
        await drop("users")
    assert ran == [{"amount": 10, "currency": "usd"}]


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("resource", "action", "args", "message"),
    [
        ("", "charge", {}, "resource must be a non-empty"),
        ("stripe", "  ", {}, "action must be a non-empty"),
        ("stripe", "charge", {"x": math.nan}, "NaN"),
        ("stripe", "charge", {"x": math.inf}, "Infinity"),
        ("stripe", "charge", cyclic(), "cycle"),
        ("stripe", "charge", {"blob": b"\x00"}, "bytes"),
        ("stripe", "charge", {1: "x"}, "keys must be strings"),
        ("stripe", "charge", {"big": "x" * 70_000}, "over the limit"),
        ("stripe", "charge", nested(10_000), "nests deeper"),
        ("stripe", "charge", {"when": object()}, "not JSON"),
    ],
)
async def test_invalid_requests_are_refused_clearly(
    gate: Gate, fake_redis: Redis, resource: str, action: str, args: Any, message: str
) -> None:
    """Bad names and non-JSON args raise InvalidRequest saying what was wrong; nothing is stored."""
    with pytest.raises(InvalidRequest, match=message):
        await gate.request(resource, action, args)
    assert await fake_redis.keys("sq:req:*") == []


def test_decision_str_is_readable() -> None:
    """A Decision prints as one line a person can act on."""
    decision = Decision(
        request_id="r1", status=Status.APPROVED, decided_by="alice", rule="big", args_digest="d"
    )
    assert str(decision) == "approved by alice (rule big) [request r1]"
    assert decision.granted


# -- the inbox: a terminal wake-up carries the decision ----------------------------------------


async def inbox_ready(gate: Gate) -> None:
    """Wait until the Gate's inbox is confirmed, so that `request` waits on it."""
    async with asyncio.timeout(5):
        while True:
            if await gate._mux.keep(gate._inbox):
                return
            await asyncio.sleep(0.01)


def count_reads(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the records `gate` reads from now on."""
    reads: list[str] = []
    real_get = gate.store.get

    async def get(request_id: str, *, votes: bool = True) -> RequestRecord | None:
        reads.append(request_id)
        return await real_get(request_id, votes=votes)

    monkeypatch.setattr(gate.store, "get", get)
    return reads


async def outcome(call: Awaitable[Decision]) -> Decision:
    """The Decision a call returned or carried in RequestDenied."""
    try:
        return await call
    except RequestDenied as exc:
        return exc.decision


async def next_queued(store: Store) -> str:
    async with asyncio.timeout(5):
        while True:
            if ids := await store.open_ids(Status.QUEUED):
                return ids[0]
            await asyncio.sleep(0.005)


async def park(
    store: Store, request_id: str, *, min_approvals: int = 1, expires_in_s: float = 60
) -> None:
    """Turn a queued request pending, as the policy worker does."""
    result = await decide_as_policy(
        store,
        request_id,
        Status.PENDING,
        expires_in_s=expires_in_s,
        approvers=["alice", "bob"],
        min_approvals=min_approvals,
    )
    assert result.outcome is Outcome.APPLIED


Drive = Callable[[Store, str, "asyncio.Task[Decision]"], Awaitable[None]]


async def allow(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await decide_as_policy(store, request_id, Status.ALLOWED)


async def deny(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await decide_as_policy(store, request_id, Status.DENIED)


async def approve_by_quorum(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await park(store, request_id, min_approvals=2)
    await store.approve(request_id, actor="alice", reason="fine by me")
    await asyncio.sleep(0.05)
    assert not waiter.done(), "one vote of two must leave the agent waiting"
    await store.approve(request_id, actor="bob")


async def reject(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await park(store, request_id)
    await store.reject(request_id, actor="U9", reason='customer "disputed" it: see a/b — é')


async def reject_at_length(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await park(store, request_id)
    await store.reject(request_id, actor="U9", reason="too long to travel by pub/sub " * 100)


async def expire(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await park(store, request_id, expires_in_s=0.2)
    await asyncio.sleep(0.2)
    await store.expire(request_id)  # as the expiry job does, racing the waiter's own expire


async def cancel(store: Store, request_id: str, waiter: asyncio.Task[Decision]) -> None:
    await park(store, request_id)
    await store.cancel(request_id, actor="billing-bot", reason="no longer needed")


@pytest_asyncio.fixture(
    params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis_server)]
)
async def any_redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """fakeredis, and a private redis-server: its Lua cjson is not fakeredis's."""
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    ("drive", "status", "reads"),
    [
        (allow, Status.ALLOWED, 0),
        (deny, Status.DENIED, 0),
        (approve_by_quorum, Status.APPROVED, 0),
        (reject, Status.REJECTED, 0),
        (reject_at_length, Status.REJECTED, 1),  # over the message size bound: read instead
        (expire, Status.EXPIRED, None),  # the waiter's own expire may win, then it reads
        (cancel, Status.CANCELLED, 0),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_inbox_wake_up_returns_the_decision_the_record_holds(
    any_redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    drive: Drive,
    status: Status,
    reads: int | None,
) -> None:
    """The Decision an inbox wake-up brings is, field by field, the one the record gives."""
    store = Store(any_redis)
    async with Gate(any_redis, agent="billing-bot") as gate:
        await inbox_ready(gate)
        read_ids = count_reads(gate, monkeypatch)
        waiter = asyncio.create_task(
            outcome(gate.request("stripe", "charge", {"amount": 5000}, timeout=10))
        )
        request_id = await next_queued(store)
        await drive(store, request_id, waiter)
        decision = await waiter
    record = await store.get(request_id)
    assert record is not None
    assert decision.model_dump() == record.decision().model_dump()
    assert decision.status is status
    if reads is not None:
        assert len(read_ids) == reads


async def test_unusable_inbox_messages_never_grant(
    gate: Gate, store: Store, fake_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Foreign or malformed inbox messages make the waiter read the record: none grants."""
    await inbox_ready(gate)
    reads = count_reads(gate, monkeypatch)
    waiter = asyncio.create_task(gate.request("stripe", "charge", {"amount": 5000}, timeout=10))
    request_id = await next_queued(store)
    await park(store, request_id)
    record = await store.get(request_id)
    assert record is not None

    def news(**fields: Any) -> str:
        return f"{request_id} {json.dumps(fields)}"

    allowed = {"status": "allowed", "args_digest": record.args_digest}
    for message in [
        request_id,  # the id alone
        f"{request_id} not json",
        f"{request_id} " + "[" * 100_000,
        news(status="allowed"),  # no digest
        news(status="allowed", args_digest="0" * 64),  # another request's args
        news(**allowed, rule=7),  # not all strings
        news(**allowed, decided_at="soon"),
        news(status="granted", args_digest=record.args_digest),
        f"{request_id} {json.dumps([allowed])}",
    ]:
        read_before = len(reads)
        await fake_redis.publish(gate._inbox, message)
        async with asyncio.timeout(5):
            while True:  # the waiter reads the record instead
                if len(reads) > read_before:
                    break
                await asyncio.sleep(0.005)
        assert not waiter.done(), message[:80]
    await store.reject(request_id, actor="U9")
    with pytest.raises(RequestDenied) as info:
        await waiter
    assert info.value.decision.status is Status.REJECTED


async def test_pending_news_after_a_resubscription_is_read_again() -> None:
    """After a resubscription a pending message may be old news: only a terminal one stands."""
    wake = Wake()

    def inbox_news(status: str) -> Decision | None:
        wake.news = json.dumps({"status": status, "args_digest": "d", "expires_at": "1"})
        wake.stale = True
        news = _inbox_news("r1", wake, "d")
        return None if news is None else news[0]

    assert inbox_news("pending") is None
    decision = inbox_news("approved")
    assert decision is not None
    assert decision.status is Status.APPROVED


@pytest.mark.redis_server
async def test_inbox_waiter_rereads_after_a_reconnect(real_redis: Redis) -> None:
    """A decision made while the inbox connection is down reaches the waiter by a re-read."""
    store = Store(real_redis)
    async with Gate(real_redis, agent="billing-bot") as gate:
        await inbox_ready(gate)
        waiter = asyncio.create_task(gate.request("stripe", "charge", {"amount": 5000}, timeout=10))
        request_id = await next_queued(store)
        await park(store, request_id)
        await asyncio.sleep(0.05)  # the waiter has the pending news and is parked
        await real_redis.client_kill_filter(_type="pubsub")
        # The reader waits >= 50 ms before reconnecting: this approval's message reaches no one.
        assert (await store.approve(request_id, actor="alice")).changed
        decision = await waiter
    assert (decision.status, decision.decided_by) == (Status.APPROVED, "alice")
    assert gate._mux.reconnects >= 1
