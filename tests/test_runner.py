"""The event-driven worker on a private redis-server: woken by the enqueue, each job claimed once.

`poll_delay` is 30 s in these tests, longer than any of their timeouts: whatever runs, runs
because a wake-up token (or a known due time) woke the worker, not because it polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq import Retry, cron
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from arq.worker import func
from redis.exceptions import ResponseError

from sudo_queue import cli
from sudo_queue.workers import runner
from sudo_queue.workers.runner import CLAIM_SCRIPT, WakeableWorker, json_dumps, json_loads

pytestmark = pytest.mark.redis_server

POLL_S = 30


@contextlib.asynccontextmanager
async def running(
    pool: ArqRedis, functions: list[Callable[..., Awaitable[Any]]], name: str = "w", **kwargs: Any
) -> AsyncIterator[WakeableWorker]:
    """A WakeableWorker on the pool's queue, running in this event loop until the block ends."""
    kwargs.setdefault("keep_result", 0)
    worker = WakeableWorker(
        functions=[func(f, name=f.__name__) for f in functions],
        queue_name=pool.default_queue_name,
        redis_settings=RedisSettings(
            host=pool.connection_pool.connection_kwargs["host"],
            port=pool.connection_pool.connection_kwargs["port"],
        ),
        poll_delay=POLL_S,
        handle_signals=False,
        job_serializer=json_dumps,
        job_deserializer=json_loads,
        ctx={"name": name},
        **kwargs,
    )
    task = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        # Jobs that are still finishing (arq's bookkeeping after the job function) end first.
        async with asyncio.timeout(5):
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    """An arq pool on a queue of this test's own (no worker of another test can hold it)."""
    arq_pool = await create_pool(
        RedisSettings.from_dsn(redis_url),
        job_serializer=json_dumps,
        job_deserializer=json_loads,
        default_queue_name=f"t{uuid.uuid4().hex[:8]}:queue",
    )
    yield arq_pool
    await arq_pool.aclose()


def wake_key(pool: ArqRedis) -> str:
    return f"{pool.default_queue_name}:wake"


async def blocked_workers(pool: ArqRedis, count: int) -> None:
    """Wait until `count` workers are blocked on the wake-up list (idle, past their first claim)."""
    async with asyncio.timeout(5):
        while True:
            clients = await pool.client_list()
            blocked = [c for c in clients if c.get("cmd") == "blpop" and "b" in c.get("flags", "")]
            if len(blocked) >= count:
                return
            await asyncio.sleep(0.01)


async def enqueue(pool: ArqRedis, function: str, *args: Any, token: bool = True) -> None:
    """Enqueue as the store does: the arq job, then a wake-up token (unless told otherwise)."""
    await pool.enqueue_job(function, *args)
    if token:
        await pool.lpush(wake_key(pool), "1")


async def test_idle_worker_is_woken_by_the_token(pool: ArqRedis) -> None:
    """A job enqueued while the worker blocks runs at once, long before its next poll."""
    ran = asyncio.Event()

    async def job(ctx: dict[str, Any]) -> None:
        ran.set()

    async with running(pool, [job]):
        await blocked_workers(pool, 1)
        await enqueue(pool, "job")
        async with asyncio.timeout(5):
            await ran.wait()


async def test_deferred_job_runs_when_due(pool: ArqRedis) -> None:
    """A job deferred by 0.3 s runs when due: the token tells the worker how long to block."""
    ran = asyncio.Event()

    async def later(ctx: dict[str, Any]) -> None:
        ran.set()

    async with running(pool, [later]):
        await blocked_workers(pool, 1)
        await pool.enqueue_job("later", _defer_by=0.3)
        await pool.lpush(wake_key(pool), "1")
        async with asyncio.timeout(5):
            await ran.wait()
    assert await pool.zcard(pool.default_queue_name) == 0


