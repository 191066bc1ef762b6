"""`sudo-queue demo`: the whole approval loop in one command, on whatever Redis there is.

It starts the policy worker (in this process) with the policy file, then plays an agent that asks
about three tool calls: one the policy allows, one it denies, one that needs a human. The human is
the person at the terminal (a prompt shows the request, its rule and its redacted args), or nobody
with `--yes`, which approves unattended. The agent resumes the moment the decision is written, and
the demo ends with the audit trail of what happened.

Redis: the configured URL if it answers, in a namespace of its own ("sq-demo-<random>", removed
at the end) so nothing of another user is read or written; else a throwaway redis-server; else an
in-memory fakeredis (see sudo_queue/embedded.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import importlib
import json
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .audit import AuditLog
from .constants import (
    ARQ_IN_PROGRESS_PREFIX,
    ARQ_JOB_PREFIX,
    ARQ_RETRY_PREFIX,
    DEFAULT_NAMESPACE,
    POLICY_ACTOR,
    Keys,
)
from .embedded import (
    LocalRedis,
    RedisKind,
    display_url,
    local_redis,
    policy_worker,
    running_worker,
)
from .errors import RequestDenied
from .gate import Gate
from .models import Decision, RequestRecord, Status
from .redact import redact
from .store import Outcome, Store

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["DEMO_AGENT", "DemoCall", "DemoOptions", "audit_rows", "default_actor", "run_demo"]

DEMO_AGENT = "billing-bot"
# The policy worker decides a request in milliseconds; this only bounds a broken set-up.
VERDICT_TIMEOUT_S = 20.0
EXIT_OK, EXIT_FAILED = 0, 1


@dataclass(frozen=True, slots=True)
class DemoCall:
    """One tool call the demo agent asks about."""

    resource: str
    action: str
    args: dict[str, Any]
    what: str


# Matched against config/policy.yaml: small-charges allows, never-drop denies, big-charges asks.
CALLS: tuple[DemoCall, ...] = (
    DemoCall(
        "stripe",
        "charge",
        {"amount": 20, "currency": "usd", "customer": "cus_demo42"},
        "charge 20 USD",
    ),
    DemoCall("postgres", "drop_table", {"table": "users"}, "drop the users table"),
    DemoCall(
        "stripe",
        "charge",
        {
            "amount": 5000,
            "currency": "usd",
            "customer": "cus_demo42",
            # A secret in the args, to show that approvers never see it.
            "api_key": "sk_test_demo_0000000000000000000000",
        },
        "charge 5000 USD",
    ),
)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What `sudo-queue demo` was asked to do; built by the CLI."""

    redis_url: str | None
    """A configured Redis to try first (None: not configured, use a local one)."""
    namespace: str | None
    """An explicitly chosen namespace; None lets the demo pick a safe one."""
    policy_path: Path
    approve_all: bool = False
    actor: str = "demo-user"
    slack: bool = False
    """Slack settings are present (SLACK_BOT_TOKEN ...)."""
    redis_server: str | None = "redis-server"


class DemoError(Exception):
    """The demo could not finish; the message says why and what to do."""


def default_actor() -> str:
    """Who approves at the prompt: the login name, as a name without spaces."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):  # no login name (containers without a passwd entry)
        name = ""
    name = "".join(c for c in name if c.isprintable() and not c.isspace())[:64]
    return name or "demo-user"


class _Out:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def prompt(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class _LineReader:
    """Reads stdin lines on a daemon thread, so a prompt never blocks the event loop (the worker
    and the waiting agent keep running) and an abandoned prompt never blocks the exit."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            # Piped answers are not echoed by a terminal: echo them, so the output reads right.
            self.echo = not stream.isatty()
        except (OSError, ValueError):
            self.echo = True

    async def readline(self) -> str | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def read() -> None:
            try:
                line: str | None = self.stream.readline()
            except (OSError, ValueError):
                line = ""
            result = None if not line else line.rstrip("\r\n")
            with contextlib.suppress(RuntimeError):  # the loop may be gone by now
                loop.call_soon_threadsafe(_settle, future, result)

        threading.Thread(target=read, name="sudo-queue-demo-stdin", daemon=True).start()
        return await future

    async def answer(self, out: _Out) -> str | None:
        line = await self.readline()
        if self.echo:
            out(line or "")
        return line


def _settle(future: asyncio.Future[str | None], value: str | None) -> None:
    if not future.done():
        future.set_result(value)


def _args_text(args: Any, extra_keys: Sequence[str]) -> str:
    return json.dumps(redact(args, extra_keys=extra_keys), ensure_ascii=False)


