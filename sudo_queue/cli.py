"""The `sudo-queue` command line: run the worker, list, show, approve and reject requests.

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

from .errors import GateUnavailable, PolicyError
from .logs import configure_logging
from .models import RequestRecord, Status
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
    return Store(redis, namespace=args.namespace)


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
        record = await _load_record(store, args.id)
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


async def cmd_worker(args: argparse.Namespace) -> int:
    # Loaded by module path: `import sudo_queue` must not pull in arq's worker.
    module = importlib.import_module("sudo_queue.workers.policy")
    config = module.WorkerConfig(
        redis_url=args.redis_url,
        policy_path=Path(args.policy),
        namespace=args.namespace,
        max_jobs=args.max_jobs,
    )
    await module.run(config)
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    from .policy import Policy

    policy = Policy.load(args.file)
    _out(policy.describe())
    _out(f"\n{args.file}: OK")
    return EXIT_OK


# -- parsing -------------------------------------------------------------------------------------


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run the policy worker")
    p.add_argument(
        "--policy",
        default=str(settings.policy),
        help="policy file (env SUDO_QUEUE_POLICY; default %(default)s)",
    )
    p.add_argument("--max-jobs", type=int, default=100, help="concurrent jobs (default 100)")
    p.set_defaults(handler=cmd_worker)

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
    return parser


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
            return asyncio.run(outcome)
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
