"""Running an arq worker the way sudo-queue needs: woken by events, JSON jobs, never giving up.

Shared by every worker process (the policy worker, approval-channel notifiers): the CLI composes a
job module's `worker_kwargs` with `run_forever`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
from arq import Worker
from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from redis.exceptions import RedisError

__all__ = [
    "CLAIM_SCRIPT",
    "WakeableWorker",
    "job_log_context",
    "json_dumps",
    "json_loads",
    "run_forever",
]

log = structlog.get_logger(__name__)

# Seconds an in-flight job gets to finish after SIGTERM before arq hands it back to the queue.
STOP_GRACE_S = 5.0


def json_dumps(value: Any) -> bytes:
    """arq job serializer: JSON, never pickle (a pickle in Redis is code execution)."""
    return json.dumps(value, separators=(",", ":")).encode()


def json_loads(raw: bytes | str) -> Any:
    """arq job deserializer: anything that is not JSON is refused and nothing runs."""
    return json.loads(raw)


# Claims due jobs for one worker in one atomic step. arq's own start_jobs takes four round trips
# per listed job (WATCH, EXISTS, ZSCORE, MULTI/EXEC) and lists jobs that other workers are
# running; this does the same check-and-lock (arq's in-progress key, same value and timeout)
# for a batch, server-side. The wake-up tokens are consumed here: a token only means "look at
# the queue now", and this is the look. If the worker had fewer free slots than there are
# claimable jobs, one token goes back so that another worker wakes for the rest. It also returns
# the milliseconds until the next deferred job (an expiry, a retry), so the worker blocks until
# then instead of finding it at its next fallback poll.
#   KEYS: 1 arq queue (sorted set), 2 its wake-up list
#   ARGV: 1 arq in-progress key prefix, 2 in-progress timeout (ms), 3 most jobs to claim,
#         4 most due entries to look at (arq's queue_read_limit)
CLAIM_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[4])
local claimed, left = {}, false
for i = 1, #due, 2 do
  local lock = ARGV[1] .. due[i]
  if #claimed >= 2 * want then
    if redis.call('EXISTS', lock) == 0 then
      left = true
      break
    end
  elseif redis.call('SET', lock, '1', 'NX', 'PX', ARGV[2]) then
    claimed[#claimed + 1] = due[i]
    claimed[#claimed + 1] = due[i + 1]
  end
end
redis.call('DEL', KEYS[2])
if left then redis.call('LPUSH', KEYS[2], '1') end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local wait_ms = -1
if later[2] then wait_ms = tonumber(later[2]) - now end
return {claimed, tostring(wait_ms)}
"""


