"""Slack approvals: a Bolt app with Approve / Reject buttons, and the notifier that posts them.

`sudo-queue slack` runs, in one process, the Bolt `AsyncApp` (HTTP on `/slack/events` through
aiohttp, or Socket Mode with `--socket`) and the notifier worker on the `<ns>:slack` queue, which
posts a request's message when it turns pending and updates it once decided
(adapters/slack_notify.py).

A click is acknowledged at once, then makes one call into the core: `Store.approve` or
`Store.reject`, the same atomic transitions as the CLI's, with the Slack user id as the actor
and, for approvals, the args digest the message showed. Before that, in this order: Bolt's
signature check (HTTP mode), a check that the request comes from our workspace and app, a replay
check (Bolt accepts an exact replay within its 5-minute window), the record's status, and the
approver rules (adapters/slack_approvers.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncApp
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.response import BoltResponse

from sudo_queue.constants import DEFAULT_NAMESPACE, DEFAULT_RETENTION_S
from sudo_queue.errors import GateUnavailable
from sudo_queue.models import RequestRecord, Status
from sudo_queue.store import Outcome, Store

from .slack_approvers import ApproverDirectory, Verdict
from .slack_blocks import (
    ACTION_APPROVE,
    ACTION_REJECT,
    REASON_BLOCK,
    REASON_INPUT,
    REJECT_VIEW,
    parse_decide_block_id,
    reject_modal,
    state_text,
)
from .slack_client import SlackIdentity, SlackTransientError, make_client, whoami
from .slack_config import SlackKeys, SlackSettings, SlackSetupError, load_settings
from .slack_notify import SlackNotifier, SlackNotifyFailed, notifier_worker_kwargs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from types import TracebackType

    from slack_bolt.context.ack.async_ack import AsyncAck
    from slack_bolt.request.async_request import AsyncBoltRequest
    from slack_sdk.web.async_client import AsyncWebClient

__all__ = [
    "Clicks",
    "RequestGuard",
    "SlackApprovals",
    "SlackSettings",
    "SlackSetupError",
    "build_app",
    "load_settings",
    "run",
]

log = structlog.get_logger(__name__)

EVENTS_PATH = "/slack/events"
# Longer than Bolt's 5-minute signature window, so a replay inside it is always recognised.
REPLAY_WINDOW_S = 600

NOT_APPROVER = ":no_entry: You are not an approver for this request; nothing changed."
LOOKUP_FAILED = (
    ":warning: Could not check whether you are an approver for this request ({problem}); "
    "nothing changed. Try again in a minute."
)
UNAVAILABLE = (
    ":warning: sudo-queue cannot reach its database right now; nothing changed. "
    "Try again in a moment."
)
STALE = (
    ":warning: This message no longer matches the request's args; nothing changed. "
    "Check the request with `sudo-queue show {request_id}`."
)


def _user(body: dict[str, Any]) -> str:
    return str((body.get("user") or {}).get("id") or "")


def _channel(body: dict[str, Any]) -> str | None:
    channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get(
        "channel_id"
    )
    return str(channel) if channel else None


class Clicks:
    """What the Approve and Reject buttons do, after Bolt has acknowledged the click."""

    def __init__(
        self,
        *,
        store: Store,
        directory: ApproverDirectory,
        notifier: SlackNotifier,
        client: AsyncWebClient,
    ) -> None:
        self.store = store
        self.directory = directory
        self.notifier = notifier
        self.client = client

    async def approve(self, body: dict[str, Any]) -> None:
        """An Approve click: count the vote, bound to the digest the message showed."""
        user, channel = _user(body), _channel(body)
        action = (body.get("actions") or [{}])[0]
        request_id = str(action.get("value") or "")
        digest = parse_decide_block_id(str(action.get("block_id") or ""))
        bound = log.bind(request_id=request_id, user=user)
        record = await self._open_record(request_id, user, channel)
        if record is None:
            return
        if digest != record.args_digest:
            bound.warning("slack_click_digest_mismatch")
            await self._say(channel, user, STALE.format(request_id=request_id))
            return
        if not await self._may_decide(record, user, channel):
            return
        try:
            result = await self.store.approve(request_id, actor=user, args_digest=digest)
        except GateUnavailable:
            await self._say(channel, user, UNAVAILABLE)
            return
        bound.info("slack_approve_clicked", outcome=result.outcome.value, votes=result.votes)
        if result.outcome is Outcome.VOTED:
            await self._say(
                channel,
                user,
                f":ballot_box_with_check: Your approval is counted: {result.votes} of "
                f"{result.needed}. Waiting for another approver.",
            )
            await self._refresh(request_id)
        elif result.outcome is Outcome.DUPLICATE:
            await self._say(
                channel,
                user,
                f"You have already approved this request ({result.votes} of {result.needed}); "
                "another approver is needed. Nothing changed.",
            )
        elif result.outcome is not Outcome.APPLIED:
            await self._refused(request_id, channel, user, result.detail)

    async def open_reject(self, body: dict[str, Any]) -> None:
        """A Reject click: open the dialog that asks for an optional reason."""
        user, channel = _user(body), _channel(body)
        request_id = str(((body.get("actions") or [{}])[0]).get("value") or "")
        record = await self._open_record(request_id, user, channel)
        if record is None or not await self._may_decide(record, user, channel):
            return
        try:
            await self.client.views_open(
                trigger_id=str(body.get("trigger_id") or ""),
                view=reject_modal(record, channel=channel or ""),
            )
        except Exception as exc:  # any failure leaves the request as it was
            log.warning("slack_reject_dialog_failed", request_id=request_id, error=repr(exc))
            await self._say(
                channel, user, ":warning: Could not open the reject dialog; click Reject again."
            )

    async def reject(self, body: dict[str, Any]) -> None:
        """The reject dialog's submission: reject, with the reason, if the user still may."""
        user = _user(body)
        view = body.get("view") or {}
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
            request_id, channel = str(meta["request_id"]), str(meta.get("channel") or "") or None
        except (ValueError, KeyError, TypeError):
            log.warning("slack_reject_view_malformed", user=user)
            return
        values = (view.get("state") or {}).get("values") or {}
        reason = str(((values.get(REASON_BLOCK) or {}).get(REASON_INPUT) or {}).get("value") or "")
        record = await self._open_record(request_id, user, channel)
        if record is None or not await self._may_decide(record, user, channel):
            return
        try:
            result = await self.store.reject(request_id, actor=user, reason=reason.strip())
        except GateUnavailable:
            await self._say(channel, user, UNAVAILABLE)
            return
        log.info(
            "slack_reject_submitted", request_id=request_id, user=user, outcome=result.outcome.value
        )
        if result.outcome is not Outcome.APPLIED:
            await self._refused(request_id, channel, user, result.detail)

    async def _open_record(
        self, request_id: str, user: str, channel: str | None
    ) -> RequestRecord | None:
        """The record if it is still pending; otherwise tell the user why nothing changes."""
        try:
            record = await self.store.get(request_id) if request_id else None
        except GateUnavailable:
            await self._say(channel, user, UNAVAILABLE)
            return None
        if record is None:
            await self._say(channel, user, "This request no longer exists; nothing changed.")
            return None
        if record.status is not Status.PENDING:
            log.info(
                "slack_click_on_decided",
                request_id=request_id,
                user=user,
                status=record.status.value,
            )
            await self._say(channel, user, state_text(record))
            return None
        return record

    async def _may_decide(self, record: RequestRecord, user: str, channel: str | None) -> bool:
        check = await self.directory.check(user, record.approvers)
        if check.verdict is Verdict.APPROVER:
            return True
        log.warning(
            "slack_click_refused", request_id=record.id, user=user, verdict=check.verdict.value
        )
        if check.verdict is Verdict.NOT_APPROVER:
            await self._say(channel, user, NOT_APPROVER)
        else:
            await self._say(channel, user, LOOKUP_FAILED.format(problem=check.problem))
        return False

    async def _refused(self, request_id: str, channel: str | None, user: str, detail: str) -> None:
        try:
            record = await self.store.get(request_id)
        except GateUnavailable:
            record = None
        if record is not None and record.status is not Status.PENDING:
            await self._say(channel, user, state_text(record))
        else:
            await self._say(channel, user, f":warning: Nothing changed: {detail or 'refused'}.")

    async def _refresh(self, request_id: str) -> None:
        """Show a counted vote on the message; the notifier's lock keeps updates in order."""
        try:
            await self.notifier.sync(request_id, post=False, lock_wait_s=2.0)
        except (SlackTransientError, SlackNotifyFailed, GateUnavailable) as exc:
            log.info("slack_vote_not_shown", request_id=request_id, error=str(exc))

    async def _say(self, channel: str | None, user: str, text: str) -> None:
        """An ephemeral reply only `user` sees."""
        if not channel or not user:
            return
        try:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text)
        except Exception as exc:  # a lost ephemeral changes no decision
            log.warning("slack_ephemeral_failed", user=user, error=repr(exc))


