"""The Redis side of a request: key layout, atomic transitions, reading records.

Every transition runs `transitions.lua` in one EVALSHA: compare-and-set on the status, the
audit entry, any follow-up arq job and the pub/sub wake-up happen together or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeVar, cast

import hiredis
from pydantic import ValidationError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .audit import clip_reason, entry_bodies, hmac_pad_states
from .constants import (
    ARQ_IN_PROGRESS_PREFIX,
    ARQ_JOB_PREFIX,
    DEFAULT_NAMESPACE,
    DEFAULT_RETENTION_S,
    EXPIRY_ACTOR,
    POLICY_ACTOR,
    Keys,
)
from .errors import GateUnavailable
from .models import RequestRecord, Status, canonical_json, digest, ms_to_datetime
from .redact import redact, redact_text

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection
    from redis.commands.core import AsyncScript

__all__ = ["CreateResult", "Outcome", "Store", "TransitionResult", "packed", "read_replies"]

T = TypeVar("T")

_SCRIPT = files("sudo_queue").joinpath("transitions.lua").read_text()
# The request fields every audit entry of a request repeats (see `Store._bodies`).
_ENTRY_FIELDS = (
    "agent",
    "resource",
    "action",
    "args_digest",
    "redacted_digest",
    "rule",
    "policy_version",
)
EXPIRED_REASON = "no decision before the deadline"  # finish() via expire_now() in the script
# The entry an expiry writes; any transition on a pending request may write it (a late click).
_EXPIRED_ENTRY = ("expired", "expired", EXPIRY_ACTOR, EXPIRED_REASON)


class Outcome(StrEnum):
    """What a transition did."""

    APPLIED = "applied"  # the status changed (see `status`)
    VOTED = "voted"  # an approval was counted; the quorum is not reached yet
    DUPLICATE = "duplicate"  # this approver had already voted: nothing changed
    NOT_DUE = "not_due"  # expire was asked before the deadline: nothing changed
    REFUSED = "refused"  # the current status does not allow it: nothing changed
    MISSING = "missing"  # no such request


@dataclass(frozen=True, slots=True)
class TransitionResult:
    """The answer of one atomic transition."""

    outcome: Outcome
    status: Status | None = None
    detail: str = ""
    votes: int = 0
    needed: int = 0
    remaining_ms: int = 0

    @property
    def changed(self) -> bool:
        return self.outcome in (Outcome.APPLIED, Outcome.VOTED)


@dataclass(frozen=True, slots=True)
class CreateResult:
    """The answer of `Store.create`: a new request, or the one the idempotency key points at."""

    request_id: str
    created: bool
    same_call: bool  # the existing request has the same resource, action and args digest
    status: Status


def _status(value: str) -> Status | None:
    try:
        return Status(value)
    except ValueError:
        return None


class _Coalescer:
    """Runs the transition script for every coroutine of this process, sending the calls made in
    the same event-loop turn together.

    200 agents of one Gate, or the jobs of one busy worker, resume together and each starts a
    transition: sent one by one, every call costs a connection from the pool, a write, a read,
    and the same again in Redis. The first call of a turn goes out at once (a lone agent waits
    for nothing); the calls that follow it in the same turn go out at its end as one pipeline,
    sharing a connection, a write and a read. A pipeline is not a transaction: each call is
    still one script, atomic on its own, and gets its own reply or error. Both go on lanes
    (`_exchange`), packed by hiredis (`packed`).
    """

    def __init__(self, redis: Redis, script: AsyncScript) -> None:
        self._redis = redis
        self._script = script
        self._turn_open = False
        self._queued: list[tuple[list[str], list[str], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._lanes: list[AbstractConnection] = []  # idle ones
        self._lane_count = 0
        self._lane_waits: list[asyncio.Future[AbstractConnection]] = []  # pipelines waiting
        self._lane_timeout: float | None = None

    async def __call__(self, keys: list[str], args: list[str]) -> Any:
        loop = asyncio.get_running_loop()
        if not self._turn_open:
            self._turn_open = True
            loop.call_soon(self._end_turn)  # after the coroutines that run in this turn
            if self._lanes or self._lane_count < MAX_LANES:
                return await self._alone(keys, args)
            # Every lane is busy (a loaded process): this call joins the turn's pipeline.
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((keys, args, future))
        return await future

    async def _alone(self, keys: list[str], args: list[str]) -> Any:
        """One call, sent at once on a lane."""
        command = packed("EVALSHA", self._script.sha, len(keys), *keys, *args)
        (reply,) = await self._exchange(command, 1)
        if isinstance(reply, NoScriptError):
            # Redis lost its scripts (a restart, SCRIPT FLUSH); nothing ran. The client's
            # script object loads the script again and sends the call.
            return await self._script(keys=keys, args=args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _exchange(self, command: bytes, replies: int) -> list[Any]:
        """Send `command` on a lane and read its `replies`, an error reply in its place.

        A lane is a connection of the pool's that this object keeps for itself. A call through
        the client costs a pool checkout (whose readiness check waits a whole event-loop turn
        for a read that times out), a task for the write's timeout and a timer for the read's:
        more CPU than the script itself takes in Redis. On a lane one timeout bounds the write
        and the reads together, as `socket_timeout` bounds each, and a lane that the server
        closed meanwhile is seen from the end of stream the event loop already read. A broken,
        timed-out or cancelled exchange closes the lane (redis-py's reads do that), so no late
        reply can answer a later call; it reconnects on its next use. The pool closes the
        lanes with its other connections.
        """
        conn = await self._take_lane()
        try:
            async with asyncio.timeout(self._lane_timeout):
                await conn.send_packed_command(command, check_health=False)
                return await read_replies(conn, replies)
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError(
                f"Redis did not answer within {self._lane_timeout:g}s"
            ) from None
        finally:
            self._give_back(conn)

    def _give_back(self, conn: AbstractConnection) -> None:
        """Hand `conn` to the pipeline that has waited longest for a lane, or keep it idle."""
        while self._lane_waits:
            waiting = self._lane_waits.pop(0)
            if not waiting.done():  # (its task may have been cancelled meanwhile)
                waiting.set_result(conn)
                return
        self._lanes.append(conn)

    async def _take_lane(self) -> AbstractConnection:
        """An idle lane, a new one (up to MAX_LANES), or the next one to come free."""
        if self._lanes:
            conn = self._lanes.pop()
        elif self._lane_count >= MAX_LANES:
            free: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
            self._lane_waits.append(free)
            try:
                conn = await free
            except asyncio.CancelledError:
                if free.done() and not free.cancelled():  # handed over as this was cancelled
                    self._give_back(free.result())
                raise
        else:
            return await self._new_lane()
        if not _open_and_idle(conn):
            await conn.disconnect()
        return conn

    async def _new_lane(self) -> AbstractConnection:
        self._lane_count += 1
        try:
            conn = cast("AbstractConnection", await self._redis.connection_pool.get_connection())
        except BaseException:
            self._lane_count -= 1
            raise
        self._lane_timeout = conn.socket_timeout
        # The lane's own timeout bounds the exchange; a `socket_timeout` on the connection
        # would make redis-py run each write in a task of its own.
        conn.socket_timeout = None
        return conn

    def _end_turn(self) -> None:
        self._turn_open = False
        if not self._queued:
            return
        batch, self._queued = self._queued, []
        # A task of its own: a caller that is cancelled (its timeout) cancels only its wait,
        # never the pipeline that also carries the others' calls.
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[list[str], list[str], asyncio.Future[Any]]]) -> None:
        replies: list[Any]
        try:
            replies = await self._pipelined([(keys, args) for keys, args, _ in batch])
            for i, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):
                    # Redis lost its scripts (a restart, SCRIPT FLUSH): the script object
                    # loads it again. Nothing ran for this call, so sending it again is safe.
                    keys, args, _ = batch[i]
                    try:
                        replies[i] = await self._script(keys=keys, args=args)
                    except Exception as exc:
                        replies[i] = exc
        except Exception as exc:
            # Whether the calls ran is unknown (as for any call whose connection broke):
            # every caller gets the error, which _guard turns into GateUnavailable.
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipelined(self, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        """The calls as one pipeline on a lane: one write, the replies in order, an error reply
        in its call's place (as redis-py's `execute(raise_on_error=False)`)."""
        sha = self._script.sha
        command = b"".join(packed("EVALSHA", sha, len(k), *k, *a) for k, a in calls)
        return await self._exchange(command, len(calls))


# Lanes one store keeps at most; past them a loaded process sends its calls as bigger pipelines.
# New lanes come from the pool, which connects them one at a time under its lock: with a lane
# for every concurrent call (150 in the throughput benchmark) some calls waited seconds.
MAX_LANES = 16


def packed(*command: str | int | float | bytes) -> bytes:
    """`command` in the Redis protocol, as redis-py's `pack_command` gives it, packed by hiredis
    in C (2 us for a transition, against 25 us in redis-py's Python)."""
    # (hiredis's stub types the tuple as having one item)
    return cast("bytes", hiredis.pack_command(cast("Any", command)))


async def read_replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next `count` replies on `conn`, an error reply (read whole, so the replies after it
    follow) as its ResponseError in its place."""
    out: list[Any] = []
    for _ in range(count):
        try:
            out.append(await conn.read_response())
        except ResponseError as exc:
            out.append(exc)
    return out


def _open_and_idle(conn: AbstractConnection) -> bool:
    """Whether `conn` is connected and has neither seen the end of its stream nor an error.

    The asyncio transport reads all the time, so a server's close or reset is already in the
    connection's StreamReader (redis-py's `_reader`) when the lane comes to send.
    """
    reader: asyncio.StreamReader | None = getattr(conn, "_reader", None)
    if reader is None or reader.at_eof():
        return False
    failed = getattr(reader, "exception", None)  # (fakeredis's reader has none)
    return failed is None or failed() is None


class Store:
    """Reads request records and applies transitions; shared by the Gate, workers and channels."""

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        retention_s: float = DEFAULT_RETENTION_S,
        audit_maxlen: int = 0,
        audit_key: str | bytes | None = None,
    ) -> None:
        """`audit_maxlen` > 0 trims the audit stream to that many entries on each write;
        `audit_key` (SUDO_QUEUE_AUDIT_KEY) makes this store's audit entries HMAC-SHA-256.
        Agents' Gates get no key: their entries (created, cancelled, expired) are plain SHA-256.
        """
        self.redis = redis
        self.keys = Keys(namespace)
        self.retention_ms = int(retention_s * 1000)
        self.audit_maxlen = audit_maxlen
        key = audit_key.encode() if isinstance(audit_key, str) else audit_key
        self._audit_mac = hmac_pad_states(key) if key else ""
        # The redaction key patterns the workers published (JSON list, exactly as stored);
        # learnt from the script whenever they change.
        self._redact_json = "[]"
        self._redact_keys: tuple[str, ...] = ()
        self._script: AsyncScript = redis.register_script(_SCRIPT)
        self._transition = _Coalescer(redis, self._script)

    def idem_key(self, agent: str, key: str) -> str:
        """The idempotency key of (agent, key); hashed so that ':' in names cannot collide."""
        digest = hashlib.sha256(f"{agent}\n{key}".encode()).hexdigest()[:32]
        return self.keys.idem_prefix + digest

    @property
    def redact_keys(self) -> tuple[str, ...]:
        """The extra redaction key patterns from the policy, as last seen in Redis."""
        return self._redact_keys

    async def refresh_redact_keys(self) -> tuple[str, ...]:
        """Read the redaction key patterns the policy worker published (for display code)."""
        pending_read = cast("Awaitable[str | None]", self.redis.hget(self.keys.policy, "redact"))
        raw = await _guard(pending_read, "read the policy")
        self._learn_redaction(raw or "[]")
        return self._redact_keys

    def _learn_redaction(self, published: str) -> None:
        try:
            keys = json.loads(published)
        except ValueError:
            keys = None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise GateUnavailable(
                f"the redaction patterns in {self.keys.policy} are malformed ({published[:80]!r}); "
                "restart the policy worker to publish them again"
            )
        self._redact_json, self._redact_keys = published, tuple(keys)

    def redacted_args(self, args_json: str) -> dict[str, str]:
        """The audit view of `args_json`: redacted with the current patterns, and its digest."""
        shown = canonical_json(redact(json.loads(args_json), extra_keys=self._redact_keys))
        return {"args_redacted": shown, "redacted_digest": digest(shown)}

    def _bodies(
        self, request_id: str, request: dict[str, str], *entries: tuple[str, str, str, str]
    ) -> dict[str, str]:
        """The audit body digests of the entries this call may write, for the script.

        `request` holds the request's `_ENTRY_FIELDS`; each entry is (event, status, actor,
        reason) as the script will write them (the reason before redaction and clipping). The
        script hashes any entry these do not match exactly itself (audit.entry_bodies), so they
        only save Redis work: the chain step then costs two SHA-256 blocks, not a whole body.
        """
        alg = "hmac-sha256" if self._audit_mac else "sha256"
        return entry_bodies(
            {
                **request,
                "request_id": request_id,
                "event": event,
                "status": status,
                "actor": actor,
                "reason": clip_reason(redact_text(reason)) if reason else "",
                "alg": alg,
            }
            for event, status, actor, reason in entries
        )

    async def _stored_bodies(
        self, request_id: str, *entries: tuple[str, str, str, str]
    ) -> dict[str, str]:
        """`_bodies` for a transition on a stored request, with its fields read first (one
        round trip of a few microseconds of Redis time, against ~45 us per body block)."""
        read = self.redis.hmget(self.keys.request(request_id), list(_ENTRY_FIELDS))
        values = await _guard(cast("Awaitable[list[str | None]]", read), "read the request")
        if values[0] is None:
            return {}  # no such request: the script says so
        request = {name: v or "" for name, v in zip(_ENTRY_FIELDS, values, strict=True)}
        return self._bodies(request_id, request, *entries)

    async def _run(self, op: str, request_id: str, params: dict[str, Any], idem: str = "") -> Any:
        k = self.keys
        keys = [
            k.request(request_id),
            k.votes(request_id),
            idem,
            k.queued,
            k.pending,
            k.queue,
            k.audit,
            k.audit_head,
            k.policy,
        ]
        if params.get("reason"):
            params = {**params, "reason": redact_text(params["reason"])}
        what = f"{op} request {request_id}" if request_id else op
        for _ in range(3):
            argv = [
                op,
                json.dumps(params, separators=(",", ":")),
                k.request_prefix,
                k.channel_prefix,
                ARQ_JOB_PREFIX,
                ARQ_IN_PROGRESS_PREFIX,
                str(self.audit_maxlen),
                self._audit_mac,
                self._redact_json,
            ]
            reply = await _guard(self._transition(keys, argv), what)
            if not (isinstance(reply, list) and reply and reply[0] == "redact"):
                return reply
            # The policy's redaction patterns changed: redact again with the current ones.
            self._learn_redaction(reply[1])
            args_json = reply[2] if len(reply) > 2 else params["args"]
            params = {**params, **self.redacted_args(args_json)}
        raise GateUnavailable(
            f"could not {what}: the redaction patterns kept changing (policy workers with "
            "different policies?); nothing was changed, try again"
        )

    # -- transitions ---------------------------------------------------------------------------

    async def create(
        self,
        request_id: str,
        *,
        agent: str,
        resource: str,
        action: str,
        args_json: str,
        args_digest: str,
        context_json: str,
        key: str | None,
        inbox: str = "",
    ) -> CreateResult:
        """Create a queued request and enqueue its evaluation, or find the one `key` names.

        `inbox` (a `Keys.inbox` channel) also gets the request id and its decision fields on
        every transition of a request created here (transitions.lua's `wake_up`), so that one
        subscription serves all of a Gate's waits and a decided waiter needs no read.
        """
        if inbox and not inbox.startswith(self.keys.inbox_prefix):
            raise ValueError(f"inbox {inbox!r} is not a channel of namespace {self.keys.namespace}")
        idem = self.idem_key(agent, key) if key is not None else ""
        redacted = self.redacted_args(args_json)
        params = {
            "agent": agent,
            "resource": resource,
            "action": action,
            "args": args_json,
            "digest": args_digest,
            "context": context_json,
            "key": key or "",
            "retention_ms": self.retention_ms,
            "inbox": inbox,
            **redacted,
        }
        request = {
            "agent": agent,
            "resource": resource,
            "action": action,
            "args_digest": args_digest,
            "redacted_digest": redacted["redacted_digest"],
        }
        params["bodies"] = self._bodies(request_id, request, ("created", "queued", agent, ""))
        reply = await self._run("create", request_id, params, idem)
        if reply[0] == "created":
            return CreateResult(request_id, True, True, Status.QUEUED)
        if reply[0] == "exists":
            status = _status(reply[3])
            if status is None:
                raise GateUnavailable(f"request {reply[1]} has an unknown status {reply[3]!r}")
            same = reply[2] == args_digest and reply[4] == resource and reply[5] == action
            return CreateResult(reply[1], False, same, status)
        raise GateUnavailable(f"could not create request {request_id}: {reply!r}")

    async def decide(
        self,
        request_id: str,
        *,
        status: Status,
        agent: str,
        resource: str,
        action: str,
        args_digest: str,
        rule: str,
        reason: str,
        policy_version: str,
        actor: str,
        expires_in_s: float = 0,
        approvers: Sequence[str] = (),
        min_approvals: int = 1,
        channel: str | None = None,
        notify: Sequence[tuple[str, str]] = (),
        args_json: str | None = None,
        redacted_digest: str | None = None,
    ) -> TransitionResult:
        """The policy's verdict: queued -> allowed, denied or pending (CAS on `queued`).

        `redacted_digest` (the stored digest of the redacted args, which the evaluation job
        carries) or else `args_json` (the job's args, redacted here) lets this store pass the
        audit entry's body digest, so that Redis hashes two blocks for it instead of the whole
        entry. Either is only a hint: a digest that does not match is ignored by the script.
        """
        if status not in (Status.ALLOWED, Status.DENIED, Status.PENDING):
            raise ValueError(f"a policy decides allowed, denied or pending, not {status}")
        params = {
            "verdict": status.value,
            "agent": agent,
            "resource": resource,
            "action": action,
            "digest": args_digest,
            "rule": rule,
            "reason": reason,
            "policy_version": policy_version,
            "actor": actor,
            "expires_in_ms": int(expires_in_s * 1000),
            "approvers": json.dumps(list(approvers)),
            "min_approvals": min_approvals,
            "channel": channel or "",
            "notify": json.dumps([list(n) for n in notify]) if notify else "",
        }
        redacted = redacted_digest
        # Args no policy could read (a planted job): the script hashes the body itself.
        if redacted is None and args_json is not None:
            with contextlib.suppress(ValueError, RecursionError):
                redacted = self.redacted_args(args_json)["redacted_digest"]
        if redacted is not None:
            request = {
                "agent": agent,
                "resource": resource,
                "action": action,
                "args_digest": args_digest,
                "redacted_digest": redacted,
                "rule": rule,
                "policy_version": policy_version,
            }
            entry = (status.value, status.value, actor, reason)
            params["bodies"] = self._bodies(request_id, request, entry)
        return _result(await self._run("decide", request_id, params))

    async def approve(
        self, request_id: str, *, actor: str, reason: str = "", args_digest: str = ""
    ) -> TransitionResult:
        """Count `actor`'s approval; the request is approved once the quorum is reached."""
        params: dict[str, Any] = {"actor": actor, "reason": reason, "digest": args_digest}
        params["bodies"] = await self._stored_bodies(
            request_id,
            ("vote", "pending", actor, reason),
            ("approved", "approved", actor, reason),
            _EXPIRED_ENTRY,
        )
        return _result(await self._run("approve", request_id, params))

    async def reject(self, request_id: str, *, actor: str, reason: str = "") -> TransitionResult:
        """Reject a pending request; one reject is final."""
        params: dict[str, Any] = {"actor": actor, "reason": reason}
        params["bodies"] = await self._stored_bodies(
            request_id,
            ("rejected", "rejected", actor, reason or f"rejected by {actor}"),
            _EXPIRED_ENTRY,
        )
        return _result(await self._run("reject", request_id, params))

    async def expire(self, request_id: str) -> TransitionResult:
        """Expire a pending request whose deadline (server clock) has passed."""
        params: dict[str, Any] = {"actor": EXPIRY_ACTOR}
        params["bodies"] = await self._stored_bodies(request_id, _EXPIRED_ENTRY)
        return _result(await self._run("expire", request_id, params))

    async def cancel(self, request_id: str, *, actor: str, reason: str = "") -> TransitionResult:
        """Cancel a queued or pending request."""
        params: dict[str, Any] = {"actor": actor, "reason": reason or f"cancelled by {actor}"}
        params["bodies"] = await self._stored_bodies(
            request_id, ("cancelled", "cancelled", actor, params["reason"])
        )
        return _result(await self._run("cancel", request_id, params))

    async def fail(
        self, request_id: str, *, actor: str, rule: str, reason: str
    ) -> TransitionResult:
        """Deny a queued request whose evaluation cannot complete (fail closed)."""
        params = {"actor": actor, "rule": rule, "reason": reason}
        return _result(await self._run("fail", request_id, params))

    async def publish_policy(
        self,
        *,
        version: str,
        redact_keys: Sequence[str],
        source: str,
        actor: str,
    ) -> bool:
        """Publish the policy a worker runs; True (and a `policy_reloaded` entry) if it changed.

        Other processes learn the policy's redaction key patterns from here.
        """
        redact_json = json.dumps(list(redact_keys), separators=(",", ":"))
        params = {"version": version, "redact": redact_json, "source": source, "actor": actor}
        reply = await self._run("policy", "", params)
        self._learn_redaction(redact_json)
        return bool(reply[0] == Outcome.APPLIED)

    async def requeue(
        self, request_id: str, *, actor: str = POLICY_ACTOR, max_requeues: int = 3
    ) -> TransitionResult:
        """Re-enqueue the evaluation of a queued request whose job was lost.

        After `max_requeues` recoveries the request is denied instead (fail closed).
        """
        params = {"actor": actor, "max_requeues": max_requeues}
        return _result(await self._run("requeue", request_id, params))

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, request_id: str, *, votes: bool = True) -> RequestRecord | None:
        """The record, or None if there is none; a malformed record raises GateUnavailable.

        `votes=False` leaves `approvals` empty and reads one key with one command: what a
        waiter needs for the decision, at the lowest cost.
        """
        if not votes:
            pending_read = cast(
                "Awaitable[dict[str, str]]", self.redis.hgetall(self.keys.request(request_id))
            )
            raw = await _guard(pending_read, f"read request {request_id}")
            return parse_record(raw) if raw else None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.request(request_id))
            pipe.smembers(self.keys.votes(request_id))
            raw, voters = await _guard(pipe.execute(), f"read request {request_id}")
        if not raw:
            return None
        return parse_record(raw, voters)

    async def open_ids(self, which: Status = Status.PENDING, limit: int = 1000) -> list[str]:
        """Ids of pending (or queued) requests, oldest deadline (or creation) first."""
        key = self.keys.pending if which is Status.PENDING else self.keys.queued
        ids: list[str] = await _guard(self.redis.zrange(key, 0, limit - 1), "list requests")
        return ids

    async def due_ids(self, which: Status, before_ms: int | None = None) -> list[str]:
        """Pending requests past their deadline, or queued ones created before `before_ms`."""
        key = self.keys.pending if which is Status.PENDING else self.keys.queued
        upper: float | str = "+inf" if before_ms is None else before_ms
        if which is Status.PENDING and before_ms is None:
            upper = await self.server_time_ms()
        ids: list[str] = await _guard(
            self.redis.zrangebyscore(key, "-inf", upper, start=0, num=500), "list due requests"
        )
        return ids

    async def server_time_ms(self) -> int:
        """The Redis server's clock, which every deadline is measured on."""
        sec, usec = await _guard(self.redis.time(), "read the server clock")
        return int(sec) * 1000 + int(usec) // 1000

    async def records(self, ids: Sequence[str]) -> list[RequestRecord]:
        """Records for several ids in one round trip; ids without a record are skipped."""
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hgetall(self.keys.request(request_id))
                pipe.smembers(self.keys.votes(request_id))
            replies = await _guard(pipe.execute(), "read requests")
        return [
            parse_record(raw, votes)
            for raw, votes in zip(replies[::2], replies[1::2], strict=True)
            if raw
        ]


