"""Running an arq worker the way sudo-queue needs: woken by events, JSON jobs, never giving up.

Shared by every worker process (the policy worker, approval-channel notifiers): the CLI composes a
job module's `worker_kwargs` with `run_forever`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import signal
import time
from collections.abc import Callable
from typing import Any, Self, cast

import structlog
from arq import Worker
from arq.connections import ArqRedis, create_pool
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import CoreCommands
from redis.exceptions import NoScriptError, RedisError, ResponseError

from sudo_queue.store import packed, read_replies

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
# Event-loop turns a claimed job needs to reach its first wait on Redis: arq's run_job and the
# task its timeout makes, then the job function up to its decide's write.
HEAD_START_TURNS = 3
# The TTL arq's run_job gives a job's retry key (a literal there, not in arq.constants).
RETRY_KEY_TTL_S = 88400


def json_dumps(value: Any) -> bytes:
    """arq job serializer: JSON, never pickle (a pickle in Redis is code execution)."""
    return json.dumps(value, separators=(",", ":")).encode()


def json_loads(raw: bytes | str) -> Any:
    """arq job deserializer: anything that is not JSON is refused and nothing runs."""
    return json.loads(raw)


# Claims due jobs for one worker in one atomic step. arq's own start_jobs takes four round trips
# per listed job (WATCH, EXISTS, ZSCORE, MULTI/EXEC) and lists jobs that other workers are
# running; this does the same check-and-lock (arq's in-progress key, same value and timeout)
# for a batch, server-side. It also does, for each job it locks, what arq's run_job would do in
# its own first round trip: read the job, count the try (INCR, and the retry key's TTL) and take
# the job out of the abort set (only when the worker may abort jobs); run_job then uses these
# replies (see `_ClaimedRead`). The wake-up tokens are consumed here: a token only means "look
# at the queue now", and this is the look. If the worker had fewer free slots than there are
# claimable jobs, one token goes back so that another worker wakes for the rest. It also returns
# the milliseconds until the next deferred job (an expiry, a retry), so the worker blocks until
# then instead of finding it at its next fallback poll.
#   KEYS: 1 arq queue (sorted set), 2 its wake-up list, 3 arq's abort set
#   ARGV: 1 arq in-progress key prefix, 2 in-progress timeout (ms), 3 most jobs to claim,
#         4 most due entries to look at (arq's queue_read_limit), 5 arq job key prefix,
#         6 arq retry key prefix, 7 retry key TTL (s), 8 "1" if the worker may abort jobs
#   returns: {claimed, wait}: claimed is, per job, id, score, payload (nil if gone), try and 1 if
#            it was aborted; wait is the milliseconds until the next deferred job, or -1
CLAIM_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[4])
local claimed, n, left = {}, 0, false
for i = 1, #due, 2 do
  local id = due[i]
  local lock = ARGV[1] .. id
  if n >= want then
    if redis.call('EXISTS', lock) == 0 then
      left = true
      break
    end
  elseif redis.call('SET', lock, '1', 'NX', 'PX', ARGV[2]) then
    n = n + 1
    local retry = ARGV[6] .. id
    local tries = redis.call('INCR', retry)
    redis.call('EXPIRE', retry, ARGV[7])
    local aborted = 0
    if ARGV[8] == '1' then aborted = redis.call('ZREM', KEYS[3], id) end
    -- A job whose key is gone (it expired) reads as false: a nil in the reply.
    local base = 5 * (n - 1)
    claimed[base + 1] = id
    claimed[base + 2] = due[i + 1]
    claimed[base + 3] = redis.call('GET', ARGV[5] .. id)
    claimed[base + 4] = tries
    claimed[base + 5] = aborted
  end
end
redis.call('DEL', KEYS[2])
if left then redis.call('LPUSH', KEYS[2], '1') end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local wait_ms = -1
if later[2] then wait_ms = tonumber(later[2]) - now end
return {claimed, tostring(wait_ms)}
"""


