"""Processes that die: workers SIGKILLed or SIGTERMed mid-job, agents killed while waiting, soak."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sudo_queue import Gate, Status
from sudo_queue.store import Store

from ..helpers import ROOT, cli_env, run_cli
from .common import SLOW_ARGS, SLOW_POLICY, audit_events, status_of, until, worker_ready, write

pytestmark = pytest.mark.redis_server

TERMINAL = {s.value for s in Status if s.terminal}


async def test_worker_sigkilled_mid_evaluation(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 1: a worker killed while evaluating; arq retries elsewhere; exactly one decision."""
    policy = write(tmp_path / "slow.yaml", SLOW_POLICY)
    first = workers(redis_url, policy, "first")
    await worker_ready(real_redis)
    store = Store(real_redis)
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await gate.submit("slow", "run", SLOW_ARGS)
        await until(lambda: real_redis.exists(f"arq:in-progress:sq-eval:{request_id}"))
        await asyncio.sleep(0.5)  # inside the multi-second evaluation
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        assert await status_of(store, request_id) is Status.QUEUED
        workers(redis_url, policy, "second")
        # arq reruns the job once the dead worker's in-progress key expires (job timeout + 10 s).
        decision = await gate.wait(request_id, timeout=60)
    assert decision.status is Status.ALLOWED
    assert await audit_events(real_redis, request_id) == ["created", "allowed"]


async def test_worker_sigterm_finishes_in_flight_jobs(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 2: SIGTERM lets an in-flight evaluation finish; the worker exits 0; nothing doubled."""
    policy = write(tmp_path / "slow.yaml", SLOW_POLICY)
    worker = workers(redis_url, policy)
    await worker_ready(real_redis)
    async with Gate.connect(redis_url, agent="bot") as gate:
        slow = await gate.submit("slow", "run", SLOW_ARGS)
        await until(lambda: real_redis.exists(f"arq:in-progress:sq-eval:{slow}"))
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        quick = [await gate.submit("quick", "run", {"i": i}) for i in range(20)]
        workers(redis_url, policy, "after")
        decisions = [await gate.wait(i, timeout=20) for i in [slow, *quick]]
    assert {d.status for d in decisions} == {Status.ALLOWED}
    for request_id in [slow, *quick]:
        assert await audit_events(real_redis, request_id) == ["created", "allowed"]


async def test_agent_sigkilled_while_pending_reattaches(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    spawned: list[subprocess.Popen[str]],
) -> None:
    """Row 3: an agent killed while pending, restarted with its key, gets the decision at once."""
    workers(redis_url)

    def agent() -> subprocess.Popen[str]:
        spawned.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "charge.py"), "6000", "--key", "order-9"],
                env=cli_env(redis_url),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=ROOT,
            )
        )
        return spawned[-1]

    first = agent()
    assert first.stdout is not None
    request_id = first.stdout.readline().split()[1].rstrip(":")
    store = Store(real_redis)
    await until(lambda: _is(store, request_id, Status.PENDING))
    first.kill()
    first.wait(5)
    assert run_cli(redis_url, "approve", request_id, "--as", "alice").returncode == 0
    second = agent()
    out, _ = second.communicate(timeout=15)
    assert second.returncode == 0
    assert request_id in out
    assert "approved by alice" in out
    assert await real_redis.keys("sq:req:*") == [f"sq:req:{request_id}"]
    assert (await audit_events(real_redis, request_id)).count("created") == 1


async def _is(store: Store, request_id: str, status: Status) -> bool:
    return await status_of(store, request_id) is status


async def test_soak_with_a_worker_killed_mid_run(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    spawned: list[subprocess.Popen[str]],
) -> None:
    """Row 15: 1,000 agents in 4 processes, 2 workers, one SIGKILLed and restarted: none lost."""
    first = workers(redis_url, name="w1")
    workers(redis_url, name="w2")
    await worker_ready(real_redis)
    agents = [
        subprocess.Popen(  # noqa: ASYNC220  # started once; the loop below polls them
            [
                sys.executable, "-m", "tests.faults.agent", redis_url,
                "--count", "250", "--prefix", f"p{n}", "--timeout", "150",
            ],
            env=cli_env(redis_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for n in range(4)
    ]  # fmt: skip
    spawned.extend(agents)
    store = Store(real_redis)
    approved: set[str] = set()
    killed = False

    async def approve_pending() -> None:
        for request_id in await store.open_ids(Status.PENDING):
            if request_id not in approved:
                await store.approve(request_id, actor="soak-approver")
                approved.add(request_id)

    async with asyncio.timeout(200):
        while any(a.poll() is None for a in agents):
            await approve_pending()
            if not killed and await real_redis.xlen("sq:audit") > 600:
                first.send_signal(signal.SIGKILL)
                first.wait(5)
                workers(redis_url, name="w1-restarted")
                killed = True
            await asyncio.sleep(0.05)
    assert killed

    results = []
    for agent in agents:
        out, err = agent.communicate(timeout=10)
        assert agent.returncode == 0, err[-2000:]
        results += [json.loads(line) for line in out.splitlines() if "key" in line]
    counts = Counter(r["status"] for r in results)
    print(f"soak: {len(results)} requests, outcomes {dict(counts)}")
    assert len(results) == 1000
    per_process = Counter(("allowed", "denied", "approved")[i % 3] for i in range(250))
    assert counts == {status: 4 * n for status, n in per_process.items()}

    terminal_per_request: Counter[str] = Counter()
    created: Counter[str] = Counter()
    for _, fields in await real_redis.xrange("sq:audit"):
        if fields["event"] in TERMINAL:
            terminal_per_request[fields["request_id"]] += 1
        if fields["event"] == "created":
            created[fields["request_id"]] += 1
    assert len(created) == 1000
    assert set(created.values()) == {1}
    assert set(terminal_per_request.values()) == {1}
    assert len(terminal_per_request) == 1000