def _result(reply: list[Any]) -> TransitionResult:
    outcome = Outcome(reply[0])
    if outcome is Outcome.APPLIED or outcome is Outcome.REFUSED:
        detail = reply[2] if len(reply) > 2 else ""
        return TransitionResult(outcome, _status(reply[1]), detail)
    if outcome is Outcome.VOTED or outcome is Outcome.DUPLICATE:
        return TransitionResult(
            outcome, Status.PENDING, votes=int(reply[1]), needed=int(reply[2] or 1)
        )
    if outcome is Outcome.NOT_DUE:
        return TransitionResult(outcome, Status.PENDING, remaining_ms=int(reply[1]))
    return TransitionResult(outcome)


async def _guard(awaitable: Awaitable[T], what: str) -> T:
    """Translate Redis failures at the boundary: fail closed with a message that says what to do."""
    try:
        return await awaitable
    except RedisError as exc:
        raise GateUnavailable(
            f"could not {what}: Redis failed ({type(exc).__name__}: {exc}); nothing was allowed. "
            "Check that Redis is running and reachable at the configured URL"
        ) from exc
    except OSError as exc:
        raise GateUnavailable(
            f"could not {what}: cannot reach Redis ({exc}); nothing was allowed"
        ) from exc


def parse_record(raw: dict[str, str], votes: set[str] | Sequence[str] = ()) -> RequestRecord:
    """Build a RequestRecord from a Redis hash; anything malformed raises GateUnavailable."""
    try:
        return RequestRecord(
            id=raw["id"],
            agent=raw["agent"],
            resource=raw["resource"],
            action=raw["action"],
            args=json.loads(raw["args"]),
            args_digest=raw["args_digest"],
            key=raw.get("key") or None,
            context=json.loads(raw.get("context") or "{}"),
            status=Status(raw["status"]),
            rule=raw.get("rule") or None,
            reason=raw.get("reason") or None,
            created_at=ms_to_datetime(raw["created_at"]) or _missing("created_at"),
            expires_at=ms_to_datetime(raw.get("expires_at")),
            decided_at=ms_to_datetime(raw.get("decided_at")),
            decided_by=raw.get("decided_by") or None,
            approvers=json.loads(raw.get("approvers") or "[]"),
            min_approvals=int(raw.get("min_approvals") or 1),
            approvals=sorted(votes),
            channel=raw.get("channel") or None,
            policy_version=raw.get("policy_version") or None,
        )
    except (KeyError, ValueError, TypeError, ValidationError) as exc:
        rid = raw.get("id", "?")
        raise GateUnavailable(
            f"the Redis record of request {rid} is malformed ({type(exc).__name__}: {exc}); "
            "treating it as not granted"
        ) from exc


def _missing(field: str) -> Any:
    raise KeyError(field)
