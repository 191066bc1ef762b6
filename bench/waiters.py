"""waiters: 10,000 requests waiting in one agent process, then approved in bulk.

Figures: the pub/sub connections and subscriptions the agent holds; Redis commands per second
while they wait (INFO commandstats over a quiet window, once with the idle policy worker running,
the system's total, and once with it stopped, the waiters' own cost); memory per waiter
(tracemalloc, and RSS); and, after a separate process approves them all (`Store.approve`, 8 at a
time), how long after its approval each waiter returned. Baseline: the same number of clients
polling for their decision every 2 s.

The quiet windows are as long as the periodic work they measure, so that a rate is the long-run
one rather than the luck of where a window falls. An idle policy worker looks at its queue every
15 s (the fallback poll), refreshes arq's health key every 30 s, and sweeps on every even minute:
the system's window is 120 s, which holds each of them a whole number of times. Stopped, it
leaves the waiters' own cost, a PING every 15 s on a silent pub/sub connection: 30 s. (A 5 s
window with a sweep in it once read 4 commands/s; the 120 s rate was 0.7.) The baseline's polling
is steady, so its windows are 5 s.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

from .common import (
    CLIENT_POLL_S,
    ROOT,
    Result,
    Server,
    goal,
    header,
    poll_for_decision,
    quiet_logging,
    redis_server,
    rss_bytes,
    stop,
    table,
    wait_until,
    workers,
)

BATCH = 250
# Quiet windows, seconds: the system's with the idle worker, the waiters' own, the baseline's.
IDLE_WINDOW_S = 120.0
OWN_WINDOW_S = 30.0
BASELINE_WINDOW_S = 5.0
AGENT = "bench-waiter"


@dataclass
class Figures:
    """What one variant measured."""

    name: str
    waiters: int
    pubsub_connections: int
    subscriptions: int
    total_cmd_s: float  # quiet window, policy worker idle
    waiters_cmd_s: float  # quiet window, policy worker stopped
    windows_s: tuple[float, float]  # the two windows' lengths
    traced_bytes: int
    rss_bytes: int
    resume_s: list[float]  # per request: resumed minus its approval
    last_resume_after_last_approval_s: float
    approval_s: float  # first to last approval

    def result(self) -> Result:
        return Result(
            name=self.name,
            samples_s=self.resume_s,
            elapsed_s=self.approval_s,
            operations=len(self.resume_s),
        )


async def _count(server: Server, keys: list[str]) -> int:
    from redis.asyncio import Redis

    async with Redis.from_url(server.url) as redis:
        return sum([await redis.zcard(key) for key in keys])


async def _quiet_window(server: Server, seconds: float) -> float:
    before = await asyncio.to_thread(server.calls)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(server.calls)
    # The window's own INFO call is not the system's work.
    return max(after - before - 1, 0) / (time.perf_counter() - started)


async def _approve_all(server: Server) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.approve_all",
        server.url,
        AGENT,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bulk approval failed with exit code {process.returncode}")
    committed = {}
    for line in out.decode().splitlines():
        request_id, at = line.split()
        committed[request_id] = float(at)
    return committed


async def _measure(
    server: Server,
    procs: list[Any],
    count: int,
    windows_s: tuple[float, float],
    *,
    poll: bool,
) -> Figures:
    from sudo_queue import Gate
    from sudo_queue.models import Status

    resumed: dict[str, float] = {}
    async with Gate.connect(server.url, agent=AGENT) as gate:
        await gate.request("bench", "read", timeout=10)  # connections, scripts

        async def waiter(i: int) -> None:
            if poll:
                request_id = await gate.submit("bench", "approve", {"i": i})
                # Independent clients poll on their own phases.
                await asyncio.sleep(CLIENT_POLL_S * (i + 0.5) / count)
                record = await poll_for_decision(gate.store, request_id)
                assert record.status is Status.APPROVED
            else:
                decision = await gate.request("bench", "approve", {"i": i}, timeout=600)
                request_id = decision.request_id
            resumed[request_id] = time.time()

        gc.collect()
        rss_before = rss_bytes()
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
        tasks: list[asyncio.Task[None]] = []

        async def created() -> bool:
            return await _count(server, ["sq:pending", "sq:queued"]) >= len(tasks)

        async def all_pending() -> bool:
            return await _count(server, ["sq:pending"]) >= count

        for start in range(0, count, BATCH):
            tasks += [
                asyncio.create_task(waiter(i)) for i in range(start, min(count, start + BATCH))
            ]
            # Created over time, as real waiters are: the pool stays at about one batch.
            await wait_until(created, timeout=120)
        await wait_until(all_pending, timeout=300, interval=0.05)
        await asyncio.sleep(1.0)  # every waiter has read its pending record and is parked
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        # tracemalloc's own bookkeeping (a trace per block) is in the RSS, not the waiters'.
        rss = rss_bytes() - rss_before - tracemalloc.get_tracemalloc_memory()
        tracemalloc.stop()
        subscribers = server.pubsub_clients()

        total_cmd_s = await _quiet_window(server, windows_s[0])
        await asyncio.to_thread(stop, procs)
        waiters_cmd_s = await _quiet_window(server, windows_s[1])

        committed = await _approve_all(server)
        async with asyncio.timeout(120):
            await asyncio.gather(*tasks)
    unmatched = set(committed) ^ set(resumed)
    if unmatched:
        raise RuntimeError(f"{len(unmatched)} requests were approved but not resumed, or v.v.")
    deltas = [resumed[rid] - committed[rid] for rid in committed]
    return Figures(
        name=f"clients polling every {CLIENT_POLL_S:g} s" if poll else "sudo-queue",
        waiters=count,
        pubsub_connections=len(subscribers),
        subscriptions=sum(int(c.get("sub", 0)) for c in subscribers),
        total_cmd_s=total_cmd_s,
        waiters_cmd_s=waiters_cmd_s,
        windows_s=windows_s,
        traced_bytes=traced,
        rss_bytes=rss,
        resume_s=deltas,
        last_resume_after_last_approval_s=max(resumed.values()) - max(committed.values()),
        approval_s=max(committed.values()) - min(committed.values()),
    )


def _describe(f: Figures) -> str:
    return "\n".join(
        [
            f"{f.name}: {f.waiters:,} waiters",
            f"  pub/sub connections {f.pubsub_connections}, subscriptions {f.subscriptions:,}",
            f"  Redis commands/s while they wait: {f.total_cmd_s:,.2f} in total with the policy "
            f"worker idle ({f.windows_s[0]:g} s window), {f.waiters_cmd_s:,.2f} with it stopped, "
            f"the waiters' own ({f.windows_s[1]:g} s window)",
            f"  memory per waiter: {f.traced_bytes / f.waiters / 1024:.2f} KB traced, "
            f"{f.rss_bytes / f.waiters / 1024:.2f} KB RSS (less tracemalloc's own)",
            f"  bulk approval took {f.approval_s:.2f} s; the last waiter returned "
            f"{f.last_resume_after_last_approval_s * 1000:.1f} ms after the last approval; "
            f"slowest resume after its own approval {max(f.resume_s) * 1000:.1f} ms",
        ]
    )


def run(
    count: int = 10_000, *, window_s: float | None = None, baseline_count: int | None = None
) -> list[Figures]:
    """Measure sudo-queue and the polling baseline; print the figures; return them.

    `window_s`, if given, is every quiet window's length (a smoke test's); by default they are
    as long as the periodic work they measure (see the module's docstring).
    """
    quiet_logging()
    print(header("waiters", f"{count:,} requests waiting in one agent process"))
    ours_windows = (IDLE_WINDOW_S, OWN_WINDOW_S) if window_s is None else (window_s, window_s)
    baseline_windows = (BASELINE_WINDOW_S,) * 2 if window_s is None else (window_s, window_s)
    figures = []
    for poll, n, windows in (
        (False, count, ours_windows),
        (True, baseline_count or count, baseline_windows),
    ):
        with redis_server() as server, workers(server, 1) as procs:
            figures.append(asyncio.run(_measure(server, procs, n, windows, poll=poll)))
    ours, polling = figures
    for f in figures:
        print(_describe(f))
    print(
        "resume after approval (per request: returned minus its approval committed, timed when "
        "the approver's call returned; the waiter's message and the approver's reply leave "
        "Redis together, so a waiter may return first, below 0):"
    )
    print(table([f.result() for f in figures]))
    print("stock arq worker: not on this path (waiting and resuming involve no worker)")
    per_waiter_ours = ours.waiters_cmd_s / ours.waiters
    per_waiter_poll = polling.waiters_cmd_s / polling.waiters
    # Compared where sudo-queue's figure is above 0 (see the note above the table).
    at = next((q for q in ("p50", "p90", "p99", "max") if ours.result().p[q] > 0), "max")
    mine = ours.result().p[at]
    sooner = polling.result().p[at] / mine if mine > 0 else float("nan")
    if per_waiter_ours > 0:
        cheaper = f"{per_waiter_poll / per_waiter_ours:,.0f}x fewer Redis commands/s per waiter"
    else:
        cheaper = (
            f"no Redis command in {ours.windows_s[1]:g} s (polling: {polling.waiters_cmd_s:,.0f}/s)"
        )
    print(f"ratios: sudo-queue waiters cost {cheaper} and resume {sooner:,.0f}x sooner at {at}")
    one = ours.pubsub_connections == 1
    print(
        f"goal  pub/sub connections of the agent: {ours.pubsub_connections} "
        f"({ours.subscriptions} subscription(s)) (== 1): " + ("met" if one else "MISSED")
    )
    print(goal("commands/s while waiting, in total", ours.total_cmd_s, 1, "/s"))
    print(goal("commands/s while waiting, the waiters'", ours.waiters_cmd_s, 1, "/s"))
    print(goal("memory per waiter (traced)", ours.traced_bytes / ours.waiters / 1024, 10, "KB"))
    print(goal("memory per waiter (RSS)", ours.rss_bytes / ours.waiters / 1024, 10, "KB"))
    print(goal("slowest resume after approval", max(ours.resume_s) * 1000, 1000, "ms"))
    return figures
