"""Every transition of the request state machine, one atomic step each (fakeredis with Lua)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from redis.asyncio import Redis

from sudo_queue import store as store_module
from sudo_queue.errors import GateUnavailable
from sudo_queue.models import Status, canonical_json, digest
from sudo_queue.store import Outcome, Store

ARGS = canonical_json({"amount": 5000})
DIGEST = digest(ARGS)


async def create(store: Store, request_id: str = "r1", key: str | None = None) -> None:
    result = await store.create(
        request_id,
        agent="bot",
        resource="stripe",
        action="charge",
        args_json=ARGS,
        args_digest=DIGEST,
        context_json="{}",
        key=key,
    )
    assert result.created


async def decide(
    store: Store,
    status: Status,
    request_id: str = "r1",
    *,
    min_approvals: int = 1,
    expires_in_s: float = 60,
    notify: tuple[tuple[str, str], ...] = (),
) -> Outcome:
    result = await store.decide(
        request_id,
        status=status,
        agent="bot",
        resource="stripe",
        action="charge",
        args_digest=DIGEST,
        rule="big-charges",
        reason="charges above 50 need a human",
        policy_version="sha256:test",
        actor="policy",
        expires_in_s=expires_in_s,
        approvers=["U1", "U2"],
        min_approvals=min_approvals,
        notify=notify,
    )
    return result.outcome


async def audit_events(redis: Redis) -> list[str]:
    return [fields["event"] for _, fields in await redis.xrange("sq:audit")]


async def test_create_enqueues_a_json_evaluation_job(store: Store, fake_redis: Redis) -> None:
    """Creating a request writes the record and its arq job (JSON, never pickle) together."""
    await create(store)
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.QUEUED
    assert record.args == {"amount": 5000}
    job = json.loads(await fake_redis.get("arq:job:sq-eval:r1"))
    assert job["f"] == "evaluate"
    assert job["a"][0] == "r1"
    assert job["k"] == {}
    assert await fake_redis.zscore("sq:queue", "sq-eval:r1") is not None
    assert await audit_events(fake_redis) == ["created"]


async def test_same_key_reattaches_and_reports_the_call(store: Store) -> None:
    """The same agent and key find the existing request instead of creating another."""
    await create(store, "r1", key="order-1")
    again = await store.create(
        "r2",
        agent="bot",
        resource="stripe",
        action="charge",
        args_json=ARGS,
        args_digest=DIGEST,
        context_json="{}",
        key="order-1",
    )
    assert (again.request_id, again.created, again.same_call) == ("r1", False, True)
    other = await store.create(
        "r3",
        agent="bot",
        resource="stripe",
        action="charge",
        args_json="{}",
        args_digest=digest("{}"),
        context_json="{}",
        key="order-1",
    )
    assert (other.request_id, other.same_call) == ("r1", False)
    assert await store.get("r2") is None


@pytest.mark.parametrize("status", [Status.ALLOWED, Status.DENIED])
async def test_policy_verdict_is_terminal(store: Store, fake_redis: Redis, status: Status) -> None:
    """allow/deny end the request, stamp the rule and policy version, and publish the wake-up."""
    await create(store)
    pubsub = fake_redis.pubsub()
    await pubsub.subscribe("sq:chan:r1")
    await pubsub.get_message(timeout=1)
    assert await decide(store, status) is Outcome.APPLIED
    message = await pubsub.get_message(timeout=1)
    assert message is not None
    assert message["data"] == status.value
    record = await store.get("r1")
    assert record is not None
    assert (record.status, record.rule, record.decided_by) == (status, "big-charges", "policy")
    assert record.policy_version == "sha256:test"
    assert await fake_redis.ttl("sq:req:r1") > 0
    assert await audit_events(fake_redis) == ["created", status.value]
    await pubsub.aclose()


async def test_retried_evaluation_changes_nothing_twice(store: Store, fake_redis: Redis) -> None:
    """A second delivery of the evaluation job is refused: one decision, one audit entry."""
    await create(store)
    assert await decide(store, Status.ALLOWED) is Outcome.APPLIED
    assert await decide(store, Status.DENIED) is Outcome.REFUSED
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.ALLOWED
    assert await audit_events(fake_redis) == ["created", "allowed"]


async def test_pending_sets_deadline_and_schedules_expiry(store: Store, fake_redis: Redis) -> None:
    """require_approval parks the request with a server-clock deadline and an expire job."""
    await create(store)
    assert await decide(store, Status.PENDING, notify=(("sq:slack", "post_request"),)) is (
        Outcome.APPLIED
    )
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.PENDING
    assert record.expires_at is not None
    delta = (record.expires_at - record.created_at).total_seconds()
    assert 59 < delta < 61
    assert await store.open_ids() == ["r1"]
    assert await fake_redis.zscore("sq:queue", "sq-expire:r1") is not None
    assert await fake_redis.zrange("sq:slack", 0, -1) == ["sq-notify:post_request:r1:pending"]


async def test_approve_records_the_approver(store: Store, fake_redis: Redis) -> None:
    """An approval ends the request as approved by that person and cancels the expiry job."""
    await create(store)
    await decide(store, Status.PENDING)
    result = await store.approve("r1", actor="U123")
    assert (result.outcome, result.status) == (Outcome.APPLIED, Status.APPROVED)
    record = await store.get("r1")
    assert record is not None
    assert (record.status, record.decided_by, record.approvals) == (
        Status.APPROVED,
        "U123",
        ["U123"],
    )
    assert await fake_redis.zscore("sq:queue", "sq-expire:r1") is None
    assert await store.open_ids() == []


async def test_quorum_needs_distinct_approvers(store: Store) -> None:
    """min_approvals 2: the same person twice counts once; a second person approves."""
    await create(store)
    await decide(store, Status.PENDING, min_approvals=2)
    first = await store.approve("r1", actor="U1")
    assert (first.outcome, first.votes, first.needed) == (Outcome.VOTED, 1, 2)
    assert (await store.approve("r1", actor="U1")).outcome is Outcome.DUPLICATE
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.PENDING
    final = await store.approve("r1", actor="U2")
    assert final.status is Status.APPROVED
    record = await store.get("r1")
    assert record is not None
    assert record.approvals == ["U1", "U2"]


async def test_agent_cannot_approve_itself(store: Store) -> None:
    """No self-approval: the requesting agent's own vote is refused."""
    await create(store)
    await decide(store, Status.PENDING)
    result = await store.approve("r1", actor="bot")
    assert result.outcome is Outcome.REFUSED
    assert "own request" in result.detail


