"""The `sudo-queue` command line: run the worker and the Slack app, list, show, approve, reject.

Exit codes: 0 done; 1 refused (the request is not in a state that allows it); 2 usage or input
error (bad arguments, unknown request id, invalid policy); 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from .audit import AuditLog, Checkpoint, format_table, parse_since
from .errors import GateUnavailable, PolicyError
from .logs import configure_logging
from .models import RequestRecord, Status
from .redact import redact, redact_text
from .settings import Settings
from .store import Outcome, Store, TransitionResult

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

__all__ = ["main"]

EXIT_OK, EXIT_REFUSED, EXIT_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3


class CommandError(Exception):
    """A failure the CLI reports as one line and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _connect(args: argparse.Namespace) -> Store:
    redis = Redis.from_url(
        args.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
    )
    key = getattr(args, "audit_key", None)
    return Store(
        redis,
        namespace=args.namespace,
        audit_key=key.get_secret_value() if key is not None else None,
        audit_maxlen=getattr(args, "audit_maxlen", 0),
    )


async def _shown(store: Store, records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The records as a human may see them: args and context redacted (sudo_queue.redact)."""
    keys = await store.refresh_redact_keys()
    return [
        r.model_copy(
            update={
                "args": redact(r.args, extra_keys=keys),
                "context": redact(r.context, extra_keys=keys),
                "reason": redact_text(r.reason) if r.reason else r.reason,
            }
        )
        for r in records
    ]


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (when - datetime.now(UTC)).total_seconds()
    span = abs(int(seconds))
    text = (
        f"{span // 3600}h{span % 3600 // 60:02d}m"
        if span >= 3600
        else f"{span // 60}m{span % 60:02d}s"
    )
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _record_json(record: RequestRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


async def _load_record(store: Store, request_id: str) -> RequestRecord:
    record = await store.get(request_id)
    if record is None:
        raise CommandError(
            f"no request {request_id!r}: check the id with `sudo-queue pending`", EXIT_INPUT
        )
    return record


# -- commands ------------------------------------------------------------------------------------


async def cmd_pending(args: argparse.Namespace) -> int:
    store = _connect(args)
    try:
        records = await store.records(await store.open_ids(Status.PENDING, limit=args.limit))
        records = await _shown(store, records)
    finally:
        await store.redis.aclose()
    if args.json:
        _out(json.dumps([_record_json(r) for r in records], indent=2))
        return EXIT_OK
    if not records:
        _out("no pending requests")
        return EXIT_OK
    rows = [("ID", "AGENT", "CALL", "RULE", "VOTES", "EXPIRES")]
    rows += [
        (
            r.id,
            r.agent,
            f"{r.resource}.{r.action}",
            r.rule or "-",
            f"{len(r.approvals)}/{r.min_approvals}",
            _ago(r.expires_at),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


async def cmd_show(args: argparse.Namespace) -> int:
    store = _connect(args)
    try:
        (record,) = await _shown(store, [await _load_record(store, args.id)])
    finally:
        await store.redis.aclose()
    if args.json:
        _out(json.dumps(_record_json(record), indent=2))
        return EXIT_OK
    fields = [
        ("id", record.id),
        ("status", record.status.value),
        ("agent", record.agent),
        ("call", f"{record.resource}.{record.action}"),
        ("rule", record.rule or "-"),
        ("reason", record.reason or "-"),
        ("created", record.created_at.isoformat()),
        (
            "expires",
            f"{record.expires_at.isoformat()} ({_ago(record.expires_at)})"
            if record.expires_at
            else "-",
        ),
        (
            "decided",
            f"{record.decided_at.isoformat()} by {record.decided_by}" if record.decided_at else "-",
        ),
        ("approvals", f"{', '.join(record.approvals) or 'none'} (needs {record.min_approvals})"),
        ("approvers", ", ".join(record.approvers) or "-"),
        ("policy", record.policy_version or "-"),
        ("args digest", record.args_digest),
        ("key", record.key or "-"),
    ]
    for name, value in fields:
        _out(f"{name + ':':<13}{value}")
    _out("args:")
    _out(json.dumps(record.args, indent=2, sort_keys=True, ensure_ascii=False))
    if record.context:
        _out("context:")
        _out(json.dumps(record.context, indent=2, sort_keys=True, ensure_ascii=False))
    return EXIT_OK


def _report(verb: str, request_id: str, result: TransitionResult) -> int:
    if result.outcome is Outcome.MISSING:
        raise CommandError(
            f"no request {request_id!r}: check the id with `sudo-queue pending`", EXIT_INPUT
        )
    if result.outcome is Outcome.APPLIED:
        _out(f"request {request_id} is now {result.status.value if result.status else '?'}")
        return EXIT_OK
    if result.outcome is Outcome.VOTED:
        _out(
            f"approval counted for request {request_id}: {result.votes} of {result.needed}; "
            "still pending"
        )
        return EXIT_OK
    if result.outcome is Outcome.DUPLICATE:
        raise CommandError(
            f"cannot {verb} request {request_id}: you have already approved it "
            f"({result.votes} of {result.needed}); another approver is needed",
            EXIT_REFUSED,
        )
    status = result.status.value if result.status else "?"
    detail = f" ({result.detail})" if result.detail else ""
    raise CommandError(f"cannot {verb} request {request_id}: it is {status}{detail}", EXIT_REFUSED)


async def cmd_approve(args: argparse.Namespace) -> int:
    store = _connect(args)
    try:
        result = await store.approve(
            args.id, actor=args.actor, reason=args.reason or "", args_digest=args.digest or ""
        )
    finally:
        await store.redis.aclose()
    return _report("approve", args.id, result)


async def cmd_reject(args: argparse.Namespace) -> int:
    store = _connect(args)
    try:
        result = await store.reject(args.id, actor=args.actor, reason=args.reason or "")
    finally:
        await store.redis.aclose()
    return _report("reject", args.id, result)


# Approval channels the policy worker can notify: name -> a module whose
# `notify_target(namespace)` gives the (arq queue, job function) that channel consumes.
NOTIFY_CHANNELS = {"slack": "sudo_queue.adapters.slack_config"}


def _notify_targets(names: Sequence[str], namespace: str) -> tuple[tuple[str, str], ...]:
    targets: list[tuple[str, str]] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        if name not in NOTIFY_CHANNELS:
            raise CommandError(
                f"unknown approval channel {name!r} in --notify / SUDO_QUEUE_NOTIFY; "
                f"known: {', '.join(sorted(NOTIFY_CHANNELS))}",
                EXIT_INPUT,
            )
        queue, function = importlib.import_module(NOTIFY_CHANNELS[name]).notify_target(namespace)
        targets.append((str(queue), str(function)))
    return tuple(targets)


async def cmd_worker(args: argparse.Namespace) -> int:
    # Loaded by module path: `import sudo_queue` must not pull in arq's worker.
    module = importlib.import_module("sudo_queue.workers.policy")
    names = args.notify if args.notify is not None else args.notify_env.split(",")
    config = module.WorkerConfig(
        redis_url=args.redis_url,
        policy_path=Path(args.policy),
        namespace=args.namespace,
        max_jobs=args.max_jobs,
        notify=_notify_targets(names, args.namespace),
        audit_key=args.audit_key,
        audit_maxlen=args.audit_maxlen,
    )
    await module.run(config)
    return EXIT_OK


async def cmd_slack(args: argparse.Namespace) -> int:
    # Loaded by module path: the core never imports slack_bolt, and the adapter never imports
    # the workers package; this command composes the Slack app with the worker runner.
    try:
        slack = importlib.import_module("sudo_queue.adapters.slack")
    except ImportError as exc:
        raise CommandError(
            f"the Slack app needs the `slack` extra ({exc}); install sudo-queue[slack]",
            EXIT_INPUT,
        ) from exc
    runner = importlib.import_module("sudo_queue.workers.runner")
    try:
        settings = slack.load_settings(socket=args.socket)
        await slack.run(
            settings,
            redis_url=args.redis_url,
            namespace=args.namespace,
            retention_s=args.retention_s,
            host=args.host,
            port=args.port,
            socket=args.socket,
            run_worker=runner.run_forever,
            job_serializer=runner.json_dumps,
            job_deserializer=runner.json_loads,
            audit_key=args.audit_key.get_secret_value() if args.audit_key else None,
            audit_maxlen=args.audit_maxlen,
        )
    except slack.SlackSetupError as exc:
        raise CommandError(str(exc), EXIT_INPUT) from exc
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    from .policy import Policy

    policy = Policy.load(args.file)
    _out(policy.describe())
    _out(f"\n{args.file}: OK")
    return EXIT_OK


def _demo_policy(args: argparse.Namespace, settings: Settings) -> Path:
    """The policy file; from a clone run elsewhere, the repository's config/policy.yaml."""
    path = Path(args.policy)
    if not path.is_file() and args.policy == str(settings.policy):
        beside_package = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
        path = beside_package if beside_package.is_file() else path
    if not path.is_file():
        raise CommandError(
            f"no policy file at {args.policy}: run the demo from the repository's root or pass "
            "--policy FILE",
            EXIT_INPUT,
        )
    return path


async def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    from .doctor import SlackEnv

    settings: Settings = args.settings
    given = settings.model_fields_set
    if "log_level" not in given:
        # The demo talks to a person; the in-process worker's info lines would drown it.
        configure_logging(settings.log_format, "warning")
    url_given = "redis_url" in given or args.redis_url != settings.redis_url
    namespace_given = "namespace" in given or args.namespace != settings.namespace
    options = demo.DemoOptions(
        redis_url=args.redis_url if url_given else None,
        namespace=args.namespace if namespace_given else None,
        policy_path=_demo_policy(args, settings),
        approve_all=args.yes,
        actor=args.actor or demo.default_actor(),
        slack=SlackEnv().configured,
    )
    return await demo.run_demo(options)


async def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    options = doctor.DoctorOptions(
        redis_url=args.redis_url,
        namespace=args.namespace,
        policy_path=Path(args.policy),
        slack=doctor.SlackEnv(),
    )
    checks = await doctor.run_checks(options)
    _out(doctor.render(checks, options))
    return doctor.exit_code(checks)


def _audit_log(args: argparse.Namespace) -> AuditLog:
    redis = Redis.from_url(
        args.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30
    )
    key = args.audit_key
    return AuditLog(
        redis, namespace=args.namespace, key=key.get_secret_value() if key is not None else None
    )


async def cmd_audit_list(args: argparse.Namespace) -> int:
    log = _audit_log(args)
    try:
        entries = await log.list_entries(
            request_id=args.request, agent=args.agent, since=args.since, limit=args.limit
        )
    finally:
        await log.redis.aclose()
    if args.json:
        _out(json.dumps([e.as_json() for e in entries], indent=2, ensure_ascii=False))
    else:
        _out(format_table(entries) if entries else "no audit entries")
    return EXIT_OK


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    log = _audit_log(args)
    try:
        result = await log.verify(checkpoint=args.checkpoint)
    finally:
        await log.redis.aclose()
    for note in result.notes:
        _out(f"note: {note}")
    if result.needs_key:
        raise CommandError(result.problem, EXIT_INPUT)
    if not result.ok:
        raise CommandError(f"the audit log is NOT intact: {result.problem}", EXIT_REFUSED)
    first = result.anchor.count + 1
    span = f"#{first}..#{result.head.count}" if result.checked else "none retained"
    _out(
        f"audit log intact: {result.checked} entries verified ({span}); "
        f"head {result.head}"
        + (" (checkpoint matches)" if args.checkpoint and not result.notes else "")
    )
    return EXIT_OK


async def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    log = _audit_log(args)
    try:
        _out(str(await log.checkpoint()))
    finally:
        await log.redis.aclose()
    return EXIT_OK


async def cmd_audit_export(args: argparse.Namespace) -> int:
    log = _audit_log(args)
    start = "-" if args.since is None else str(int(args.since.timestamp() * 1000))
    try:
        async for entry in log.entries(start):
            _out(json.dumps(entry.as_json(), ensure_ascii=False, separators=(",", ":")))
    finally:
        await log.redis.aclose()
    return EXIT_OK


# -- parsing -------------------------------------------------------------------------------------


def _since(value: str) -> datetime:
    try:
        return parse_since(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checkpoint(value: str) -> Checkpoint:
    try:
        return Checkpoint.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _actor(value: str) -> str:
    if not value.strip() or any(c.isspace() for c in value) or len(value) > 200:
        raise argparse.ArgumentTypeError(f"--as needs a name without spaces, got {value!r}")
    return value


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sudo-queue",
        description="A human-approval gate for AI-agent tool calls.",
        epilog="exit codes: 0 done, 1 refused, 2 usage or input error, 3 Redis unreachable",
    )
    parser.add_argument(
        "--redis-url",
        default=settings.redis_url,
        help="Redis URL (env SUDO_QUEUE_REDIS_URL; default %(default)s)",
    )
    parser.add_argument(
        "--namespace",
        default=settings.namespace,
        help="Redis key prefix (env SUDO_QUEUE_NAMESPACE; default %(default)s)",
    )
    # Every command that writes transitions signs its audit entries with SUDO_QUEUE_AUDIT_KEY.
    parser.set_defaults(audit_key=settings.audit_key, audit_maxlen=settings.audit_maxlen)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run the policy worker")
    p.add_argument(
        "--policy",
        default=str(settings.policy),
        help="policy file (env SUDO_QUEUE_POLICY; default %(default)s)",
    )
    p.add_argument("--max-jobs", type=int, default=100, help="concurrent jobs (default 100)")
    p.add_argument(
        "--notify",
        action="append",
        choices=sorted(NOTIFY_CHANNELS),
        help="enqueue notification jobs for this approval channel when a request turns pending "
        "or is decided (repeatable; env SUDO_QUEUE_NOTIFY, comma-separated)",
    )
    p.set_defaults(handler=cmd_worker, notify_env=settings.notify)

    p = sub.add_parser("slack", help="run the Slack approval app and its notifier")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default %(default)s)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP address; behind a proxy or tunnel keep the default, else 0.0.0.0 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--socket", action="store_true", help="Socket Mode (SLACK_APP_TOKEN) instead of HTTP"
    )
    p.set_defaults(handler=cmd_slack, retention_s=settings.retention_s)

    p = sub.add_parser("pending", help="list pending requests")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.set_defaults(handler=cmd_pending)

    p = sub.add_parser("show", help="show one request")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_show)

    for verb, handler in (("approve", cmd_approve), ("reject", cmd_reject)):
        p = sub.add_parser(verb, help=f"{verb} a pending request")
        p.add_argument("id")
        p.add_argument(
            "--as",
            dest="actor",
            required=True,
            type=_actor,
            help="who decides (recorded as decided_by)",
        )
        p.add_argument("--reason", help="why (reaches the agent)")
        if verb == "approve":
            p.add_argument("--digest", help="refuse unless the request's args digest is this")
        p.set_defaults(handler=handler)

    p = sub.add_parser("policy", help="policy tools")
    policy_sub = p.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_sub.add_parser("check", help="validate a policy file and print its rules")
    check.add_argument("file")
    check.set_defaults(handler=cmd_policy_check)

    p = sub.add_parser("audit", help="the tamper-evident audit log: list, verify, export")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    a = audit_sub.add_parser("list", help="list audit entries, newest last")
    a.add_argument("--request", metavar="ID", help="only this request's entries")
    a.add_argument("--agent", help="only this agent's entries")
    a.add_argument("--since", type=_since, help="ISO 8601 time (UTC unless given) or 30m, 2h, 7d")
    a.add_argument("--limit", type=int, default=50, help="the newest N (default %(default)s)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(handler=cmd_audit_list)
    a = audit_sub.add_parser(
        "verify",
        help="recompute the hash chain; exit 1 naming the first bad entry",
        epilog="exit codes: 0 intact, 1 tampered, 2 key missing or bad input, 3 Redis unreachable",
    )
    a.add_argument(
        "--checkpoint",
        type=_checkpoint,
        metavar="HASH:COUNT",
        help="a head printed earlier by `audit checkpoint`: also detects a truncated tail",
    )
    a.set_defaults(handler=cmd_audit_verify)
    a = audit_sub.add_parser("checkpoint", help="print the head as HASH:COUNT to keep elsewhere")
    a.set_defaults(handler=cmd_audit_checkpoint)
    a = audit_sub.add_parser("export", help="every retained entry as JSON lines, for a SIEM")
    a.add_argument("--jsonl", action="store_true", help="JSON lines (the default and only format)")
    a.add_argument("--since", type=_since, help="ISO 8601 time (UTC unless given) or 30m, 2h, 7d")
    a.set_defaults(handler=cmd_audit_export)

    p = sub.add_parser(
        "demo",
        help="see the whole loop: a worker, an agent, and you approving at a prompt",
        description="Starts the policy worker in this process and runs an agent that makes an "
        "allowed, a denied and an approval-needing request. Redis: SUDO_QUEUE_REDIS_URL if set "
        "and answering (in a namespace of the demo's own, removed at the end), else a "
        "throwaway redis-server, else an in-memory Redis.",
    )
    p.add_argument("--yes", action="store_true", help="approve unattended (for CI)")
    p.add_argument(
        "--as",
        dest="actor",
        metavar="NAME",
        type=_actor,
        help="approver name (default: your login name)",
    )
    p.add_argument(
        "--policy",
        default=str(settings.policy),
        help="policy file (env SUDO_QUEUE_POLICY; default %(default)s)",
    )
    p.set_defaults(handler=cmd_demo, settings=settings)

    p = sub.add_parser(
        "doctor",
        help="check Redis, persistence, the policy, the worker and Slack; print a checklist",
        epilog="exit codes: 0 no failure (warnings allowed), 1 a check failed, 3 Redis unreachable",
    )
    p.add_argument(
        "--policy",
        default=str(settings.policy),
        help="policy file (env SUDO_QUEUE_POLICY; default %(default)s)",
    )
    p.set_defaults(handler=cmd_doctor)
    return parser


def _run(coroutine: Coroutine[Any, Any, int], *, uvloop_if_installed: bool) -> int:
    """`asyncio.run`, on a uvloop event loop if asked for and uvloop is installed.

    The policy worker asks: uvloop costs it less CPU per decision than asyncio's own loop (see
    `python -m bench latency`). Without uvloop it runs the same on asyncio's loop.
    """
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if uvloop_if_installed:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sudo-queue` console script."""
    try:
        settings = Settings()
    except ValueError as exc:
        sys.stderr.write(f"sudo-queue: invalid SUDO_QUEUE_* setting: {exc}\n")
        return EXIT_INPUT
    args = build_parser(settings).parse_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int] | int] = args.handler
    try:
        outcome = handler(args)
        if asyncio.iscoroutine(outcome):
            return _run(outcome, uvloop_if_installed=handler is cmd_worker)
        return int(outcome)
    except CommandError as exc:
        sys.stderr.write(f"sudo-queue: {exc}\n")
        return exc.code
    except PolicyError as exc:
        sys.stderr.write(f"sudo-queue: {exc}\n")
        return EXIT_INPUT
    except GateUnavailable as exc:
        sys.stderr.write(f"sudo-queue: {exc}\n")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
