"""End to end on a private redis-server with real processes: worker, agent, CLI."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sudo_queue import Gate, GateUnavailable, RequestDenied, Status, WaitTimeout
from sudo_queue.store import Outcome, Store

from .helpers import (
    ROOT,
    cli_env,
    decide_as_policy,
    free_port,
    run_cli,
    start_worker,
    stop_process,
)

pytestmark = pytest.mark.redis_server


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`sudo-queue worker` with config/policy.yaml, in its own process."""
    process = start_worker(redis_url, log_path=tmp_path / "worker.log")
    yield process
    assert stop_process(process) == 0, (tmp_path / "worker.log").read_text()[-3000:]


@pytest_asyncio.fixture
async def gate(redis_url: str) -> AsyncIterator[Gate]:
    async with Gate.connect(redis_url, agent="billing-bot") as g:
        yield g


_AGENTS: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap_agents() -> Iterator[None]:
    """Agent processes a failing test left behind are killed, never leaked."""
    yield
    while _AGENTS:
        agent = _AGENTS.pop()
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)


def start_agent(redis_url: str, *args: str) -> subprocess.Popen[str]:
    agent = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "charge.py"), *args],
        env=cli_env(redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    _AGENTS.append(agent)
    return agent


def read_request_id(agent: subprocess.Popen[str]) -> str:
    assert agent.stdout is not None
    line = agent.stdout.readline()
    match = re.match(r"request ([0-9a-f]{32}): waiting", line)
    assert match, f"unexpected agent output: {line!r}"
    return match.group(1)


async def wait_status(redis_url: str, request_id: str, status: Status, limit: float = 10) -> None:
    async with Redis.from_url(redis_url, decode_responses=True) as redis:
        store = Store(redis)
        async with asyncio.timeout(limit):
            while True:
                record = await store.get(request_id)
                if record is not None and record.status is status:
                    return
                await asyncio.sleep(0.02)


@pytest.mark.usefixtures("worker")
async def test_agent_blocks_until_cli_approval(redis_url: str) -> None:
    """The agent process blocks on a 5000 charge until `sudo-queue approve --as alice`."""
    agent = start_agent(redis_url, "5000")
    request_id = read_request_id(agent)
    await wait_status(redis_url, request_id, Status.PENDING)
    await asyncio.sleep(0.3)
    assert agent.poll() is None, "the agent must still be waiting"

    listing = run_cli(redis_url, "pending", "--json")
    assert listing.returncode == 0
    assert [r["id"] for r in json.loads(listing.stdout)] == [request_id]

    approved = run_cli(redis_url, "approve", request_id, "--as", "alice")
    assert approved.returncode == 0, approved.stderr
    out, _ = agent.communicate(timeout=10)
    assert agent.returncode == 0
    assert "charged 5000: approved by alice (rule big-charges)" in out
    assert f"[request {request_id}]" in out

    again = run_cli(redis_url, "approve", request_id, "--as", "bob")
    assert again.returncode == 1
    assert "it is approved" in again.stderr
    shown = json.loads(run_cli(redis_url, "show", request_id, "--json").stdout)
    assert (shown["status"], shown["decided_by"]) == ("approved", "alice")


@pytest.mark.usefixtures("worker")
async def test_allow_and_deny_through_the_worker(gate: Gate) -> None:
    """The worker process allows a small charge and denies a table drop, naming the rules."""
    allowed = await gate.request("stripe", "charge", {"amount": 20}, timeout=10)
    assert (allowed.status, allowed.rule) == (Status.ALLOWED, "small-charges")
    with pytest.raises(RequestDenied) as info:
        await gate.request("postgres", "drop_table", {"table": "users"}, timeout=10)
    assert info.value.decision.rule == "never-drop"


@pytest.mark.usefixtures("worker")
async def test_cli_reject_reason_reaches_agent(redis_url: str) -> None:
    """`sudo-queue reject --reason` makes the agent print the reason and exit non-zero."""
    agent = start_agent(redis_url, "9000")
    request_id = read_request_id(agent)
    await wait_status(redis_url, request_id, Status.PENDING)
    result = run_cli(redis_url, "reject", request_id, "--as", "bob", "--reason", "card flagged")
    assert result.returncode == 0, result.stderr
    out, _ = agent.communicate(timeout=10)
    assert agent.returncode == 1
    assert "rejected by bob" in out
    assert "card flagged" in out


@pytest.mark.usefixtures("worker")
async def test_agent_killed_while_pending_reattaches(redis_url: str, real_redis: Redis) -> None:
    """An agent SIGKILLed while pending and restarted with its key gets the decision made since."""
    agent = start_agent(redis_url, "7000", "--key", "order-123")
    request_id = read_request_id(agent)
    await wait_status(redis_url, request_id, Status.PENDING)
    agent.kill()
    agent.wait(5)

    assert run_cli(redis_url, "approve", request_id, "--as", "alice").returncode == 0

    started = time.monotonic()
    again = start_agent(redis_url, "7000", "--key", "order-123")
    assert read_request_id(again) == request_id
    out, _ = again.communicate(timeout=10)
    assert again.returncode == 0
    assert "approved by alice" in out
    assert time.monotonic() - started < 5
    assert await real_redis.keys("sq:req:*") == [f"sq:req:{request_id}"]


@pytest.mark.usefixtures("worker")
async def test_wait_timeout_then_reattach(gate: Gate, redis_url: str) -> None:
    """WaitTimeout keeps the request pending; gate.wait later returns the approval."""
    with pytest.raises(WaitTimeout) as info:
        await gate.request("stripe", "charge", {"amount": 8000}, timeout=1)
    request_id = info.value.request_id
    record = await gate.get(request_id)
    assert record.status is Status.PENDING
    assert run_cli(redis_url, "approve", request_id, "--as", "carol").returncode == 0
    decision = await gate.wait(request_id, timeout=5)
    assert decision.decided_by == "carol"


async def test_redis_down_is_gate_unavailable() -> None:
    """With no Redis at the URL, entering the gate raises GateUnavailable: nothing runs."""
    gate = Gate.connect(f"redis://127.0.0.1:{free_port()}/0", agent="bot")
    with pytest.raises(GateUnavailable, match="cannot reach Redis"):
        await gate.__aenter__()
    with pytest.raises(GateUnavailable, match="nothing was allowed"):
        await Gate.connect(f"redis://127.0.0.1:{free_port()}/0", agent="bot").submit("s", "a")


async def test_redis_stopping_mid_session_fails_closed(redis_server: object) -> None:
    """A request made after Redis went away raises GateUnavailable, never a grant."""
    from .helpers import RedisServer

    server = RedisServer(port=free_port(), directory=Path(__import__("tempfile").mkdtemp()))
    server.start()
    try:
        async with Gate.connect(server.url, agent="bot") as gate:
            server.stop()
            with pytest.raises(GateUnavailable, match="nothing was allowed"):
                await gate.request("stripe", "charge", {"amount": 1}, timeout=5)
    finally:
        server.stop()


@pytest.mark.usefixtures("worker")
async def test_one_pubsub_connection_for_many_waiters(gate: Gate, real_redis: Redis) -> None:
    """100 coroutines waiting in one Gate use a single pub/sub connection and all resume."""
    ids = [await gate.submit("stripe", "charge", {"amount": 1000 + i}) for i in range(100)]
    waiters = [asyncio.create_task(gate.wait(i, timeout=20)) for i in ids]
    store = Store(real_redis)
    async with asyncio.timeout(15):
        while len(await store.open_ids()) < 100:  # noqa: ASYNC110  # polling Redis, not an event
            await asyncio.sleep(0.05)
    clients = await real_redis.client_list(_type="pubsub")
    assert len(clients) == 1
    assert int(clients[0]["sub"]) == 100
    for request_id in ids:
        await store.approve(request_id, actor="U1")
    decisions = await asyncio.gather(*waiters)
    assert all(d.status is Status.APPROVED for d in decisions)


async def test_expiry_survives_worker_restart(redis_url: str, tmp_path: Path) -> None:
    """A pending request expires at its deadline even if the worker was down in between."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: quick\n    decision: require_approval\n    expires_in: 2s\n"
    )
    worker = start_worker(redis_url, policy, tmp_path / "w1.log")
    try:
        async with Gate.connect(redis_url, agent="bot") as gate:
            request_id = await gate.submit("stripe", "charge", {"amount": 1})
            await wait_status(redis_url, request_id, Status.PENDING)
    finally:
        stop_process(worker)
    await asyncio.sleep(2.5)
    worker = start_worker(redis_url, policy, tmp_path / "w2.log")
    try:
        await wait_status(redis_url, request_id, Status.EXPIRED, limit=15)
    finally:
        assert stop_process(worker) == 0


async def test_concurrent_approve_reject_on_real_redis(real_redis: Redis) -> None:
    """100 concurrent approve/reject calls from separate connections: exactly one winner."""
    store = Store(real_redis)
    async with Gate(real_redis, agent="bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"amount": 5000})
    await decide_as_policy(store, request_id, Status.PENDING)
    results = await asyncio.gather(
        *(
            store.approve(request_id, actor=f"U{i}")
            if i % 2
            else store.reject(request_id, actor=f"U{i}")
            for i in range(100)
        )
    )
    assert sum(r.outcome is Outcome.APPLIED for r in results) == 1


def test_cli_exit_codes(redis_url: str) -> None:
    """Unknown ids are input errors (2); usage errors are 2; Redis down is 3."""
    missing = run_cli(redis_url, "approve", "f" * 32, "--as", "alice")
    assert missing.returncode == 2
    assert "no request" in missing.stderr
    assert run_cli(redis_url, "approve", "x").returncode == 2
    down = run_cli(f"redis://127.0.0.1:{free_port()}/0", "pending")
    assert down.returncode == 3
    assert "Redis" in down.stderr


def test_policy_check_cli(tmp_path: Path, redis_url: str) -> None:
    """`policy check` prints the rules of a good file and names the problem in a bad one."""
    good = run_cli(redis_url, "policy", "check", str(ROOT / "config" / "policy.yaml"))
    assert good.returncode == 0, good.stderr
    assert "big-charges" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    decision: maybe\n")
    result = run_cli(redis_url, "policy", "check", str(bad))
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr
    assert "line" in result.stderr


def test_worker_refuses_a_malformed_policy(redis_url: str, tmp_path: Path) -> None:
    """A worker started with a broken policy exits 2 naming the file and the problem."""
    bad = tmp_path / "broken.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    decision: allow\n    when: 'args.a >'\n")
    result = run_cli(redis_url, "worker", "--policy", str(bad))
    assert result.returncode == 2
    assert "broken.yaml" in result.stderr


def test_worker_stops_cleanly_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM stops the worker with exit code 0."""
    worker = start_worker(redis_url, log_path=tmp_path / "w.log")
    time.sleep(1.5)
    assert stop_process(worker, signal.SIGTERM) == 0


@pytest.mark.usefixtures("worker")
async def test_staggered_concurrent_requests_all_resume(gate: Gate) -> None:
    """200 concurrent requests arriving while the pub/sub connection opens all get their answer."""
    decisions = await asyncio.gather(
        *(gate.request("stripe", "charge", {"amount": 1 + i % 40}, timeout=20) for i in range(200))
    )
    assert [d.status for d in decisions] == [Status.ALLOWED] * 200