async def test_approval_bound_to_digest(store: Store) -> None:
    """An approval given for other args (a different digest) is refused."""
    await create(store)
    await decide(store, Status.PENDING)
    result = await store.approve("r1", actor="U1", args_digest=digest("{}"))
    assert result.outcome is Outcome.REFUSED
    assert (await store.approve("r1", actor="U1", args_digest=DIGEST)).status is Status.APPROVED


async def test_reject_is_final_and_keeps_reason(store: Store) -> None:
    """One reject ends the request; its reason is what the agent will read."""
    await create(store)
    await decide(store, Status.PENDING, min_approvals=2)
    await store.approve("r1", actor="U1")
    result = await store.reject("r1", actor="U2", reason="not this customer")
    assert result.status is Status.REJECTED
    assert (await store.approve("r1", actor="U3")).outcome is Outcome.REFUSED
    record = await store.get("r1")
    assert record is not None
    assert (record.status, record.decided_by, record.reason) == (
        Status.REJECTED,
        "U2",
        "not this customer",
    )


async def test_expire_uses_the_server_clock(store: Store) -> None:
    """Expire before the deadline is refused with the time left; after it, the request expires."""
    await create(store)
    await decide(store, Status.PENDING, expires_in_s=0.2)
    early = await store.expire("r1")
    assert early.outcome is Outcome.NOT_DUE
    assert 0 < early.remaining_ms <= 200
    await asyncio.sleep(0.25)
    late = await store.expire("r1")
    assert late.status is Status.EXPIRED
    record = await store.get("r1")
    assert record is not None
    assert record.decided_by == "sudo-queue"


async def test_late_approval_is_refused_and_expires(store: Store) -> None:
    """An approval that arrives after the deadline is refused; the request is expired."""
    await create(store)
    await decide(store, Status.PENDING, expires_in_s=0.05)
    await asyncio.sleep(0.1)
    result = await store.approve("r1", actor="U1")
    assert (result.outcome, result.status) == (Outcome.REFUSED, Status.EXPIRED)
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.EXPIRED