class RequestGuard(AsyncMiddleware):
    """Refuses requests from another workspace or app, and replays of a signed request.

    Runs after Bolt's own middleware, so after the signature check in HTTP mode.
    """

    def __init__(self, *, identity: SlackIdentity, redis: Redis, keys: SlackKeys) -> None:
        self.identity = identity
        self.redis = redis
        self.keys = keys

    async def async_process(
        self,
        *,
        req: AsyncBoltRequest,
        resp: BoltResponse,
        next: Callable[[], Awaitable[BoltResponse]],  # Bolt passes it by this name
    ) -> BoltResponse | None:
        body = req.body
        team_id, app_id = req.context.team_id, body.get("api_app_id")
        if team_id != self.identity.team_id or app_id != self.identity.app_id:
            log.warning(
                "slack_request_refused", team_id=team_id, api_app_id=app_id, type=body.get("type")
            )
            return BoltResponse(status=403, body="")
        if body.get("type") in ("block_actions", "view_submission"):
            timestamp = (req.headers.get("x-slack-request-timestamp") or [""])[0]
            raw = req.raw_body or json.dumps(body, sort_keys=True)
            fingerprint = hashlib.sha256(f"{timestamp}\n{raw}".encode()).hexdigest()
            try:
                fresh = await self.redis.set(
                    self.keys.seen(fingerprint), "1", nx=True, ex=REPLAY_WINDOW_S
                )
            except (RedisError, OSError) as exc:
                log.error("slack_replay_check_failed", error=str(exc))
                return BoltResponse(status=503, body="")
            if not fresh:
                log.warning("slack_replay_ignored", type=body.get("type"), user=_user(body))
                return BoltResponse(status=200, body="")
        return await next()


