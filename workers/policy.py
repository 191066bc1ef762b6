"""The policy worker: evaluates queued requests, expires pending ones, recovers lost jobs.

Run it with `sudo-queue worker --policy FILE`. Jobs are JSON (never pickle); each request has one
evaluation job whose id derives from the request id, and every write is a compare-and-set in the
store, so arq's at-least-once delivery never decides a request twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import structlog
from arq import Retry, cron
from arq.connections import RedisSettings
from pydantic import SecretStr
from redis.asyncio import Redis

from sudo_queue.constants import DEFAULT_NAMESPACE, POLICY_ACTOR
from sudo_queue.errors import GateUnavailable, PolicyError
from sudo_queue.models import Status, digest
from sudo_queue.policy import Evaluation, Policy, Verdict
from sudo_queue.store import Outcome, Store

from .runner import json_dumps, json_loads, run_forever

__all__ = ["PolicyHolder", "WorkerConfig", "WorkerContext", "run", "worker_kwargs"]

log = structlog.get_logger(__name__)

MAX_TRIES = 5
JOB_TIMEOUT_S = 10
# A queued request older than this with no evaluation job left is re-enqueued by the sweeper.
REQUEUE_AFTER_MS = 30_000
# The sweeper is a backstop (expire jobs and evaluations wake workers themselves), so it runs
# rarely: an idle worker must cost Redis well under one command per second.
SWEEP_MINUTES = set(range(0, 60, 2))
# How often the worker looks at the policy file's mtime (a local stat, no Redis traffic).
POLICY_WATCH_S = 2.0

_STATUS = {
    Verdict.ALLOW: Status.ALLOWED,
    Verdict.DENY: Status.DENIED,
    Verdict.REQUIRE_APPROVAL: Status.PENDING,
}


class PolicyHolder:
    """The policy in force; `reload()` swaps it only for a file that loads cleanly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current = Policy.load(path)  # a bad file at start stops the worker: PolicyError
        self._mtime = self._stat()
        # (version, redaction keys) last published to Redis (see publish_policy).
        self.published: tuple[str, tuple[str, ...]] | None = None

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def reload(self, *, only_if_changed: bool = False) -> bool:
        """Load the file again; keep the last good policy (and log why) if it is invalid."""
        mtime = self._stat()
        if only_if_changed and mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            policy = Policy.load(self.path)
        except PolicyError as exc:
            log.error(
                "policy_reload_failed",
                path=str(self.path),
                error=str(exc),
                kept_version=self.current.version,
            )
            return False
        if policy.version != self.current.version:
            log.info(
                "policy_reloaded",
                path=str(self.path),
                old_version=self.current.version,
                version=policy.version,
            )
        self.current = policy
        return True


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything a policy worker process needs; built by the CLI from Settings."""

    redis_url: str
    policy_path: Path
    namespace: str = DEFAULT_NAMESPACE
    # (arq queue, function) pairs that get a job whenever a request turns pending or is decided
    # after being pending: the approval channels (Slack) subscribe here.
    notify: tuple[tuple[str, str], ...] = ()
    max_jobs: int = 100
    # Only a fallback: every enqueue, deferral, retry and hand-back wakes a worker by itself.
    poll_delay_s: float = 15.0
    health_check_interval_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)
    # SUDO_QUEUE_AUDIT_KEY (HMAC of the audit chain) and SUDO_QUEUE_AUDIT_MAXLEN (0: keep all).
    audit_key: SecretStr | None = None
    audit_maxlen: int = 0


class WorkerContext(TypedDict, total=False):
    """arq's ctx dict as our jobs see it."""

    redis: Any  # arq's own pool (bytes); our jobs use `store`
    job_id: str
    job_try: int
    store: Store
    policy: PolicyHolder
    config: WorkerConfig
    own_redis: Redis


