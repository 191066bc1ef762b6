"""throughput: decisions per second, 200 concurrent agents, 2 policy worker processes.

The agents are coroutines in this process sharing one Gate (one connection pool, one pub/sub
connection); each asks for an allowed call, waits for the decision, and asks again, for a fixed
time. Baselines, in the same invocation: 2 stock arq workers polling every 0.5 s, and agents that
poll for their decision every 2 s.
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
    table,
    workers,
)

WORKERS = 2


async def _agents(
    server: Server, agents: int, duration_s: float, *, poll: bool = False
) -> tuple[list[float], Measure, int]:
    from sudo_queue import Gate

    samples: list[float] = []
    async with Gate.connect(server.url, agent="bench") as gate:
        for i in range(20):
            await gate.request("bench", "read", {"warmup": i}, timeout=30)
        stop_at = 0.0

        async def agent(n: int) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                if poll:
                    request_id = await gate.submit("bench", "read", {"agent": n, "i": i})
                    await poll_for_decision(gate.store, request_id)
                else:
                    await gate.request("bench", "read", {"agent": n, "i": i}, timeout=30)
                samples.append(time.perf_counter() - started)
                i += 1

        with Measure(server) as measure:
            stop_at = time.perf_counter() + duration_s
            await asyncio.gather(*(agent(n) for n in range(agents)))
    return samples, measure, len(samples)


def run(agents: int = 200, duration_s: float = 5.0, *, baseline_s: float = 5.0) -> list[Result]:
    """Measure sudo-queue and both baselines; print the table; return the results."""
    quiet_logging()
    what = f"decisions per second, {agents} concurrent agents, {WORKERS} worker processes"
    print(header("throughput", what))
    with redis_server() as server:
        with workers(server, WORKERS):
            samples, m, n = asyncio.run(_agents(server, agents, duration_s))
            ours = m.result("sudo-queue", samples, n, "event-driven workers")
            samples, m, n = asyncio.run(_agents(server, agents, baseline_s, poll=True))
            polling = m.result(f"agents polling every {CLIENT_POLL_S:g} s", samples, n)
        with workers(server, WORKERS, stock=True):
            samples, m, n = asyncio.run(_agents(server, agents, baseline_s))
            stock = m.result(f"stock arq workers, poll {STOCK_POLL_S:g} s", samples, n)
    results = [ours, stock, polling]
    print(table(results))
    print(ratios(ours, [stock, polling], higher_is_better=True))
    print(goal("decisions per second", ours.rate, 2000, "/s", at_most=False))
    return results