@pytest.mark.parametrize("open_status", [Status.QUEUED, Status.PENDING])
async def test_cancel_open_request(store: Store, open_status: Status) -> None:
    """The agent can cancel a queued or pending request; a decided one stays decided."""
    await create(store)
    if open_status is Status.PENDING:
        await decide(store, Status.PENDING)
    assert (await store.cancel("r1", actor="bot")).status is Status.CANCELLED
    assert (await store.cancel("r1", actor="bot")).outcome is Outcome.REFUSED


async def test_fail_denies_a_queued_request(store: Store) -> None:
    """A poison evaluation ends in denied with the error as the reason (fail closed)."""
    await create(store)
    result = await store.fail("r1", actor="policy", rule="<error>", reason="boom x5")
    assert result.status is Status.DENIED
    record = await store.get("r1")
    assert record is not None
    assert record.reason == "boom x5"


async def test_requeue_only_when_the_job_is_gone(store: Store, fake_redis: Redis) -> None:
    """The sweeper's requeue is refused while the job exists and restores it once lost."""
    await create(store)
    assert (await store.requeue("r1")).outcome is Outcome.REFUSED
    await fake_redis.delete("arq:job:sq-eval:r1")
    await fake_redis.zrem("sq:queue", "sq-eval:r1")
    assert (await store.requeue("r1")).outcome is Outcome.APPLIED
    assert await fake_redis.exists("arq:job:sq-eval:r1")


async def test_missing_request(store: Store) -> None:
    """Transitions on an unknown id say so and create nothing."""
    assert (await store.approve("nope", actor="U1")).outcome is Outcome.MISSING
    assert await store.get("nope") is None


async def test_job_that_does_not_match_the_record_is_refused(store: Store) -> None:
    """A planted evaluation job with other args cannot decide the stored request."""
    await create(store)
    result = await store.decide(
        "r1",
        status=Status.ALLOWED,
        agent="bot",
        resource="stripe",
        action="charge",
        args_digest=digest('{"amount":1}'),
        rule="small",
        reason="",
        policy_version="v",
        actor="policy",
    )
    assert result.outcome is Outcome.REFUSED
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.QUEUED


async def test_malformed_record_fails_closed(store: Store, fake_redis: Redis) -> None:
    """A record with an unknown status is an error, never a grant."""
    from sudo_queue.errors import GateUnavailable

    await create(store)
    await fake_redis.hset("sq:req:r1", "status", "totally-allowed")
    with pytest.raises(GateUnavailable, match="malformed"):
        await store.get("r1")


async def test_hundred_concurrent_approve_reject_one_winner(
    store: Store, fake_redis: Redis
) -> None:
    """100 concurrent approves and rejects on one request: exactly one wins, once."""
    await create(store)
    await decide(store, Status.PENDING)
    calls = [
        store.approve("r1", actor=f"U{i}") if i % 2 else store.reject("r1", actor=f"U{i}")
        for i in range(100)
    ]
    results = await asyncio.gather(*calls)
    winners = [r for r in results if r.outcome is Outcome.APPLIED]
    assert len(winners) == 1
    assert all(r.outcome is Outcome.REFUSED for r in results if r is not winners[0])
    record = await store.get("r1")
    assert record is not None
    assert record.status is winners[0].status
    events = await audit_events(fake_redis)
    assert events.count("approved") + events.count("rejected") == 1


async def test_requeue_is_capped_then_denies(store: Store, fake_redis: Redis) -> None:
    """A job that keeps vanishing is re-enqueued a few times, then the request is denied."""
    await create(store)
    for _ in range(2):
        await fake_redis.delete("arq:job:sq-eval:r1")
        assert (await store.requeue("r1", max_requeues=2)).outcome is Outcome.APPLIED
    await fake_redis.delete("arq:job:sq-eval:r1")
    result = await store.requeue("r1", max_requeues=2)
    assert result.status is Status.DENIED
    record = await store.get("r1")
    assert record is not None
    assert record.rule == "<error>"
    assert "never completed" in (record.reason or "")


# -- transitions started together go out together ----------------------------------------------


async def test_transitions_of_one_turn_share_a_pipeline_and_keep_their_own_replies(
    real_redis: Redis,
) -> None:
    """50 agents creating at once cost two round trips, and each gets its own outcome: a
    duplicate id is refused on its own while the others are created."""
    store = Store(real_redis)
    await create(store, "r0")
    ids = [f"r{i}" for i in range(50)]
    results = await asyncio.gather(
        *(
            store.create(
                rid, agent="bot", resource="stripe", action="charge", args_json=ARGS,
                args_digest=DIGEST, context_json="{}", key=None,
            )
            for rid in ids
        ),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[0], GateUnavailable)  # r0 exists: refused, nothing changed
    assert all(r.created for r in results[1:] if not isinstance(r, BaseException))
    assert sum(1 for r in results if isinstance(r, BaseException)) == 1
    assert await real_redis.zcard(store.keys.queued) == 50
    # One call at a time, the pool would have opened a connection for each of the 50; here
    # the first call goes out at once and the 49 after it as one pipeline.
    assert len(await real_redis.client_list()) <= 3  # those two, and this check's