class _PipelineStandIn:
    """Stands in for the pool where arq opens a pipeline: `pool.pipeline()` and the pipeline are
    this object, used as an async context manager."""

    def pipeline(self, transaction: bool = True) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class _ClaimedRead(_PipelineStandIn):
    """run_job's opening pipeline, answered with what the claim script already did and read.

    arq's run_job (the same in 0.26 to 0.28) opens with one MULTI round trip: GET the job, INCR
    and EXPIRE its retry key, and ZREM it from the abort set if the worker may abort jobs. The
    claim script does exactly that as it locks the job, so a claimed job's run_job gets this
    stand-in for that one pipeline (see `WakeableWorker.pool`). That is less fragile than a copy
    of arq's 200-line run_job: all that follows the read (an expired job, `enqueue_job_try`,
    `max_tries`, aborts, retries, finish_job) stays arq's own code. The stand-in checks that
    run_job asks for exactly what the claim did; an arq that reads otherwise fails loudly (the
    job's task raises and the worker stops, the job's lock left to expire so that it runs
    again) instead of running jobs with a wrong try count.
    """

    def __init__(
        self, job_id: str, payload: bytes | None, job_try: int, aborted: int, *, abortable: bool
    ) -> None:
        retry_key = retry_key_prefix + job_id
        self._expected: list[tuple[Any, ...]] = [
            ("get", job_key_prefix + job_id),
            ("incr", retry_key, 1),
            ("expire", retry_key, RETRY_KEY_TTL_S),
        ]
        self._replies: list[Any] = [payload, job_try, True]
        if abortable:
            self._expected.append(("zrem", abort_jobs_ss, job_id))
            self._replies.append(aborted)
        self._queued: list[tuple[Any, ...]] = []

    def get(self, name: str) -> None:
        self._queued.append(("get", name))

    def incr(self, name: str, amount: int = 1) -> None:
        self._queued.append(("incr", name, amount))

    def expire(self, name: str, time: int) -> None:
        self._queued.append(("expire", name, time))

    def zrem(self, name: str, *values: str) -> None:
        self._queued.append(("zrem", name, *values))

    async def execute(self) -> list[Any]:
        if self._queued != self._expected:
            raise RuntimeError(
                f"arq's run_job read {self._queued!r} where the claim script did"
                f" {self._expected!r}: this arq release is not supported (see pyproject.toml)"
            )
        return self._replies


class _BatchedFinish(_PipelineStandIn):
    """finish_job's pipeline, sent together with the finishes of other jobs in one round trip.

    arq's finish_job sends the commands that finish a job (DEL, ZREM, ZINCRBY, PEXPIRE, SET) in
    a MULTI of its own; a busy worker finishes many jobs at a time, and a round trip for each
    is a large share of its CPU. finish_job gets this stand-in for that pipeline (see
    `WakeableWorker.pool`): it records whatever finish_job queues, by name, and its execute()
    returns once the worker has sent those commands, with every other finish waiting by then,
    in one MULTI/EXEC (`WakeableWorker._send_finishes`). Each finish stays atomic and is done
    when arq goes on, as with arq's own pipeline, and arq's code still decides what it is.
    """

    def __init__(self, worker: WakeableWorker) -> None:
        self.commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._worker = worker

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):  # not a Redis command: nothing to record
            raise AttributeError(name)

        def queue(*args: Any, **kwargs: Any) -> None:
            self.commands.append((name, args, kwargs))

        return queue

    async def execute(self) -> None:
        await self._worker._finish_soon(self.commands)


class _Recorder(CoreCommands):
    """redis-py's command methods (set, zrem, delete ...), recording the commands they build
    instead of sending them: arq names its finish by those methods."""

    connection_pool: Any = None  # (never used: nothing is sent from here)

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> None:
        self.commands.append(args)