async def evaluate(
    ctx: WorkerContext,
    request_id: str,
    agent: str,
    resource: str,
    action: str,
    args_json: str,
    context_json: str,
    args_digest: str,
    redacted_digest: str = "",
) -> str:
    """Decide a queued request: allowed, denied or pending (with its deadline).

    `redacted_digest` is the stored digest of the redacted args (absent from jobs enqueued by
    an earlier version): it lets the decide skip redacting the args again.
    """
    store, config = ctx["store"], ctx["config"]
    bound = log.bind(request_id=request_id, agent=agent, resource=resource, action=action)
    policy = ctx["policy"].current
    await publish_policy(ctx)
    job_try = ctx.get("job_try", 1)
    if job_try >= MAX_TRIES:
        # Every earlier try died without an answer (a crash, or Redis trouble): evaluating again
        # may crash again, so this one denies without evaluating.
        bound.error("evaluation_abandoned", job_try=job_try)
        await ctx["store"].fail(
            request_id,
            actor=POLICY_ACTOR,
            rule="<error>",
            reason=f"evaluation did not complete in {job_try - 1} tries; denied (fail closed)",
        )
        return "abandoned"
    try:
        if digest(args_json) != args_digest:
            raise ValueError("the job's args do not match their digest")
        args = json.loads(args_json)
        context = json.loads(context_json)
        evaluation = policy.evaluate(
            agent=agent, resource=resource, action=action, args=args, context=context
        )
    except Exception as exc:  # anything but a clean verdict fails closed
        bound.error("evaluation_failed", error=repr(exc))
        evaluation = Evaluation(
            Verdict.DENY, rule="<error>", reason=f"evaluation failed ({exc}); denied", error=True
        )
    try:
        result = await store.decide(
            request_id,
            status=_STATUS[evaluation.decision],
            agent=agent,
            resource=resource,
            action=action,
            args_digest=args_digest,
            rule=evaluation.rule,
            reason=evaluation.reason,
            policy_version=policy.version,
            actor=POLICY_ACTOR,
            expires_in_s=evaluation.expires_in,
            approvers=evaluation.approvers,
            min_approvals=evaluation.min_approvals,
            channel=evaluation.channel,
            notify=config.notify,
            args_json=args_json,
            redacted_digest=redacted_digest or None,
        )
    except GateUnavailable as exc:
        await _retry_or_give_up(ctx, request_id, exc)
        raise  # unreachable: _retry_or_give_up raises
    bound.info(
        "request_decided" if result.outcome is Outcome.APPLIED else "request_already_decided",
        status=result.status.value if result.status else None,
        rule=evaluation.rule,
        policy_version=policy.version,
        outcome=result.outcome.value,
    )
    return result.outcome.value


async def _retry_or_give_up(ctx: WorkerContext, request_id: str, exc: Exception) -> None:
    """Redis trouble: let arq retry with backoff; after the last try, fail closed."""
    job_try = ctx.get("job_try", 1)
    if job_try < MAX_TRIES:
        log.warning("evaluation_retry", request_id=request_id, job_try=job_try, error=str(exc))
        raise Retry(defer=min(0.2 * 2**job_try, 5.0)) from exc
    log.error("evaluation_gave_up", request_id=request_id, job_try=job_try, error=str(exc))
    with contextlib.suppress(GateUnavailable):
        await ctx["store"].fail(
            request_id,
            actor=POLICY_ACTOR,
            rule="<error>",
            reason=f"evaluation failed {job_try} times ({exc}); denied",
        )
    raise exc


async def publish_policy(ctx: WorkerContext) -> None:
    """Publish the policy in force (version, redaction keys) once per change.

    Redis then holds the redaction key patterns for every process that writes audit entries, and
    the audit log gets a `policy_reloaded` entry when the published policy changes. Redis trouble
    only postpones this to the next job or sweep.
    """
    holder = ctx["policy"]
    policy = holder.current
    mark = (policy.version, policy.redact_keys)
    if holder.published == mark:
        return
    try:
        changed = await ctx["store"].publish_policy(
            version=policy.version,
            redact_keys=policy.redact_keys,
            source=str(holder.path),
            actor=f"worker:{socket.gethostname()}:{os.getpid()}",
        )
    except GateUnavailable as exc:
        log.warning("policy_publish_failed", version=policy.version, error=str(exc))
        return
    holder.published = mark
    if changed:
        log.info("policy_published", version=policy.version, path=str(holder.path))


async def expire(ctx: WorkerContext, request_id: str) -> str:
    """Expire a pending request at its deadline (measured on the Redis server's clock)."""
    result = await ctx["store"].expire(request_id)
    if result.outcome is Outcome.NOT_DUE:
        raise Retry(defer=result.remaining_ms / 1000 + 0.01)
    if result.outcome is Outcome.APPLIED:
        log.info("request_expired", request_id=request_id)
    return result.outcome.value


