"""resume: approval committed (`Store.approve`, the CLI's path) to the waiting coroutine returning.

One request at a time is parked (pending), then approved by a second connection, as
`sudo-queue approve` or the Slack app would. The commit happens inside the approve call, at the
end of its Lua script, so two figures bracket it, each to `gate.request` returning in the agent:
from the call (an upper bound: it adds everything the approval does before it commits, its read
of the request, its own script) and from its reply. The reply leaves Redis as the commit ends,
so the time from the commit is the figure from the reply plus the reply's one-way delivery, which
is less than a round trip: a PING's round trip on the same connection is measured and printed
alongside. The goal is checked on the figure from the reply. Baseline: a client that polls for
its decision every 2 s. arq's worker is not on this path at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from .common import (
    CLIENT_POLL_S,
    Measure,
    Result,
    Server,
    goal,
    header,
    percentiles,
    poll_for_decision,
    quiet_logging,
    ratios,
    redis_server,
    table,
    wait_until,
    workers,
)

# After the request turns pending, the approver waits this long, so that the agent is parked
# (as it is when a human takes seconds) rather than still reading the pending record.
SETTLE_S = 0.005
WARMUP = 10


class PendingFeed:
    """Request ids as they turn pending, from the transitions' own wake-ups (no polling)."""

    def __init__(self, redis: Any, channel_prefix: str) -> None:
        self.pubsub = redis.pubsub()
        self.pattern = channel_prefix + "*"
        self.prefix = channel_prefix

    async def __aenter__(self) -> PendingFeed:
        await self.pubsub.psubscribe(self.pattern)
        while (await self.pubsub.get_message(timeout=5)) is None:
            pass  # the psubscribe confirmation
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def next_pending(self, timeout: float = 10) -> str:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.pubsub.get_message(timeout=timeout)
                if message and message["type"] == "pmessage" and message["data"] == "pending":
                    return str(message["channel"])[len(self.prefix) :]


async def _sequential(
    server: Server, count: int
) -> tuple[list[float], list[float], list[float], Measure]:
    """Samples from the approve call, and from its reply, to the waiter's return; and PING round
    trips on the approver's connection, taken between the cycles."""
    from redis.asyncio import Redis

    from sudo_queue import Gate
    from sudo_queue.store import Store

    from_call: list[float] = []
    from_reply: list[float] = []
    pings: list[float] = []
    async with (
        Gate.connect(server.url, agent="bench") as gate,
        Redis.from_url(server.url, decode_responses=True) as redis,
    ):
        approver = Store(redis)
        async with PendingFeed(redis, approver.keys.channel_prefix) as feed:

            async def cycle(i: int) -> tuple[float, float]:
                returned: list[float] = []

                async def agent() -> None:
                    await gate.request("bench", "approve", {"i": i}, timeout=30)
                    returned.append(time.perf_counter())

                task = asyncio.create_task(agent())
                request_id = await feed.next_pending()
                await asyncio.sleep(SETTLE_S)
                started = time.perf_counter()
                result = await approver.approve(request_id, actor="alice")
                replied = time.perf_counter()
                assert result.changed, result
                await task
                return returned[0] - started, returned[0] - replied

            for i in range(WARMUP):
                await cycle(i)
            with Measure(server) as measure:
                for i in range(count):
                    call, reply = await cycle(i)
                    from_call.append(call)
                    from_reply.append(reply)
            for _ in range(count):  # after the measured cycles: they count no PING
                started = time.perf_counter()
                await redis.ping()
                pings.append(time.perf_counter() - started)
    return from_call, from_reply, pings, measure


async def _polling_client(server: Server, count: int) -> tuple[list[float], Measure]:
    from redis.asyncio import Redis

    from sudo_queue import Gate
    from sudo_queue.models import Status
    from sudo_queue.store import Store

    async with (
        Gate.connect(server.url, agent="bench-poll") as gate,
        Redis.from_url(server.url, decode_responses=True) as redis,
    ):
        approver = Store(redis)
        ids = [await gate.submit("bench", "approve", {"poll": i}) for i in range(count)]

        async def all_pending() -> bool:
            return len(await approver.open_ids(Status.PENDING)) >= count

        await wait_until(all_pending, timeout=10)
        resumed: dict[str, float] = {}

        async def poller(request_id: str, offset: float) -> None:
            # Each client polls on its own phase, as independent agents do.
            await asyncio.sleep(offset)
            await poll_for_decision(gate.store, request_id)
            resumed[request_id] = time.perf_counter()

        tasks = [
            asyncio.create_task(poller(rid, CLIENT_POLL_S * (i + 0.5) / count))
            for i, rid in enumerate(ids)
        ]
        await asyncio.sleep(CLIENT_POLL_S)
        approved: dict[str, float] = {}
        with Measure(server) as measure:
            for rid in ids:
                approved[rid] = time.perf_counter()
                await approver.approve(rid, actor="alice")
            async with asyncio.timeout(3 * CLIENT_POLL_S):
                await asyncio.gather(*tasks)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return [resumed[rid] - approved[rid] for rid in ids], measure


def run(count: int = 300, *, baseline_count: int = 10) -> list[Result]:
    """Measure sudo-queue and the polling baseline; print the table; return the results."""
    quiet_logging()
    print(header("resume", "approval committed to the waiting coroutine returning"))
    with redis_server() as server, workers(server, 1):
        from_call, from_reply, pings, m = asyncio.run(_sequential(server, count))
        ours = m.result("sudo-queue", from_call, count, "from the approve call; cmd/op: lifecycle")
        replied = m.result("sudo-queue, from the reply", from_reply, count)
        replied.redis_calls, replied.cpu_s, replied.script_us = None, {}, float("nan")
        samples, m = asyncio.run(_polling_client(server, baseline_count))
        polling = m.result(f"client polling every {CLIENT_POLL_S:g} s", samples, len(samples))
    results = [ours, replied, polling]
    print(table(results))
    print("stock arq worker: not on this path (an approval reaches the agent without a worker)")
    print(ratios(ours, [polling]))
    # The commit ends the approve script and its reply leaves Redis then: the figure from the
    # reply is the one from the commit, less the reply's one-way delivery (under a round trip).
    ping = percentiles(pings)
    print(
        f"the commit lies between the approve call and its reply: from the call "
        f"(the approval's own read and script before its commit included) p50 "
        f"{ours.p['p50']:.2f} ms, p99 {ours.p['p99']:.2f} ms; from the reply p50 "
        f"{replied.p['p50']:.2f} ms, to which the commit adds the reply's delivery, less than a "
        f"PING round trip on the approver's connection (p50 {ping['p50']:.2f} ms, "
        f"p99 {ping['p99']:.2f} ms)"
    )
    print(goal("approval committed to resume p50, from the reply", replied.p["p50"], 1.0, "ms"))
    print(goal("approval committed to resume p99, from the reply", replied.p["p99"], 5.0, "ms"))
    return results