async def _multi_exec(redis: ArqRedis, commands: list[tuple[Any, ...]]) -> None:
    """`commands` in one MULTI/EXEC on a pooled connection, packed by hiredis; raises the first
    error, as redis-py's transaction pipeline does, after reading every reply."""
    pool = redis.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(
            packed("MULTI") + b"".join(packed(*c) for c in commands) + packed("EXEC"),
            check_health=False,
        )
        # OK, a QUEUED (or a refusal) per command, then EXEC's array (or EXECABORT).
        replies = await read_replies(conn, len(commands) + 2)
        exec_reply = replies[-1] if isinstance(replies[-1], list) else []
        for reply in [*replies, *exec_reply]:
            if isinstance(reply, ResponseError):
                raise reply
    finally:
        await pool.release(conn)


# What answers the next use of the worker's pool in this task, if not the pool itself: the
# claim's replies for run_job's opening read, or a batched finish (see WakeableWorker.pool).
_stand_in: contextvars.ContextVar[_ClaimedRead | _BatchedFinish | None] = contextvars.ContextVar(
    "sudo_queue_pool_stand_in", default=None
)


class WakeableWorker(Worker):
    """An arq Worker that is woken by the enqueue itself instead of polling every `poll_delay`.

    The store pushes a token on `<queue>:wake` in the same atomic step that enqueues a job (and
    so does this worker when arq defers a retry or hands a job back); an idle worker blocks on
    that list (BLPOP) with its claim queued right behind, so Redis claims the new work as the
    token arrives (`_block_then_claim`). One claim script replaces arq's per-job locking round
    trips and the read that opens arq's run_job (`CLAIM_SCRIPT`). An idle worker blocks until
    the next deferred job is due or `poll_delay` passes: the fallback for jobs that come without
    a token (enqueued by other code through arq, or left by a worker that died mid-job once
    their in-progress key expires). A full worker waits for a free slot instead of polling.
    Running a claimed job is arq's own `run_job`/`finish_job`, with their round trips answered
    by the claim (`_ClaimedRead`) or shared with other jobs (`_BatchedFinish`): retries,
    `max_tries`, timeouts, deferral and at-least-once delivery are unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake_key = f"{self.queue_name}:wake"
        self._slot_free = asyncio.Event()
        # When the next deferred job is due (time.monotonic()), as the last claim saw it.
        self._next_due_at = time.monotonic() + self.poll_delay_s
        self._blocking: AbstractConnection | None = None
        # Finishes waiting to be sent (see _BatchedFinish), and whether a MULTI is on its way.
        self._finishes: list[tuple[list[Any], asyncio.Future[None]]] = []
        self._sending = False
        self._finisher: asyncio.Task[None] | None = None
        self._stopped = False

    def handle_sig(self, signum: signal.Signals) -> None:
        # The loop checks this flag too: a cancel can be swallowed on Python 3.11 (when it lands
        # as an awaited future completes), and a worker that ignores SIGTERM is worse than slow.
        self._stopped = True
        super().handle_sig(signum)

    @property
    def pool(self) -> ArqRedis:
        # A stand-in answers the one use of the pool that follows where it is set: run_job's
        # opening read in a job's task started by a claim (_ClaimedRead), the pipeline of
        # finish_job (_BatchedFinish). The variable is emptied as it is taken, so every other
        # use, in that task (the job function's own task copies its context after this) or any
        # other, gets the real pool.
        stand_in = _stand_in.get()
        if stand_in is not None:
            _stand_in.set(None)
            return cast("ArqRedis", stand_in)
        return cast("ArqRedis", self._pool)

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
        # The first look is a claim of its own: it finds the work enqueued while no worker ran,
        # and loads the script that every later look sends right behind its BLPOP.
        await self._housekeeping(claim=True)
        while not self._stopped:
            # Woken by a token for new work; otherwise blocked until the next deferred job, the
            # next health-key write (so `doctor` never sees a live worker as gone), or the
            # fallback poll, whichever comes first.
            block_s = max(
                min(
                    self.poll_delay_s,
                    self._next_due_at - time.monotonic(),
                    self._health_due_s(),
                ),
                0.001,
            )
            claim = False
            if self.allow_pick_jobs and self.job_counter < self.max_jobs:
                if await self._block_then_claim(block_s):
                    # A head start for the jobs just claimed: they run up to their first wait
                    # on Redis (an evaluation: its decide, which an agent waits for) before
                    # this loop's housekeeping and next BLPOP, which nobody waits for.
                    for _ in range(HEAD_START_TURNS):
                        await asyncio.sleep(0)
            else:
                # A full worker takes no token: another worker gets it, or this one once a slot
                # is free (the token is still there then, and its BLPOP returns at once).
                self._slot_free.clear()
                # Not wait_for: on Python 3.11 it swallows a cancel (arq's stop) that lands as
                # the event is set, which is exactly when a stopping worker's last job ends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(block_s):
                        await self._slot_free.wait()
                # A deferred job came due meanwhile, and no token says so: a look (claiming
                # nothing if there is still no free slot) hands it to another worker.
                claim = time.monotonic() >= self._next_due_at
            await self._housekeeping(claim=claim)

    async def _housekeeping(self, *, claim: bool) -> None:
        """The rest of arq's poll iteration: heart beat, aborted jobs, finished tasks.

        The claim itself travels with the BLPOP (`_block_then_claim`); this one claims only if
        told to (at the start; a full worker when a deferred job came due), or if the heart beat
        enqueued a cron job (arq does that without a token), so that the worker learns when
        that job is due and wakes for it.
        """
        cron_runs = [job.next_run for job in self.cron_jobs]
        await self.heart_beat()
        if claim or cron_runs != [job.next_run for job in self.cron_jobs]:
            await self._claim_jobs()
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq does: an error in run_job itself surfaces here

    def _claim_keys(self) -> list[str]:
        return [self.queue_name, self._wake_key, abort_jobs_ss]

    def _claim_args(self) -> list[Any]:
        """CLAIM_SCRIPT's arguments: as many jobs as there are free slots (none if stopping)."""
        free = max(self.max_jobs - self.job_counter, 0) if self.allow_pick_jobs else 0
        return [
            in_progress_key_prefix,
            int(self.in_progress_timeout_s * 1000),
            free,
            self.queue_read_limit,
            job_key_prefix,
            retry_key_prefix,
            RETRY_KEY_TTL_S,
            "1" if self.allow_abort_jobs else "0",
        ]

    async def _block_then_claim(self, block_s: float) -> int:
        """BLPOP on the wake-up list, then claim: both in one round trip.

        Both commands go out together on a connection of the worker's own (not the pool's: it
        is blocked most of the time). Redis runs the claim as soon as the BLPOP returns (with a
        token, or with nil when the block times out), without waiting for this process to see
        the token and ask, which saves a round trip on every job's way. The free slots it claims
        for are counted when it is sent: slots only free up while the worker blocks, so that is
        never too many.
        """
        if self._blocking is None:
            self._blocking = self.pool.connection_pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        conn = self._blocking
        # BLPOP takes fractional seconds since Redis 6 (never 0 here: that blocks forever).
        blpop = ("BLPOP", self._wake_key, block_s)
        keys = self._claim_keys()
        claim = ("EVALSHA", self._claim.sha, len(keys), *keys, *self._claim_args())
        await conn.send_packed_command(packed(*blpop) + packed(*claim))
        # A failure or a cancel while reading closes the connection (redis-py does that): no
        # late reply reaches a later command, and Redis drops a claim still queued behind the
        # BLPOP (the worker is stopping: its claim must not lock jobs that nobody runs).
        await conn.read_response()
        try:
            reply = await conn.read_response()
        except NoScriptError:
            # Redis lost its scripts (a restart, SCRIPT FLUSH): a claim of its own loads it.
            await self._claim_jobs()
            return 0
        return await self._start_claimed(reply)

    async def _claim_jobs(self) -> None:
        """A claim on its own: at the start, after a cron enqueue, after a script flush."""
        await self._start_claimed(
            await self._claim(keys=self._claim_keys(), args=self._claim_args())
        )

    async def _start_claimed(self, reply: list[Any]) -> int:
        """Start a task for each job of a claim's reply, and note when the next job is due;
        the number of tasks started."""
        started = 0
        claimed, wait_ms = reply
        wait_s = int(wait_ms) / 1000
        self._next_due_at = time.monotonic() + (self.poll_delay_s if wait_s < 0 else wait_s)
        for i in range(0, len(claimed), 5):
            raw_id, raw_score, payload, job_try, aborted = claimed[i : i + 5]
            job_id = raw_id.decode()
            if not self.allow_pick_jobs:
                # Told to stop while the claim was on its way: hand the job back untouched, as
                # arq does with a job that a stop cancels (the try counts, as it does there).
                await self.finish_job(job_id, False, None, None, False, None, None)
                continue
            read = _ClaimedRead(job_id, payload, job_try, aborted, abortable=self.allow_abort_jobs)
            # At most the free slots were claimed, so this never waits; arq's bookkeeping follows.
            await self.sem.acquire()
            self.job_counter += 1
            task = self.loop.create_task(self._run_claimed(job_id, int(float(raw_score)), read))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
            started += 1
        return started

    async def _run_claimed(self, job_id: str, score: int, read: _ClaimedRead) -> None:
        # Set in this task's own context: only this job's run_job sees it.
        _stand_in.set(read)
        await self.run_job(job_id, score)

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
        batched = _BatchedFinish(self)
        if not finish:
            # arq puts the job back (a Retry, deferred by incr_score, or handed back at
            # shutdown) without any token: the same MULTI pushes one, so that a worker wakes
            # and runs the job when it is due.
            batched.lpush(self._wake_key, "1")
            batched.ltrim(self._wake_key, 0, 15)
        _stand_in.set(batched)
        try:
            await super().finish_job(
                job_id,
                finish,
                result_data,
                result_timeout_s,
                keep_result_forever,
                incr_score,
                keep_in_progress,
            )
        finally:
            _stand_in.set(None)

    async def _finish_soon(self, commands: list[Any]) -> None:
        """Have a batched finish sent; return once it is done (raise if that failed)."""
        done = self.loop.create_future()
        self._finishes.append((commands, done))
        if not self._sending:
            # No MULTI on its way: this task sends it, with whatever else waits (so a worker
            # with one job at a time pays nothing for the batching).
            await self._send_finishes()
        await done

    async def _send_finishes(self) -> None:
        """Send the waiting finishes in one MULTI; a task sends those that come meanwhile."""
        batch, self._finishes = self._finishes, []
        if not batch:
            return
        self._sending = True
        try:
            recorder = _Recorder()
            for commands, _ in batch:
                for name, args, kwargs in commands:
                    getattr(recorder, name)(*args, **kwargs)
            await _multi_exec(cast("ArqRedis", self._pool), recorder.commands)
        except Exception as exc:
            for _, done in batch:
                if not done.done():  # (its waiter may have been cancelled meanwhile)
                    done.set_exception(exc)
        except BaseException:
            for _, done in batch:
                done.cancel()
            raise
        else:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
        finally:
            self._sending = False
            if self._finishes:
                self._finisher = self.loop.create_task(self._send_finishes())

    async def close(self) -> None:
        try:
            await self._close_arq()
        finally:
            if self._blocking is not None:
                await self._blocking.disconnect()
                self._blocking = None

    async def _close_arq(self) -> None:
        """arq 0.28's `Worker.close`, but closing its pool with `aclose`: arq's own call,
        `close(close_connection_pool=True)`, is deprecated in redis-py 5 and warns at every
        shutdown."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values())
        await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    async def run_job(self, job_id: str, score: int) -> None:
        # Each job runs in a task of its own (arq's start_jobs, or _start_claimed), with its own
        # copy of the context: this binding reaches every line logged while the job runs (ours
        # and arq's own, see sudo_queue.logs) and nothing outside the task, which ends with it.
        structlog.contextvars.bind_contextvars(**job_log_context(job_id))
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
