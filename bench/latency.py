"""Allowed request round trip: `gate.request` call to return, policy worker in its own process."""

from __future__ import annotations

import asyncio
import time

from .common import percentiles, redis_server, table, workers


async def measure(url: str, count: int) -> list[float]:
    from sudo_queue import Gate
    from sudo_queue.logs import configure_logging

    configure_logging("console", "warning")
    samples: list[float] = []
    async with Gate.connect(url, agent="bench") as gate:
        for i in range(20):  # warm-up: connections, script load
            await gate.request("bench", "read", {"i": i}, timeout=10)
        for i in range(count):
            started = time.perf_counter()
            await gate.request("bench", "read", {"i": i}, timeout=10)
            samples.append(time.perf_counter() - started)
    return samples


def run(count: int = 500) -> dict[str, float]:
    with redis_server() as url, workers(url, 1):
        samples = asyncio.run(measure(url, count))
    result = percentiles(samples)
    print(
        table(
            f"allowed request round trip, {count} sequential requests, 1 worker process",
            [("sudo-queue", result)],
        )
    )
    return result
