"""Running an arq worker the way sudo-queue needs: woken by events, JSON jobs, never giving up.

Shared by every worker process (the policy worker, approval-channel notifiers): the CLI composes a
job module's `worker_kwargs` with `run_forever`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable
from typing import Any

import structlog
from arq import Worker
from arq.connections import create_pool
from redis.exceptions import RedisError

__all__ = ["WakeableWorker", "json_dumps", "json_loads", "run_forever"]

log = structlog.get_logger(__name__)

# Seconds an in-flight job gets to finish after SIGTERM before arq hands it back to the queue.
STOP_GRACE_S = 5.0


def json_dumps(value: Any) -> bytes:
    """arq job serializer: JSON, never pickle (a pickle in Redis is code execution)."""
    return json.dumps(value, separators=(",", ":")).encode()


def json_loads(raw: bytes | str) -> Any:
    """arq job deserializer: anything that is not JSON is refused and nothing runs."""
    return json.loads(raw)


class WakeableWorker(Worker):
    """An arq Worker that blocks on its queue's wake-up list instead of sleeping `poll_delay`.

    The store pushes a token on `<queue>:wake` in the same atomic step that enqueues a job, so an
    idle worker picks new work within a round trip. `poll_delay` remains the longest a worker
    blocks, which bounds how late deferred jobs (expiry, retries) and cron run; retries,
    deferral and at-least-once delivery stay arq's own.
    """

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
        wake_key = f"{self.queue_name}:wake"
        while True:
            await self._poll_iteration()
            if self.allow_pick_jobs and self.job_counter < self.max_jobs:
                # BLPOP takes fractional seconds since Redis 6; redis-py's stub says int.
                await self.pool.execute_command(  # type: ignore[no-untyped-call]  # untyped in redis-py
                    "BLPOP", wake_key, self.poll_delay_s
                )
            else:
                await asyncio.sleep(self.poll_delay_s)


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
