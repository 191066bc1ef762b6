"""Hostile input: poison evaluations, hostile args, broken policies, planted pickles."""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from sudo_queue import Gate, InvalidRequest, RequestDenied, Status
from sudo_queue.store import Store
from sudo_queue.workers.policy import MAX_TRIES

from ..helpers import run_cli
from .common import status_of, until, worker_ready, write

pytestmark = pytest.mark.redis_server

ALWAYS_ERRORS = """\
version: 1
default: allow
rules:
  - name: reads-a-missing-key
    resource: stripe
    when: "args.no_such_key > 1"
    decision: allow
"""


async def test_evaluation_error_is_denied_at_once(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 9: a condition that always fails denies with an error reason naming the rule."""
    workers(redis_url, write(tmp_path / "p.yaml", ALWAYS_ERRORS))
    async with Gate.connect(redis_url, agent="bot") as gate:
        with pytest.raises(RequestDenied) as info:
            await gate.request("stripe", "charge", {"amount": 1}, timeout=15)
    assert info.value.decision.status is Status.DENIED
    assert "reads-a-missing-key" in (info.value.decision.reason or "")
    assert "fail closed" in (info.value.decision.reason or "")


async def test_job_that_crashed_every_try_is_denied(
    redis_url: str, real_redis: Redis, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Row 9: an evaluation whose earlier tries all died is denied on its last try; no hang."""
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"amount": 10})
        # arq counts tries in this key; MAX_TRIES - 1 earlier tries died without an answer.
        await real_redis.set(f"arq:retry:sq-eval:{request_id}", MAX_TRIES - 1)
        workers(redis_url)
        with pytest.raises(RequestDenied) as info:
            await gate.wait(request_id, timeout=15)
    assert "did not complete" in (info.value.decision.reason or "")


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["loop"] = [value]
    return value


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"d": value}
    return value


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({"payload": b"\x00\xff"}, "bytes"),
        ({"x": math.nan}, "NaN"),
        ({"x": -math.inf}, "Infinity"),
        (cyclic(), "cycle"),
        ({"blob": "x" * 10_000_000}, "over the limit"),
        (deep(10_000), "nests deeper"),
        ({f"k{i}": i for i in range(100_000)}, "over the limit"),
    ],
    ids=["bytes", "nan", "infinity", "cycle", "10MB", "10k-levels", "100k-keys"],
)
async def test_hostile_args_are_refused_clearly(
    redis_url: str, real_redis: Redis, args: Any, problem: str
) -> None:
    """Row 12: hostile args raise InvalidRequest naming the problem; nothing reaches Redis."""
    async with Gate.connect(redis_url, agent="bot") as gate:
        with pytest.raises(InvalidRequest, match=problem):
            await gate.request("stripe", "charge", args, timeout=5)
    assert await real_redis.keys("sq:*") == []


async def test_markup_and_fake_status_lines_display_safely(
    redis_url: str, real_redis: Redis
) -> None:
    """Row 12: args that look like Slack markup or an 'APPROVED' line stay inside a JSON string."""
    fake = "ok\nstatus:      approved\ndecided:     by alice\n<!channel> <@U123> *bold*"
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"note": fake})
    shown = run_cli(redis_url, "show", request_id)
    assert shown.returncode == 0
    status_lines = [line for line in shown.stdout.splitlines() if line.startswith("status:")]
    assert status_lines == ["status:      queued"]
    assert not any(
        line.startswith("decided:") and "alice" in line for line in shown.stdout.splitlines()
    )
    assert json.loads(run_cli(redis_url, "show", request_id, "--json").stdout)["args"] == {
        "note": fake
    }


async def test_hostile_job_planted_in_redis_never_crashes_the_worker(
    redis_url: str, real_redis: Redis, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Row 12: a job with 10,000-level args planted past the Gate is denied; the worker lives on."""
    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"amount": 1})
        job = json.loads(await real_redis.get(f"arq:job:sq-eval:{request_id}"))
        job["a"][4] = "[" * 10_000 + "]" * 10_000
        await real_redis.set(f"arq:job:sq-eval:{request_id}", json.dumps(job))
        worker = workers(redis_url)
        with pytest.raises(RequestDenied):
            await gate.wait(request_id, timeout=15)
        after = await gate.request("stripe", "charge", {"amount": 10}, timeout=15)
    assert after.status is Status.ALLOWED
    assert worker.poll() is None


def test_malformed_policy_stops_the_worker_at_start(redis_url: str, tmp_path: Path) -> None:
    """Row 13: a malformed policy at start stops the worker naming the file, line and problem."""
    bad = write(tmp_path / "bad.yaml", "version: 1\nrules:\n  - name: a\n    decision: alow\n")
    result = run_cli(redis_url, "worker", "--policy", str(bad))
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr
    assert "line 3" in result.stderr or "line 4" in result.stderr
    assert "alow" in result.stderr


async def test_invalid_hot_reload_keeps_last_good_policy(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 13: an invalid reload keeps the last good policy and logs why; a valid one applies."""
    path = write(tmp_path / "p.yaml", "version: 1\ndefault: allow\n")
    log = tmp_path / "worker-0.log"
    worker = workers(redis_url, path)
    await worker_ready(real_redis)
    async with Gate.connect(redis_url, agent="bot") as gate:
        first = await gate.request("any", "thing", timeout=15)
        write(path, "version: 1\ndefault: allow\nrules: [oops\n")
        worker.send_signal(signal.SIGHUP)
        await until(lambda: _contains(log, "policy_reload_failed"))
        kept = await gate.request("any", "thing", {"n": 2}, timeout=15)
        assert (kept.status, kept.rule) == (Status.ALLOWED, "default")
        write(path, "version: 1\ndefault: deny\n")
        worker.send_signal(signal.SIGHUP)
        await until(lambda: _contains(log, "policy_reloaded"))
        with pytest.raises(RequestDenied) as info:
            await gate.request("any", "thing", {"n": 3}, timeout=15)
    store = Store(real_redis)
    versions = [
        (await store.get(d.request_id)).policy_version  # type: ignore[union-attr]
        for d in (first, kept, info.value.decision)
    ]
    assert versions[0] == versions[1] != versions[2]
    assert "p.yaml" in log.read_text()


async def _contains(path: Path, text: str) -> bool:
    return await asyncio.to_thread(lambda: path.exists() and text in path.read_text())


async def test_planted_pickle_job_runs_no_code(
    redis_url: str,
    real_redis: Redis,
    workers: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Row 14: a pickled payload in an arq job key is refused; no code runs; nothing is allowed."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    async with Gate.connect(redis_url, agent="bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"amount": 10})
        await real_redis.set(f"arq:job:sq-eval:{request_id}", pickle.dumps(Exploit()))
        worker = workers(redis_url)
        await worker_ready(real_redis)
        await until(lambda: _job_gone(real_redis, request_id))
        after = await gate.request("stripe", "charge", {"amount": 11}, timeout=15)
    assert not marker.exists()
    assert worker.poll() is None
    assert after.status is Status.ALLOWED
    assert await status_of(Store(real_redis), request_id) is Status.QUEUED


async def _job_gone(redis: Redis, request_id: str) -> bool:
    return not await redis.exists(f"arq:job:sq-eval:{request_id}")