async def test_retry_is_deferred_and_runs_again(pool: ArqRedis) -> None:
    """arq's Retry still works: the second try runs after the deferral, with job_try 2."""
    tries: list[int] = []
    done = asyncio.Event()

    async def flaky(ctx: dict[str, Any]) -> str:
        tries.append(ctx["job_try"])
        if ctx["job_try"] == 1:
            raise Retry(defer=0.2)
        done.set()
        return "ok"

    async with running(pool, [flaky]):
        await blocked_workers(pool, 1)
        await enqueue(pool, "flaky")
        async with asyncio.timeout(5):
            await done.wait()
    assert tries == [1, 2]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait until Redis shows what a worker did (in keys: there is no event to wait on)."""
    async with asyncio.timeout(5):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.01)


async def queue_empty(pool: ArqRedis) -> None:
    """Wait until the worker has dealt with every job of the queue (run, failed or dropped)."""
    await until(lambda: _is_zero(pool.zcard(pool.default_queue_name)))


async def _is_zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def job_keys(pool: ArqRedis, job_id: str) -> list[str]:
    """The arq keys a job still has (none once it is finished or failed)."""
    prefixes = (job_key_prefix, retry_key_prefix, in_progress_key_prefix)
    return [p for p in prefixes if await pool.exists(p + job_id)]


async def test_tries_are_counted_until_max_tries(pool: ArqRedis) -> None:
    """Each retry runs with the next job_try; after max_tries the job fails and runs no more."""
    tries: list[int] = []

    async def stubborn(ctx: dict[str, Any]) -> None:
        tries.append(ctx["job_try"])
        raise Retry(defer=0.01)

    async with running(pool, [stubborn], max_tries=3) as worker:
        await blocked_workers(pool, 1)
        job = await pool.enqueue_job("stubborn")
        assert job is not None
        await pool.lpush(wake_key(pool), "1")
        await queue_empty(pool)
    assert tries == [1, 2, 3]
    assert worker.jobs_failed == 1
    assert await job_keys(pool, job.job_id) == []


async def test_enqueued_try_count_reaches_the_job(pool: ArqRedis) -> None:
    """A job re-enqueued with `_job_try=3` (arq's way to carry tries over) runs as try 3."""
    tries: list[int] = []
    ran = asyncio.Event()

    async def again(ctx: dict[str, Any]) -> None:
        tries.append(ctx["job_try"])
        ran.set()

    async with running(pool, [again]):
        await blocked_workers(pool, 1)
        await pool.enqueue_job("again", _job_try=3)
        await pool.lpush(wake_key(pool), "1")
        async with asyncio.timeout(5):
            await ran.wait()
    assert tries == [3]


async def test_job_whose_payload_vanished_fails(pool: ArqRedis) -> None:
    """A queued job whose job key expired never runs: arq fails it and clears its keys."""
    ran = False

    async def gone(ctx: dict[str, Any]) -> None:
        nonlocal ran
        ran = True

    async with running(pool, [gone]) as worker:
        await blocked_workers(pool, 1)
        job = await pool.enqueue_job("gone")
        assert job is not None
        await pool.delete(job_key_prefix + job.job_id)
        await pool.lpush(wake_key(pool), "1")
        await queue_empty(pool)
    assert not ran
    assert worker.jobs_failed == 1
    assert await job_keys(pool, job.job_id) == []


async def test_job_aborted_before_it_starts_never_runs(pool: ArqRedis) -> None:
    """With aborting allowed, a job aborted while queued fails at its claim and never runs."""
    ran = False

    async def doomed(ctx: dict[str, Any]) -> None:
        nonlocal ran
        ran = True

    async with running(pool, [doomed], allow_abort_jobs=True) as worker:
        await blocked_workers(pool, 1)
        job = await pool.enqueue_job("doomed")
        assert job is not None
        await pool.zadd(abort_jobs_ss, {job.job_id: timestamp_ms()})
        await pool.lpush(wake_key(pool), "1")
        await queue_empty(pool)
    assert not ran
    assert worker.jobs_failed == 1
    assert await pool.zscore(abort_jobs_ss, job.job_id) is None
    assert await job_keys(pool, job.job_id) == []


async def test_job_of_a_worker_that_died_runs_again_as_the_next_try(pool: ArqRedis) -> None:
    """A job claimed by a worker that died runs again once its lock expires, as try 2."""
    tries: list[int] = []
    ran = asyncio.Event()

    async def survivor(ctx: dict[str, Any]) -> None:
        tries.append(ctx["job_try"])
        ran.set()

    job = await pool.enqueue_job("survivor")
    assert job is not None
    keys = [pool.default_queue_name, wake_key(pool), abort_jobs_ss]
    args = [in_progress_key_prefix, 50, 1, 100, job_key_prefix, retry_key_prefix, 88400, "0"]

    async def dead_worker_claims() -> bool:
        """The dead worker's claim: it locks the job for 50 ms and counts its try."""
        claimed, _ = await pool.eval(CLAIM_SCRIPT, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        return bool(claimed)  # the job is due from the Redis clock's next millisecond on

    await until(dead_worker_claims)
    await until(lambda: _is_zero(pool.exists(in_progress_key_prefix + job.job_id)))
    async with running(pool, [survivor]):  # its first look finds the job
        async with asyncio.timeout(5):
            await ran.wait()
    assert tries == [2]


async def test_kept_result_can_be_read(pool: ArqRedis) -> None:
    """With keep_result, arq's Job.result() reads what the job returned (finishes are batched)."""

    async def answer(ctx: dict[str, Any], n: int) -> int:
        return n * 2

    async with running(pool, [answer], keep_result=10):
        await blocked_workers(pool, 1)
        jobs = [await pool.enqueue_job("answer", n) for n in range(5)]
        await pool.lpush(wake_key(pool), "1")
        results = [await job.result(timeout=5, poll_delay=0.01) for job in jobs if job]
    assert results == [0, 2, 4, 6, 8]


async def test_cron_job_enqueued_between_wake_ups_runs_when_due(pool: ArqRedis) -> None:
    """A cron job that the heart beat enqueues (arq pushes no token) runs at its second."""
    runs = 0
    second_run = asyncio.Event()

    async def tick(ctx: dict[str, Any]) -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            second_run.set()

    every_second = cron(tick, name="tick", second=set(range(60)), run_at_startup=True)  # type: ignore[arg-type]
    async with running(pool, [], cron_jobs=[every_second]):
        await blocked_workers(pool, 1)  # the start-up run is claimed; the next is a second away
        await pool.lpush(wake_key(pool), "1")  # a wake-up whose heart beat enqueues that one
        async with asyncio.timeout(5):
            await second_run.wait()


async def test_claim_survives_a_script_flush(pool: ArqRedis) -> None:
    """Redis losing its scripts (a restart, SCRIPT FLUSH) while the worker blocks loses no job."""
    ran = asyncio.Event()

    async def job(ctx: dict[str, Any]) -> None:
        ran.set()

    async with running(pool, [job]):
        await blocked_workers(pool, 1)
        await pool.script_flush()
        await enqueue(pool, "job")
        async with asyncio.timeout(5):
            await ran.wait()


async def test_stopping_worker_hands_back_what_its_claim_took(pool: ArqRedis) -> None:
    """A job claimed just as its worker was told to stop never starts there: another runs it."""
    runs: list[tuple[str, int]] = []
    ran = asyncio.Event()

    async def job(ctx: dict[str, Any]) -> None:
        runs.append((ctx["name"], ctx["job_try"]))
        ran.set()

    async with running(pool, [job], "stopping") as stopping:
        await blocked_workers(pool, 1)
        stopping.allow_pick_jobs = False  # what run_forever does on SIGTERM; the claim is sent
        # Due by the Redis clock at once (arq rounds its enqueue time up to the millisecond).
        await pool.enqueue_job("job", _defer_until=datetime.now(UTC) - timedelta(seconds=1))
        await pool.lpush(wake_key(pool), "1")
        async with running(pool, [job], "other"):
            async with asyncio.timeout(5):
                await ran.wait()
    # The stopping worker's claim counted a try, as arq counts one for a job a stop cancels.
    assert runs == [("other", 2)]


async def test_two_workers_run_each_job_once(pool: ArqRedis) -> None:
    """60 jobs, each with its token, across two workers: every job runs exactly once."""
    runs: list[tuple[str, int]] = []
    all_done = asyncio.Event()

    async def record(ctx: dict[str, Any], n: int) -> None:
        runs.append((ctx["name"], n))
        await asyncio.sleep(0.01)
        if len(runs) == 60:
            all_done.set()

    async with running(pool, [record], "a"), running(pool, [record], "b"):
        await blocked_workers(pool, 2)
        for n in range(60):
            await enqueue(pool, "record", n)
        async with asyncio.timeout(10):
            await all_done.wait()
        await asyncio.sleep(0.1)  # a second run of any job would show up now
    assert sorted(n for _, n in runs) == list(range(60))
    assert await pool.zcard(pool.default_queue_name) == 0
    assert await pool.keys("arq:*") == []  # every finish (many sent together) was applied
    assert await pool.llen(wake_key(pool)) <= 16  # tokens are bounded whatever the burst


async def test_full_worker_leaves_the_rest_to_another(pool: ArqRedis) -> None:
    """One token, two jobs: the worker with one slot takes one and wakes the other worker."""
    started: dict[int, str] = {}
    both = asyncio.Event()
    release = asyncio.Event()

    async def hold(ctx: dict[str, Any], n: int) -> None:
        started[n] = ctx["name"]
        if len(started) == 2:
            both.set()
        await release.wait()

    async with running(pool, [hold], "small", max_jobs=1):
        await blocked_workers(pool, 1)
        async with running(pool, [hold], "big"):
            # "small" blocked first, so Redis hands it the one token (BLPOP serves in order).
            await blocked_workers(pool, 2)
            await pool.enqueue_job("hold", 1)
            await pool.enqueue_job("hold", 2)
            await pool.lpush(wake_key(pool), "1")
            async with asyncio.timeout(5):
                await both.wait()
            release.set()
    assert sorted(started.values()) == ["big", "small"]


async def test_stop_as_the_last_job_ends_exits(pool: ArqRedis) -> None:
    """A worker stopped just as its last job ends (arq's handle_sig) exits instead of hanging."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def last(ctx: dict[str, Any]) -> None:
        started.set()
        await release.wait()

    worker = WakeableWorker(
        functions=[func(last, name="last")],
        queue_name=pool.default_queue_name,
        redis_settings=RedisSettings(
            host=pool.connection_pool.connection_kwargs["host"],
            port=pool.connection_pool.connection_kwargs["port"],
        ),
        poll_delay=POLL_S,
        handle_signals=False,
        max_jobs=1,
        job_serializer=json_dumps,
        job_deserializer=json_loads,
    )
    worker.main_task = main = asyncio.create_task(worker.main())
    try:
        await blocked_workers(pool, 1)
        await enqueue(pool, "last")
        async with asyncio.timeout(5):
            await started.wait()
        worker.allow_pick_jobs = False  # stopping: no new work, the running job may finish
        job = next(iter(worker.tasks.values()))
        # The stop lands in the same loop iteration as the slot the job frees.
        job.add_done_callback(lambda _: worker.handle_sig(signal.SIGTERM))
        release.set()
        await asyncio.wait({main}, timeout=5)
        assert main.done(), "the worker kept running after it was told to stop"
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        await worker.close()


def test_worker_process_runs_on_uvloop_if_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sudo-queue worker` runs on uvloop's event loop when installed, else on asyncio's own."""
    pytest.importorskip("uvloop")
    loops: list[str] = []

    async def worker() -> int:
        loops.append(type(asyncio.get_running_loop()).__module__.partition(".")[0])
        return 0

    assert cli._run(worker(), uvloop_if_installed=True) == 0
    monkeypatch.setitem(sys.modules, "uvloop", None)  # an import of it fails: not installed
    assert cli._run(worker(), uvloop_if_installed=True) == 0
    assert loops == ["uvloop", "asyncio"]


async def test_a_batched_finish_that_redis_refuses_raises_and_leaves_the_pool_usable(
    pool: ArqRedis,
) -> None:
    """The finishes' MULTI/EXEC, packed by hand: a command that fails inside EXEC (a wrong
    type) or that Redis refuses to queue (EXECABORT) raises its error, as redis-py's pipeline
    does, and the pool's next commands get their own replies."""
    prefix = pool.default_queue_name
    await pool.set(f"{prefix}:str", "x")
    recorder = runner._Recorder()
    recorder.set(f"{prefix}:ok", "1", px=60_000)
    recorder.zrem(f"{prefix}:str", "job")  # WRONGTYPE at EXEC
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await runner._multi_exec(pool, recorder.commands)
    assert await pool.get(f"{prefix}:ok") == b"1"  # the others of the EXEC still ran

    with pytest.raises(ResponseError, match="wrong number of arguments"):
        await runner._multi_exec(pool, [("SET", f"{prefix}:never", "1"), ("ZREM",)])
    assert await pool.get(f"{prefix}:never") is None  # nothing of an aborted MULTI ran
    for _ in range(3):  # whichever pooled connection comes next, no reply is left over
        assert await pool.echo("next") == b"next"

    recorder = runner._Recorder()
    recorder.delete(f"{prefix}:ok", f"{prefix}:str")
    await runner._multi_exec(pool, recorder.commands)
    assert await pool.exists(f"{prefix}:ok", f"{prefix}:str") == 0


async def test_close_shuts_down_as_arq_does_without_warnings(pool: ArqRedis) -> None:
    """close() runs on_shutdown, drops the health-check key and closes the pool, warning nothing
    (arq's own close calls a method redis-py 5 deprecated)."""
    shut_down: list[str] = []

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        shut_down.append(ctx["name"])

    async def job(ctx: dict[str, Any]) -> None:
        return None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running(pool, [job], name="w-close", on_shutdown=on_shutdown) as worker:
            await blocked_workers(pool, 1)
            health_key = worker.health_check_key
            async with asyncio.timeout(5):
                while True:
                    if await pool.exists(health_key):
                        break
                    await asyncio.sleep(0.01)
    assert shut_down == ["w-close"]
    assert not await pool.exists(health_key)
    assert worker._pool is None
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
