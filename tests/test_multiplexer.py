"""One pub/sub connection per process: keyed waiters on a shared channel, a Gate's inbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sudo_queue import Gate, Status
from sudo_queue.multiplexer import Multiplexer, Wake
from sudo_queue.store import Store

from .helpers import decide_as_policy


@pytest_asyncio.fixture
async def mux(fake_redis: Redis) -> AsyncIterator[Multiplexer]:
    multiplexer = Multiplexer(fake_redis)
    yield multiplexer
    await multiplexer.aclose()


async def park(store: Store) -> list[str]:
    """Stand-in for the policy worker: turn every queued request pending; return their ids."""
    ids = await store.open_ids(Status.QUEUED)
    for request_id in ids:
        await decide_as_policy(store, request_id, Status.PENDING)
    return ids


async def test_keyed_waiters_wake_only_for_their_key(mux: Multiplexer, fake_redis: Redis) -> None:
    """Two waiters share a channel; a message carrying one key wakes that waiter only."""
    async with (
        mux.listen("sq:inbox:x", key="a") as wake_a,
        mux.listen("sq:inbox:x", key="b") as wake_b,
    ):
        wake_a.clear()  # set by the subscription's confirmation
        await fake_redis.publish("sq:inbox:x", "a")
        async with asyncio.timeout(2):
            await wake_a.wait()
        assert not wake_b.is_set()
        assert wake_a.news == ""
        await fake_redis.publish("sq:inbox:x", "b")
        async with asyncio.timeout(2):
            await wake_b.wait()
    assert mux.channel_count == 0


async def test_keyed_waiter_gets_the_news_after_its_key(
    mux: Multiplexer, fake_redis: Redis
) -> None:
    """'<key> <news>' wakes the key's waiter with the news; a plain waiter gets it all."""
    async with (
        mux.listen("sq:inbox:n", key="a") as wake_a,
        mux.listen("sq:inbox:n", key="b") as wake_b,
        mux.listen("sq:inbox:n") as plain,
    ):
        wake_a.clear()  # set by the subscription's confirmation
        await fake_redis.publish("sq:inbox:n", 'a {"status": "approved"}')
        async with asyncio.timeout(2):
            await wake_a.wait()
            await plain.wait()
        assert (wake_a.news, wake_a.stale) == ('{"status": "approved"}', False)
        assert plain.news == 'a {"status": "approved"}'
        assert not wake_b.is_set()
        await fake_redis.publish("sq:inbox:n", "ab {}")  # a key is matched whole
        await fake_redis.publish("sq:inbox:n", "b")
        async with asyncio.timeout(2):
            await wake_b.wait()
        assert wake_a.news == '{"status": "approved"}'
        wake_a.clear()
        assert (wake_a.is_set(), wake_a.news) == (False, None)


async def test_kept_channel_outlives_its_waiters(mux: Multiplexer, fake_redis: Redis) -> None:
    """A kept channel is confirmed in the background and stays subscribed between waits."""
    assert await mux.keep("sq:inbox:y") is False  # subscribing has only started
    async with mux.listen("sq:inbox:y", key="r1") as wake:
        assert await mux.keep("sq:inbox:y") is True
        await fake_redis.publish("sq:inbox:y", "r1")
        async with asyncio.timeout(2):
            await wake.wait()
    assert mux.channel_count == 1
    assert await fake_redis.pubsub_numsub("sq:inbox:y") == [("sq:inbox:y", 1)]


async def test_waiting_requests_share_one_subscription(fake_redis: Redis, store: Store) -> None:
    """20 requests waiting in one Gate hold one subscription (its inbox) and all resume."""

    async def approve_all(expected: int) -> None:
        ids: list[str] = []
        async with asyncio.timeout(5):
            while len(ids) < expected:
                ids += await park(store)
                await asyncio.sleep(0.01)
        if expected > 1:
            assert await fake_redis.pubsub_channels() == [gate._inbox]
        for request_id in ids:
            await store.approve(request_id, actor="alice")

    async with Gate(fake_redis, agent="billing-bot") as gate:
        # The first request starts the inbox subscription (and waits on its own channel).
        first = asyncio.create_task(gate.request("stripe", "charge", {"n": -1}, timeout=10))
        await approve_all(1)
        assert (await first).status is Status.APPROVED
        waiters = [
            asyncio.create_task(gate.request("stripe", "charge", {"n": n}, timeout=10))
            for n in range(20)
        ]
        await approve_all(20)
        decisions = await asyncio.gather(*waiters)
    assert {d.status for d in decisions} == {Status.APPROVED}