async def sweep(ctx: WorkerContext) -> dict[str, int]:
    """Backstop for lost jobs: expire overdue requests, re-enqueue queued ones without a job."""
    store = ctx["store"]
    ctx["policy"].reload(only_if_changed=True)
    await publish_policy(ctx)
    expired = requeued = 0
    for request_id in await store.due_ids(Status.PENDING):
        if (await store.expire(request_id)).outcome is Outcome.APPLIED:
            expired += 1
    cutoff = await store.server_time_ms() - REQUEUE_AFTER_MS
    for request_id in await store.due_ids(Status.QUEUED, before_ms=cutoff):
        if (await store.requeue(request_id)).outcome is Outcome.APPLIED:
            requeued += 1
    if expired or requeued:
        log.info("sweep_recovered", expired=expired, requeued=requeued)
    return {"expired": expired, "requeued": requeued}


def _make_startup(config: WorkerConfig, holder: PolicyHolder, shared: Redis | None = None) -> Any:
    async def startup(ctx: WorkerContext) -> None:
        if shared is not None:
            redis = shared  # the caller's client (an in-process Redis has no URL); not closed here
        else:
            redis = Redis.from_url(
                config.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
            )
            ctx["own_redis"] = redis
        ctx["store"] = Store(
            redis,
            namespace=config.namespace,
            audit_key=config.audit_key.get_secret_value() if config.audit_key else None,
            audit_maxlen=config.audit_maxlen,
        )
        ctx["policy"] = holder
        ctx["config"] = config
        await publish_policy(ctx)

    return startup


async def shutdown(ctx: WorkerContext) -> None:
    redis = ctx.get("own_redis")
    if redis is not None:
        await redis.aclose()


def worker_kwargs(
    config: WorkerConfig, holder: PolicyHolder, *, redis: Redis | None = None
) -> dict[str, Any]:
    """The arq Worker arguments: the one place that wires the job functions.

    `redis` (decode_responses=True) is used by the jobs instead of a client of their own on
    `config.redis_url`: `sudo_queue.embedded` runs the worker on an in-process Redis that way.
    """
    return {
        "functions": [evaluate, expire],
        "cron_jobs": [
            # arq types ctx as a plain dict; ours is a TypedDict of the same dict. The name is
            # per namespace: arq's job keys are not, and a unique cron job's id is its name and
            # tick, so with the default name ("cron:sweep") the workers of two namespaces on one
            # Redis would each skip the ticks the other enqueued first.
            cron(
                sweep,  # type: ignore[arg-type]
                name=f"{config.namespace}:sweep",
                minute=SWEEP_MINUTES,
                second=0,
                unique=True,
                timeout=JOB_TIMEOUT_S,
            )
        ],
        "queue_name": f"{config.namespace}:queue",
        "redis_settings": RedisSettings.from_dsn(config.redis_url),
        "on_startup": _make_startup(config, holder, redis),
        "on_shutdown": shutdown,
        "job_serializer": json_dumps,
        "job_deserializer": json_loads,
        "max_tries": MAX_TRIES,
        "job_timeout": JOB_TIMEOUT_S,
        "keep_result": 0,
        "max_jobs": config.max_jobs,
        "poll_delay": config.poll_delay_s,
        "health_check_interval": config.health_check_interval_s,
        "handle_signals": False,
    }


async def run(config: WorkerConfig) -> None:
    """Run the policy worker until SIGINT/SIGTERM; SIGHUP reloads the policy."""
    holder = PolicyHolder(config.policy_path)
    log.info(
        "worker_starting",
        policy=str(config.policy_path),
        version=holder.current.version,
        rules=len(holder.current.rules),
        namespace=config.namespace,
        pid=os.getpid(),
    )
    watcher = asyncio.get_running_loop().create_task(_watch_policy(holder))
    try:
        await run_forever(lambda: worker_kwargs(config, holder), on_hup=holder.reload)
    finally:
        watcher.cancel()


async def _watch_policy(holder: PolicyHolder) -> None:
    """Hot reload on a file change: a local stat every POLICY_WATCH_S, no Redis traffic."""
    while True:
        await asyncio.sleep(POLICY_WATCH_S)
        holder.reload(only_if_changed=True)