def _until(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = max(int((when - datetime.now(UTC)).total_seconds()), 0)
    hours, rest = divmod(seconds, 3600)
    span = f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
    return f"in {span} ({when.strftime('%H:%M:%S')} UTC)"


async def _verdict(store: Store, request_id: str) -> RequestRecord:
    """The record once the policy worker has decided it (subscribe, then read)."""
    pubsub = store.redis.pubsub()
    try:
        async with asyncio.timeout(VERDICT_TIMEOUT_S):
            await pubsub.subscribe(store.keys.channel(request_id))
            while await pubsub.get_message(timeout=1.0) is None:
                pass  # the subscribe confirmation: only now can no wake-up be missed
            while True:
                record = await store.get(request_id)
                if record is None:
                    raise DemoError(f"request {request_id} vanished from Redis")
                if record.status is not Status.QUEUED:
                    return record
                # Woken by the transition's PUBLISH; the timeout only re-reads as a backstop.
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    except TimeoutError:
        raise DemoError(
            f"the policy worker did not decide request {request_id} within "
            f"{VERDICT_TIMEOUT_S:g}s; run with SUDO_QUEUE_LOG_LEVEL=debug to see its log"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 5


async def _final(gate: Gate, request_id: str) -> Decision:
    """Wait like an agent does: the Decision, granted or not."""
    try:
        return await gate.wait(request_id)
    except RequestDenied as exc:
        return exc.decision


def _describe_decision(decision: Decision) -> str:
    who = f" by {decision.decided_by}" if decision.decided_by else ""
    if decision.decided_by == POLICY_ACTOR:
        who = " by the policy"
    rule = f" (rule {decision.rule})" if decision.rule else ""
    reason = decision.reason
    if reason == f"matched rule {decision.rule!r}":  # says nothing the rule name does not
        reason = None
    why = f": {reason}" if reason else ""
    return f"{decision.status.value}{who}{rule}{why}"


class _Demo:
    def __init__(
        self,
        options: DemoOptions,
        redis: LocalRedis,
        namespace: str,
        out: _Out,
        reader: _LineReader,
    ) -> None:
        self.options = options
        self.redis = redis
        self.namespace = namespace
        self.out = out
        self.reader = reader
        self.store = Store(redis.client, namespace=namespace)
        self.redact_keys: tuple[str, ...] = ()
        self.slack_channel: str | None = None
        """Where the in-process Slack app posts approval messages; None: the terminal prompt."""

    # -- the CLI line another terminal would use ------------------------------------------------

    def cli(self, command: str) -> str:
        parts = ["sudo-queue"]
        if self.redis.url is not None:
            parts += ["--redis-url", display_url(self.redis.url)]
        if self.namespace != DEFAULT_NAMESPACE:
            parts += ["--namespace", self.namespace]
        return " ".join([*parts, command])

    # -- the agent --------------------------------------------------------------------------------

    async def run_agent(self, gate: Gate, policy: Policy) -> list[Decision]:
        self.redact_keys = tuple(getattr(policy, "redact_keys", ()))
        decisions = []
        for number, call in enumerate(CALLS, start=1):
            self.out()
            self.out(
                f"agent {DEMO_AGENT} ({number}/{len(CALLS)}): may I {call.what}? "
                f"{call.resource}.{call.action} {_args_text(call.args, self.redact_keys)}"
            )
            started = time.perf_counter()
            request_id = await gate.submit(call.resource, call.action, call.args)
            record = await _verdict(self.store, request_id)
            if record.status is Status.PENDING:
                decision = await self.ask_human(gate, record)
            else:
                decision = record.decision()
                self.out(
                    f"  {_describe_decision(decision)}  "
                    f"[{(time.perf_counter() - started) * 1000:.0f} ms]"
                )
            verdict = "goes ahead" if decision.granted else "does not happen"
            self.out(f"  agent {DEMO_AGENT}: the call {verdict}. [request {request_id}]")
            decisions.append(decision)
        return decisions

    async def ask_human(self, gate: Gate, record: RequestRecord) -> Decision:
        needed = f"{record.min_approvals} approval" + ("s" if record.min_approvals != 1 else "")
        self.out(
            f"  agent {DEMO_AGENT}: waiting for a human. Rule {record.rule!r} says "
            f"{record.reason or 'this needs approval'!r}; {needed} needed, "
            f"expires {_until(record.expires_at)}."
        )
        waiter = asyncio.create_task(_final(gate, record.id), name=f"agent-wait-{record.id}")
        try:
            decided_at = await self.approver(record, waiter)
            decision = await waiter
        finally:
            waiter.cancel()
        if decided_at is not None:
            resumed_ms = (time.perf_counter() - decided_at) * 1000
            self.out(
                f"  agent {DEMO_AGENT}: resumed {resumed_ms:.0f} ms after the decision: "
                f"{_describe_decision(decision)}"
            )
        else:
            self.out(f"  agent {DEMO_AGENT}: resumed: {_describe_decision(decision)}")
        return decision

    # -- the human ------------------------------------------------------------------------------

    async def approver(self, record: RequestRecord, waiter: asyncio.Task[Decision]) -> float | None:
        """Decide `record` as the terminal's human (or unattended); when it was decided."""
        if self.options.approve_all:
            self.out(f"  --yes: approving as {self.options.actor}, unattended")
            return await self.approve_until_done(record, reason="approved unattended (--yes)")
        if self.slack_channel is not None:
            self.out(f"  posted to Slack ({self.slack_channel}): approve or reject there")
            if self.redis.url is not None:
                self.out(
                    f"  or from another terminal: {self.cli(f'approve {record.id} --as NAME')}"
                )
            await asyncio.wait({waiter})
            return None
        where = "at the prompt below"
        if self.redis.url is not None:
            command = self.cli(f"approve {record.id} --as NAME")
            where += f", or from another terminal:\n      {command}"
        else:
            where += " (the in-memory Redis lives in this process; no other terminal can reach it)"
        self.out(f"  approve or reject {where}")
        self.show_request(record)
        while True:
            self.out.prompt("  approve or reject? [a/r] ")
            answer = await self.first(self.reader.answer(self.out), waiter)
            if answer is _DECIDED_ELSEWHERE:
                self.out()
                self.out("  decided elsewhere")
                return None
            if answer is None:  # end of input: nobody is there to approve
                return await self.reject(record, "no answer at the terminal prompt (end of input)")
            choice = str(answer).strip().lower()
            if choice in ("a", "approve", "y", "yes"):
                return await self.approve_until_done(record, reason="approved at the demo prompt")
            if choice in ("r", "reject", "n", "no"):
                self.out.prompt("  reason (optional, reaches the agent): ")
                reason = await self.first(self.reader.answer(self.out), waiter)
                if reason is _DECIDED_ELSEWHERE:
                    self.out()
                    self.out("  decided elsewhere")
                    return None
                return await self.reject(record, str(reason or "").strip())
            self.out("  answer a (approve) or r (reject)")

    async def first(self, read: Any, waiter: asyncio.Task[Decision]) -> Any:
        """The line read, or _DECIDED_ELSEWHERE if the request was decided meanwhile."""
        reading = asyncio.ensure_future(read)
        done, _ = await asyncio.wait({reading, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if reading in done:
            return reading.result()
        reading.cancel()
        return _DECIDED_ELSEWHERE

    def show_request(self, record: RequestRecord) -> None:
        args = json.dumps(
            redact(record.args, extra_keys=self.redact_keys), indent=2, ensure_ascii=False
        ).splitlines()
        approvers = ", ".join(record.approvers) or "anyone"
        lines = [
            ("request", record.id),
            ("agent", record.agent),
            ("call", f"{record.resource}.{record.action}"),
            ("rule", f"{record.rule}: {record.reason}" if record.reason else str(record.rule)),
            ("approvers", f"{approvers} ({record.min_approvals} needed)"),
            ("expires", _until(record.expires_at)),
            ("args", args[0]),
            *(("", line) for line in args[1:]),
        ]
        self.out("  +-- approval needed " + "-" * 40)
        for name, value in lines:
            self.out(f"  | {name:<10}{value}")
        self.out("  +" + "-" * 60)

    async def approve_until_done(self, record: RequestRecord, *, reason: str) -> float | None:
        actor = self.options.actor
        for number in range(1, max(record.min_approvals, 1) + 1):
            name = actor if number == 1 else f"{actor}-{number}"
            decided_at = time.perf_counter()
            result = await self.store.approve(
                record.id, actor=name, reason=reason, args_digest=record.args_digest
            )
            if result.outcome is Outcome.APPLIED:
                self.out(f"  approved by {name}")
                return decided_at
            if result.outcome is Outcome.VOTED:
                self.out(f"  approval {result.votes} of {result.needed} counted ({name})")
                if not self.options.approve_all:
                    self.out(f"  another approver is needed: {self.cli(f'approve {record.id}')}")
                    return None
                continue
            self.out(f"  could not approve: it is {result.status} {result.detail}".rstrip())
            return None
        return None

    async def reject(self, record: RequestRecord, reason: str) -> float | None:
        decided_at = time.perf_counter()
        result = await self.store.reject(record.id, actor=self.options.actor, reason=reason)
        if result.outcome is Outcome.APPLIED:
            self.out(f"  rejected by {self.options.actor}" + (f": {reason}" if reason else ""))
            return decided_at
        self.out(f"  could not reject: it is {result.status} {result.detail}".rstrip())
        return None

    # -- the trail ------------------------------------------------------------------------------

    async def show_audit(self, since: str, request_ids: set[str], *, verify: bool) -> None:
        rows = await audit_rows(self.store, since=since, request_ids=request_ids)
        self.out()
        self.out(f"audit trail ({len(rows)} entries, Redis stream {self.store.keys.audit}):")
        table = [("TIME (UTC)", "EVENT", "REQUEST", "CALL", "STATUS", "ACTOR", "REASON")]
        for row in rows:
            stamp = datetime.fromtimestamp(int(row.get("time") or 0) / 1000, tz=UTC)
            reason = row.get("reason", "")
            table.append(
                (
                    stamp.strftime("%H:%M:%S.%f")[:-3],
                    row.get("event", ""),
                    row.get("request_id", "")[:8],
                    f"{row.get('resource', '')}.{row.get('action', '')}",
                    row.get("status", ""),
                    row.get("actor", ""),
                    reason if len(reason) <= 48 else reason[:47] + "~",
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for cells in table:
            self.out(
                "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            )
        if verify:
            result = await AuditLog(self.store.redis, namespace=self.namespace).verify()
            if result.ok:
                self.out(f"  hash chain intact: {result.checked} entries verified")
            elif result.needs_key:
                self.out("  hash chain: HMAC entries; verify with SUDO_QUEUE_AUDIT_KEY set")
            else:
                self.out(f"  hash chain BROKEN: {result.problem}")


_DECIDED_ELSEWHERE = object()


async def audit_rows(
    store: Store, *, since: str = "-", request_ids: set[str] | None = None, limit: int = 1000
) -> list[dict[str, str]]:
    """Audit entries (sudo_queue.audit, the `<namespace>:audit` stream) from stream id `since`,
    for the given requests, oldest first."""
    log = AuditLog(store.redis, namespace=store.keys.namespace)
    rows: list[dict[str, str]] = []
    async for entry in log.entries(start=since):
        if request_ids is None or entry["request_id"] in request_ids:
            rows.append({"id": entry.stream_id, **entry.fields})
            if len(rows) >= limit:
                break
    return rows


async def _choose_namespace(options: DemoOptions, redis: LocalRedis) -> tuple[str, bool]:
    """(namespace, remove it at the end). Never one a running worker serves on someone's Redis."""
    if redis.kind is not RedisKind.URL:
        return options.namespace or DEFAULT_NAMESPACE, False
    if options.namespace is None:
        return f"sq-demo-{secrets.token_hex(3)}", True
    health = f"{Keys(options.namespace).queue}:health-check"
    if await redis.client.exists(health):
        raise DemoError(
            f"a policy worker already serves namespace {options.namespace!r} at "
            f"{display_url(redis.url or '')}; the demo runs its own worker and would decide that "
            "worker's requests. Leave --namespace / SUDO_QUEUE_NAMESPACE unset (the demo then "
            "uses a namespace of its own) or pick an unused one"
        )
    return options.namespace, False


async def _remove_namespace(client: Any, namespace: str) -> int:
    """Delete the namespace's keys and the arq job keys of jobs still in its queue.

    arq names job keys without a namespace (`arq:job:<job id>`); the cron sweep's job id is not
    ours alone, so only the ids found in our own queue are removed, never a pattern.
    """
    job_ids = await client.zrange(Keys(namespace).queue, 0, -1)
    keys = [
        prefix + job_id
        for job_id in job_ids
        for prefix in (ARQ_JOB_PREFIX, ARQ_IN_PROGRESS_PREFIX, ARQ_RETRY_PREFIX, "arq:result:")
    ]
    async for key in client.scan_iter(match=f"{namespace}:*", count=500):
        keys.append(key)
    removed = 0
    for start in range(0, len(keys), 500):
        removed += await client.delete(*keys[start : start + 500])
    return int(removed)


async def run_demo(
    options: DemoOptions, *, out: TextIO | None = None, stdin: TextIO | None = None
) -> int:
    """Run the demo; 0 when the loop ran to the end."""
    say = _Out(out or sys.stdout)
    reader = _LineReader(stdin or sys.stdin)
    say("sudo-queue demo: an agent asks before it acts; a policy decides; a human approves.")
    say()
    try:
        async with local_redis(options.redis_url, redis_server=options.redis_server) as redis:
            for notice in redis.notices:
                say(f"  note     {notice}")
            namespace, remove = await _choose_namespace(options, redis)
            say(f"  redis    {redis.description}")
            if redis.kind is RedisKind.MEMORY:
                say(
                    "  NOTICE   state is in memory and ends with this process; for a real run, "
                    "install redis-server or set SUDO_QUEUE_REDIS_URL"
                )
            if remove:
                say(f"  keys     namespace {namespace!r}, removed when the demo ends")
            try:
                return await _run(options, redis, namespace, say, reader)
            finally:
                if remove:
                    count = await _remove_namespace(redis.client, namespace)
                    say(f"\nremoved the demo's {count} keys (namespace {namespace!r})")
    except DemoError as exc:
        sys.stderr.write(f"sudo-queue demo: {exc}\n")
        return EXIT_FAILED


async def _start_slack(
    stack: contextlib.AsyncExitStack, redis: LocalRedis, namespace: str, say: _Out
) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The Slack app in Socket Mode inside this process: its notifier posts each pending request,
    and clicks arrive over the socket (a local process gets no HTTP requests from Slack).
    Returns (channel, notify targets for the policy worker), or (None, ()) with the reason."""

    def fallback(why: str) -> tuple[None, tuple[()]]:
        say(f"  note     Slack settings found, but {why}; approving at the prompt instead")
        return None, ()

    if redis.url is None:
        return fallback("the Slack app cannot share an in-memory Redis")
    try:
        slack = importlib.import_module("sudo_queue.adapters.slack")
        slack_config = importlib.import_module("sudo_queue.adapters.slack_config")
        runner = importlib.import_module("sudo_queue.workers.runner")
    except ImportError as exc:
        return fallback(f"the Slack app cannot load ({exc}; pip install 'sudo-queue[slack]')")
    try:
        settings = slack.load_settings(socket=True)
        approvals = await stack.enter_async_context(
            slack.SlackApprovals(settings, redis_url=redis.url, namespace=namespace, socket=True)
        )
        await stack.enter_async_context(approvals.serve_socket())
        await stack.enter_async_context(
            running_worker(
                approvals.worker_kwargs(
                    job_serializer=runner.json_dumps, job_deserializer=runner.json_loads
                )
            )
        )
    except Exception as exc:  # a setting, a token Slack refuses, no connection: say which
        return fallback(f"the demo's Slack app cannot start ({exc})")
    say(f"  slack    Socket Mode; approval messages go to {settings.channel}")
    return str(settings.channel), (slack_config.notify_target(namespace),)


async def _run(
    options: DemoOptions, redis: LocalRedis, namespace: str, say: _Out, reader: _LineReader
) -> int:
    demo = _Demo(options, redis, namespace, say, reader)
    sec, usec = await redis.client.time()
    since = f"{int(sec) * 1000 + int(usec) // 1000}-0"
    async with contextlib.AsyncExitStack() as stack:
        notify: tuple[tuple[str, str], ...] = ()
        if options.slack and not options.approve_all:
            demo.slack_channel, notify = await _start_slack(stack, redis, namespace, say)
        policy = await stack.enter_async_context(
            policy_worker(
                redis, policy_path=options.policy_path, namespace=namespace, notify=notify
            )
        )
        say(
            f"  policy   {options.policy_path} ({len(policy.rules)} rules, {policy.version}), "
            "worker running in this process"
        )
        started = time.perf_counter()
        async with Gate(redis.client, agent=DEMO_AGENT, namespace=namespace) as gate:
            decisions = await demo.run_agent(gate, policy)
        elapsed = time.perf_counter() - started
    # The whole chain is verified only where it is the demo's own (not a namespace it was told
    # to use on someone's Redis, whose log may be long).
    own_log = redis.kind is not RedisKind.URL or options.namespace is None
    await demo.show_audit(since, {d.request_id for d in decisions}, verify=own_log)
    counts: dict[str, int] = {}
    for decision in decisions:
        counts[decision.status.value] = counts.get(decision.status.value, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    say()
    took = f"{elapsed * 1000:.0f} ms" if elapsed < 1 else f"{elapsed:.1f} s"
    say(f"done in {took}: {summary}.")
    say(
        "next: run `sudo-queue worker` against your Redis and wrap your agent's tools "
        "(README: Framework adapters)."
    )
    return EXIT_OK