async def test_a_batch_survives_redis_losing_its_scripts(real_redis: Redis) -> None:
    store = Store(real_redis)
    await create(store, "r0")
    await real_redis.script_flush()
    results = await asyncio.gather(*(create(store, f"s{i}") for i in range(5)))
    assert results == [None] * 5
    assert await real_redis.zcard(store.keys.queued) == 6


async def test_a_caller_that_stops_waiting_does_not_cancel_the_others(real_redis: Redis) -> None:
    store = Store(real_redis)
    waiting = [asyncio.create_task(create(store, f"r{i}")) for i in range(10)]
    await asyncio.sleep(0)  # all ten are queued in this turn's batch
    waiting[3].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    # The batch was sent as a whole: the cancelled caller's request exists too, as it would if
    # its own call had been cancelled after sending.
    assert await real_redis.zcard(store.keys.queued) == 10


# -- lanes: the connections transitions go out on ----------------------------------------------

BUSY_SCRIPT = "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] " + (
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > tonumber(ARGV[1]) * 1e6"
)


async def test_a_lane_whose_caller_gave_up_answers_the_next_call_with_its_own_reply(
    real_redis: Redis,
) -> None:
    """A caller cancelled while its transition waits on Redis: its lane is closed, so the
    late reply can never answer a later call, which gets its own (created, then refused)."""
    store = Store(real_redis)
    await create(store, "warm")  # a lane exists and is idle
    other = Redis(connection_pool=real_redis.connection_pool)  # another connection of the pool
    busy = asyncio.create_task(other.eval(BUSY_SCRIPT, 0, "0.3"))  # Redis busy for 0.3 s
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await create(store, "late")  # sent, then given up while Redis is busy
    await busy
    assert (await store.get("late")) is not None  # it ran; its reply was dropped with the lane
    with pytest.raises(GateUnavailable, match="refused"):
        await create(store, "late")  # the same id again: its own reply says "exists"
    await create(store, "after")
    assert (await store.get("after")) is not None


async def test_a_lane_that_redis_does_not_answer_in_time_says_so(redis_url: str) -> None:
    """The lane keeps the client's socket_timeout: a frozen Redis gives a clear error, not a
    hang, and the next call goes through once Redis answers again."""
    client = Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.1)
    busy_client = Redis.from_url(redis_url, decode_responses=True)
    store = Store(client)
    await create(store, "warm")
    busy = asyncio.create_task(busy_client.eval(BUSY_SCRIPT, 0, "0.4"))
    await asyncio.sleep(0.05)
    with pytest.raises(GateUnavailable, match=r"did not answer within 0\.1s"):
        await create(store, "frozen")
    await busy
    await create(store, "after")
    assert (await store.get("after")) is not None
    await client.aclose()
    await busy_client.aclose()


async def test_a_loaded_store_keeps_to_its_lanes_and_serves_every_call(real_redis: Redis) -> None:
    """200 agents creating one request after another, resumed at scattered moments as their
    wake-ups arrive, while Redis is slow: at most MAX_LANES connections carry the calls (the
    rest wait in pipelines for the next free lane, oldest first), and every call completes."""
    store = Store(real_redis)
    created: list[str] = []
    rng = random.Random(7)

    async def agent(n: int) -> None:
        for i in range(5):
            await asyncio.sleep(rng.random() * 0.002)
            await create(store, f"a{n}-{i}")
            created.append(f"a{n}-{i}")

    other = Redis(connection_pool=real_redis.connection_pool)
    async with asyncio.timeout(30):
        # Redis busy for a while meanwhile: the calls pile up, as under a heavy load.
        await asyncio.gather(other.eval(BUSY_SCRIPT, 0, "0.2"), *(agent(n) for n in range(200)))
    assert len(created) == 1000
    assert await real_redis.zcard(store.keys.queued) == 1000
    clients = await real_redis.client_list()
    assert len(clients) <= store_module.MAX_LANES + 2  # the lanes, the pool's own, this check