async def test_reattached_request_is_woken_on_its_own_channel(
    fake_redis: Redis, store: Store
) -> None:
    """A request re-attached by key from another Gate (another inbox) still resumes."""
    async with (
        Gate(fake_redis, agent="billing-bot") as creator,
        Gate(fake_redis, agent="billing-bot") as restarted,
    ):
        await creator._mux.keep(creator._inbox)
        await restarted._mux.keep(restarted._inbox)
        await asyncio.sleep(0.1)  # both inboxes confirmed: request() takes the inbox path
        original = asyncio.create_task(
            creator.request("stripe", "charge", {"amount": 5000}, key="order-1", timeout=10)
        )
        ids: list[str] = []
        async with asyncio.timeout(5):
            while not ids:
                await asyncio.sleep(0.01)
                ids = await park(store)
        again = asyncio.create_task(
            restarted.request("stripe", "charge", {"amount": 5000}, key="order-1", timeout=10)
        )
        await asyncio.sleep(0.1)
        await store.approve(ids[0], actor="alice")
        decisions = await asyncio.gather(original, again)
    assert [d.request_id for d in decisions] == [ids[0], ids[0]]
    assert {d.status for d in decisions} == {Status.APPROVED}


@pytest.mark.redis_server
async def test_reconnect_wakes_every_keyed_waiter(real_redis: Redis) -> None:
    """A killed pub/sub connection comes back and wakes every waiter of the inbox, stale."""
    mux = Multiplexer(real_redis)
    try:
        async with (
            mux.listen("sq:inbox:z", key="a") as wake_a,
            mux.listen("sq:inbox:z", key="b") as wake_b,
        ):
            await real_redis.publish("sq:inbox:z", "a old news")
            async with asyncio.timeout(5):
                await wake_a.wait()
            wake_b.clear()
            await real_redis.client_kill_filter(_type="pubsub")
            async with asyncio.timeout(5):
                await wake_b.wait()  # the resubscription wakes every waiter at once
            # The news from before the gap is kept, but marked stale: the waiter re-reads.
            assert (wake_a.is_set(), wake_a.news) == (True, "old news")
            assert (wake_b.is_set(), wake_b.news) == (True, None)
        assert mux.reconnects >= 1
    finally:
        await mux.aclose()


async def test_wake_wait_times_out_then_wakes_on_set() -> None:
    """`wait(timeout)` says False when time runs out and True when set; it leaves no timer."""
    wake = Wake()
    loop = asyncio.get_running_loop()
    timers_before = len(loop._scheduled)  # type: ignore[attr-defined]  # CPython's timer heap
    assert await wake.wait(0.01) is False
    assert not wake.is_set()
    waiter = asyncio.create_task(wake.wait(30))
    await asyncio.sleep(0)
    wake.news = "r1"
    wake.set()
    async with asyncio.timeout(2):
        assert await waiter is True
    # The 30 s timer was cancelled with the wait (cancelled handles leave the heap lazily).
    live = [t for t in loop._scheduled if not t.cancelled()]  # type: ignore[attr-defined]
    assert len(live) <= timers_before
    assert await wake.wait() is True  # set stays set until cleared
    wake.clear()
    assert (wake.is_set(), wake.news, wake.stale) == (False, None, False)


async def test_wake_survives_a_cancelled_waiter_and_refuses_a_second() -> None:
    """A cancelled wait leaves the Wake usable; two coroutines may not wait on one at once."""
    wake = Wake()
    first = asyncio.create_task(wake.wait())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already waiting"):
        await wake.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    again = asyncio.create_task(wake.wait())
    await asyncio.sleep(0)
    wake.set()
    async with asyncio.timeout(2):
        assert await again is True


async def test_cancelled_listen_leaves_no_waiter(fake_redis: Redis) -> None:
    """A listener cancelled while its subscription is unconfirmed is removed from its channel."""
    mux = Multiplexer(fake_redis)
    try:

        async def listen_forever() -> None:
            async with mux.listen("sq:inbox:c", key="a"):
                await asyncio.sleep(30)

        # No reader runs yet for this channel's confirmation to arrive before the cancel.
        listener = asyncio.create_task(listen_forever())
        await asyncio.sleep(0)
        assert mux.channel_count == 1
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        entry = mux._channels.get("sq:inbox:c")
        assert entry is None or (not entry.keyed and not entry.waiters)
        # Once the late confirmation arrives, the reader drops the idle channel.
        async with asyncio.timeout(2):
            while True:
                if mux.channel_count == 0:
                    break
                await asyncio.sleep(0.01)
    finally:
        await mux.aclose()