def build_app(
    *,
    settings: SlackSettings,
    client: AsyncWebClient,
    guard: RequestGuard,
    clicks: Clicks,
    socket: bool = False,
) -> AsyncApp:
    """The Bolt app: signature check on (HTTP mode), our guard, and three listeners."""
    secret = settings.signing_secret.get_secret_value() if settings.signing_secret else None
    app = AsyncApp(
        name="sudo-queue",
        client=client,
        signing_secret=secret,
        # Socket Mode requests are unsigned (the WebSocket is authenticated by the app token);
        # Bolt skips its check for them, and HTTP is not served in that mode.
        request_verification_enabled=not socket,
    )
    app.use(guard)

    async def on_approve(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        await clicks.approve(body)

    async def on_reject(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        await clicks.open_reject(body)

    async def on_reject_submitted(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        await clicks.reject(body)

    app.action(ACTION_APPROVE)(on_approve)
    app.action(ACTION_REJECT)(on_reject)
    app.view(REJECT_VIEW)(on_reject_submitted)
    return app


class SlackApprovals:
    """Everything `sudo-queue slack` runs, as an async context manager.

    ```python
    async with SlackApprovals(settings, redis_url=url) as slack, slack.serve_http("0.0.0.0", 3000):
        await run_forever(lambda: slack.worker_kwargs(job_serializer=..., job_deserializer=...))
    ```
    """

    def __init__(
        self,
        settings: SlackSettings,
        *,
        redis_url: str,
        namespace: str = DEFAULT_NAMESPACE,
        retention_s: float = DEFAULT_RETENTION_S,
        socket: bool = False,
        audit_key: str | bytes | None = None,
        audit_maxlen: int = 0,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.namespace = namespace
        self.retention_s = retention_s
        # Approvers' votes are decisions: they must carry the HMAC a keyed `audit verify` expects.
        self.audit_key = audit_key
        self.audit_maxlen = audit_maxlen
        self.socket = socket
        self.keys = SlackKeys(namespace)
        self._redis: Redis | None = None
        self._app: AsyncApp | None = None
        self._notifier: SlackNotifier | None = None

    @property
    def app(self) -> AsyncApp:
        if self._app is None:
            raise RuntimeError("use SlackApprovals as `async with` first")
        return self._app

    @property
    def notifier(self) -> SlackNotifier:
        if self._notifier is None:
            raise RuntimeError("use SlackApprovals as `async with` first")
        return self._notifier

    async def __aenter__(self) -> SlackApprovals:
        redis = Redis.from_url(
            self.redis_url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=10,
            client_name="sudo-queue:slack",
        )
        self._redis = redis
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            await self.aclose()
            raise GateUnavailable(
                f"cannot reach Redis ({type(exc).__name__}: {exc}); the Slack app cannot start. "
                "Start Redis or fix the URL (SUDO_QUEUE_REDIS_URL)"
            ) from exc
        try:
            client = make_client(self.settings)
            identity = await whoami(client, self.settings)
        except BaseException:
            await self.aclose()
            raise
        store = Store(
            redis,
            namespace=self.namespace,
            retention_s=self.retention_s,
            audit_key=self.audit_key,
            audit_maxlen=self.audit_maxlen,
        )
        directory = ApproverDirectory(
            client, default=self.settings.default_approvers, ttl_s=self.settings.group_cache_s
        )
        self._notifier = SlackNotifier(
            store=store,
            client=client,
            identity=identity,
            default_channel=self.settings.channel,
            approvers_for=directory.approvers_for,
            namespace=self.namespace,
            retention_s=self.retention_s,
            extra_redact_keys=self.settings.extra_redact_keys,
        )
        clicks = Clicks(store=store, directory=directory, notifier=self._notifier, client=client)
        guard = RequestGuard(identity=identity, redis=redis, keys=self.keys)
        self._app = build_app(
            settings=self.settings, client=client, guard=guard, clicks=clicks, socket=self.socket
        )
        log.info(
            "slack_app_ready",
            team_id=identity.team_id,
            app_id=identity.app_id,
            channel=self.settings.channel,
            default_approvers=len(self.settings.default_approvers),
        )
        if not self.settings.default_approvers:
            log.warning(
                "slack_no_default_approvers",
                hint="requests whose rule names no approvers can be decided with the CLI only; "
                "set SUDO_QUEUE_SLACK_APPROVERS",
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis connections; safe to call twice."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

    def worker_kwargs(
        self,
        *,
        job_serializer: Callable[[Any], bytes],
        job_deserializer: Callable[[bytes], Any],
        max_jobs: int = 20,
        poll_delay_s: float = 0.5,
    ) -> dict[str, Any]:
        """arq Worker arguments of the notifier (see slack_notify.notifier_worker_kwargs)."""
        return notifier_worker_kwargs(
            self.notifier,
            redis_url=self.redis_url,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            max_jobs=max_jobs,
            poll_delay_s=poll_delay_s,
        )

    @contextlib.asynccontextmanager
    async def serve_http(self, host: str, port: int) -> AsyncIterator[str]:
        """Serve `/slack/events` (and `/healthz`) on host:port; yields the events URL."""
        web_app = self.app.web_app(path=EVENTS_PATH, port=port)

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        web_app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            yield f"http://{host}:{port}{EVENTS_PATH}"
        finally:
            await runner.cleanup()

    @contextlib.asynccontextmanager
    async def serve_socket(self) -> AsyncIterator[str]:
        """Connect to Slack in Socket Mode with SLACK_APP_TOKEN; yields a description."""
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        token = self.settings.app_token
        if token is None:
            raise SlackSetupError("Socket Mode needs SLACK_APP_TOKEN (an xapp- token)")
        handler = AsyncSocketModeHandler(self.app, app_token=token.get_secret_value())
        await handler.connect_async()  # type: ignore[no-untyped-call]  # untyped in Bolt
        try:
            yield "socket mode"
        finally:
            await handler.close_async()  # type: ignore[no-untyped-call]  # untyped in Bolt


async def run(
    settings: SlackSettings,
    *,
    redis_url: str,
    namespace: str,
    retention_s: float,
    host: str,
    port: int,
    socket: bool,
    run_worker: Callable[[Callable[[], dict[str, Any]]], Awaitable[None]],
    job_serializer: Callable[[Any], bytes],
    job_deserializer: Callable[[bytes], Any],
    audit_key: str | bytes | None = None,
    audit_maxlen: int = 0,
) -> None:
    """`sudo-queue slack`: serve the app and run the notifier until the worker loop stops.

    `run_worker` is `workers.runner.run_forever` (signals, reconnects), passed in by the CLI.
    """
    async with SlackApprovals(
        settings,
        redis_url=redis_url,
        namespace=namespace,
        retention_s=retention_s,
        socket=socket,
        audit_key=audit_key,
        audit_maxlen=audit_maxlen,
    ) as slack:
        serving = slack.serve_socket() if socket else slack.serve_http(host, port)
        async with serving as where:
            log.info("slack_app_listening", at=where, queue=slack.keys.queue)
            await run_worker(
                lambda: slack.worker_kwargs(
                    job_serializer=job_serializer, job_deserializer=job_deserializer
                )
            )
