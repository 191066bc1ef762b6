"""latency: an allowed request, `gate.request` call to return, policy worker in its own process.

Requests go one after another (each waits for the previous one), as an agent's tool calls do.
Baselines, in the same invocation: arq's stock worker polling every 0.5 s, and a client that polls
for its decision every 2 s (with sudo-queue's worker deciding).
"""

from __future__ import annotations

import asyncio
import time

from .common import (
    CLIENT_POLL_S,
    STOCK_POLL_S,
    Measure,
    Result,
    Server,
    goal,
    header,
    poll_for_decision,
    quiet_logging,
    ratios,
    redis_server,
    staggered,
    table,
    workers,
)

WARMUP = 30


async def _sequential(server: Server, count: int, warmup: int) -> tuple[list[float], Measure]:
    from sudo_queue import Gate

    samples: list[float] = []
    async with Gate.connect(server.url, agent="bench") as gate:
        for i in range(warmup):  # connections, script cache, the worker's first jobs
            await gate.request("bench", "read", {"i": i}, timeout=10)
        with Measure(server) as measure:
            for i in range(count):
                started = time.perf_counter()
                await gate.request("bench", "read", {"i": i}, timeout=10)
                samples.append(time.perf_counter() - started)
    return samples, measure


async def _polling_client(
    server: Server, count: int, spread_s: float
) -> tuple[list[float], Measure]:
    from sudo_queue import Gate

    async with Gate.connect(server.url, agent="bench-poll") as gate:

        async def one(i: int) -> float:
            started = time.perf_counter()
            request_id = await gate.submit("bench", "read", {"poll": i})
            await poll_for_decision(gate.store, request_id)
            return time.perf_counter() - started

        # Concurrent, so that the baseline costs one poll interval of wall time, not `count`.
        with Measure(server) as measure:
            samples = await staggered(count, spread_s, one)
    return samples, measure


def run(
    count: int = 500, *, baseline_count: int = 8, spread_s: float = CLIENT_POLL_S
) -> list[Result]:
    """Measure sudo-queue and both baselines; print the table; return the results."""
    quiet_logging()
    print(header("latency", "allowed request, gate.request call to return, 1 worker process"))
    with redis_server() as server:
        with workers(server, 1):
            samples, m = asyncio.run(_sequential(server, count, WARMUP))
            ours = m.result("sudo-queue", samples, count, "event-driven worker")
            samples, m = asyncio.run(_polling_client(server, baseline_count, spread_s))
            polling = m.result(f"client polling every {CLIENT_POLL_S:g} s", samples, len(samples))
        with workers(server, 1, stock=True):
            samples, m = asyncio.run(_sequential(server, baseline_count, 1))
            stock = m.result(f"stock arq worker, poll {STOCK_POLL_S:g} s", samples, len(samples))
    results = [ours, stock, polling]
    print(table(results))
    print(ratios(ours, [stock, polling]))
    print(goal("allowed request p50", ours.p["p50"], 1.0, "ms"))
    print(goal("allowed request p99", ours.p["p99"], 5.0, "ms"))
    return results