class WakeableWorker(Worker):
    """An arq Worker that is woken by the enqueue itself instead of polling every `poll_delay`.

    The store pushes a token on `<queue>:wake` in the same atomic step that enqueues a job (and
    so does this worker when arq defers a retry or hands a job back); an idle worker blocks on
    that list (BLPOP) and picks new work within a round trip. One claim script replaces arq's
    per-job locking round trips (`CLAIM_SCRIPT`). An idle worker blocks until the next deferred
    job is due or `poll_delay` passes: the fallback for jobs that come without a token (enqueued
    by other code through arq, or left by a worker that died mid-job once their in-progress key
    expires). A full worker waits for a free slot instead of polling. Running a claimed job is
    arq's own `run_job`/`finish_job`: retries, `max_tries`, timeouts, deferral and at-least-once
    delivery are unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake_key = f"{self.queue_name}:wake"
        self._slot_free = asyncio.Event()
        self._next_due_s: float = self.poll_delay_s
        self._stopped = False

    def handle_sig(self, signum: signal.Signals) -> None:
        # The loop checks this flag too: a cancel can be swallowed on Python 3.11 (when it lands
        # as an awaited future completes), and a worker that ignores SIGTERM is worse than slow.
        self._stopped = True
        super().handle_sig(signum)

    def _health_due_s(self) -> float:
        """Seconds until arq's health key must be rewritten (its TTL is the interval + 1 s)."""
        return self.health_check_interval - (time.time() - self._last_health_check)

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._claim = self.pool.register_script(CLAIM_SCRIPT)
        while not self._stopped:
            await self._poll_iteration()
            # Woken by a token for new work; otherwise blocked until the next deferred job, the
            # next health-key write (so `doctor` never sees a live worker as gone), or the
            # fallback poll, whichever comes first.
            block_s = max(min(self.poll_delay_s, self._next_due_s, self._health_due_s()), 0.001)
            if self.allow_pick_jobs and self.job_counter < self.max_jobs:
                # BLPOP takes fractional seconds since Redis 6 (never 0 here: that blocks forever).
                await self.pool.execute_command(  # type: ignore[no-untyped-call]  # untyped in redis-py
                    "BLPOP", self._wake_key, block_s
                )
            else:
                self._slot_free.clear()
                # Not wait_for: on Python 3.11 it swallows a cancel (arq's stop) that lands as
                # the event is set, which is exactly when a stopping worker's last job ends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(block_s):
                        await self._slot_free.wait()

    async def _poll_iteration(self) -> None:
        """arq's poll iteration with the claim script in place of listing and locking each job.

        The heart beat (health key, cron enqueues) comes first, so that the claim already sees
        a cron job it enqueued and blocks until that one is due.
        """
        await self.heart_beat()
        if self.allow_pick_jobs:
            # A full worker claims nothing, but its look hands due work it cannot take to
            # another worker (a token) and learns when the next deferred job is due.
            await self._claim_jobs(max(self.max_jobs - self.job_counter, 0))
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq does: an error in run_job itself surfaces here

    async def _claim_jobs(self, free: int) -> None:
        claimed, wait_ms = await self._claim(
            keys=[self.queue_name, self._wake_key],
            args=[
                in_progress_key_prefix,
                int(self.in_progress_timeout_s * 1000),
                free,
                self.queue_read_limit,
            ],
        )
        wait_s = int(wait_ms) / 1000
        self._next_due_s = self.poll_delay_s if wait_s < 0 else wait_s
        for raw_id, raw_score in zip(claimed[::2], claimed[1::2], strict=True):
            job_id = raw_id.decode()
            # At most `free` jobs were claimed, so this never waits; arq's bookkeeping follows.
            await self.sem.acquire()
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(raw_score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_free.set()

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        await super().finish_job(
            job_id,
            finish,
            result_data,
            result_timeout_s,
            keep_result_forever,
            incr_score,
            keep_in_progress,
        )
        if not finish:
            # arq put the job back (a Retry, deferred by incr_score, or handed back at
            # shutdown) without any token: wake a worker, which then runs it when it is due.
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.lpush(self._wake_key, "1")
                pipe.ltrim(self._wake_key, 0, 15)
                await pipe.execute()

    async def run_job(self, job_id: str, score: int) -> None:
        # Each job runs in a task of its own: this binding reaches every line logged while the
        # job runs (ours and arq's own, see sudo_queue.logs) and nothing outside it.
        with structlog.contextvars.bound_contextvars(**job_log_context(job_id)):
            await super().run_job(job_id, score)


def job_log_context(job_id: str) -> dict[str, str]:
    """`job_id`, and the `request_id` the job is about (our job ids are derived from it)."""
    context = {"job_id": job_id}
    kind, _, rest = job_id.partition(":")
    if kind in ("sq-eval", "sq-expire") and rest:
        context["request_id"] = rest
    elif kind == "sq-notify" and rest.count(":") >= 2:  # sq-notify:<function>:<id>:<status>
        context["request_id"] = rest.split(":")[1]
    return context


async def run_forever(
    make_kwargs: Callable[[], dict[str, Any]], *, on_hup: Callable[[], object] | None = None
) -> None:
    """Run a WakeableWorker until SIGINT/SIGTERM, recreating it whenever Redis goes away.

    arq's own worker exits when Redis disappears; a supervisor restart loses seconds and log
    context, so the loop reconnects with backoff itself.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: list[WakeableWorker] = []
    background: set[asyncio.Task[None]] = set()

    def on_stop(signum: int) -> None:
        log.info("worker_stopping", signal=signal.Signals(signum).name)
        stopping.set()
        for worker in current:
            # Take no new jobs; the in-flight ones finish (they take milliseconds) or, if they
            # do not within the grace period, arq hands them back to the queue.
            worker.allow_pick_jobs = False
            task = loop.create_task(_stop_after_grace(worker, signum))
            background.add(task)
            task.add_done_callback(background.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)

    delay = 0.5
    try:
        while not stopping.is_set():
            worker = WakeableWorker(**make_kwargs())
            current[:] = [worker]
            try:
                await worker.async_run()
            except asyncio.CancelledError:
                if not stopping.is_set():
                    raise
            except (RedisError, OSError) as exc:
                log.warning(
                    "worker_redis_lost", error=str(exc) or type(exc).__name__, retry_in_s=delay
                )
            else:
                delay = 0.5
            finally:
                with contextlib.suppress(Exception):
                    await worker.close()
            if not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 10.0)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("worker_stopped")


async def _stop_after_grace(worker: WakeableWorker, signum: int) -> None:
    tasks = [t for t in worker.tasks.values() if not t.done()]
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    worker.handle_sig(signal.Signals(signum))
    main = worker.main_task
    while main is not None and not main.done():
        # See WakeableWorker.handle_sig: cancel again until the main task has really ended.
        await asyncio.wait({main}, timeout=1.0)
        if not main.done():
            main.cancel()
