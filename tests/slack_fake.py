"""A local fake of the Slack Web API (and Socket Mode), for tests and the example.

An aiohttp server on 127.0.0.1 and a free port that answers the methods sudo-queue calls, keeps
channels' messages, and records every call. It never talks to the real Slack.

```python
async with FakeSlack() as slack:           # slack.api_url -> "http://127.0.0.1:PORT/api/"
    slack.fail_next("chat.postMessage", status=429, retry_after=1)
    ...
    posted = slack.calls("chat.postMessage")
```

Also: `sign(body, secret)` signs an interactive payload the way Slack does, and the
`block_actions` / `view_submission` builders make the payloads a click sends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import WSMsgType, web
from slack_sdk.signature import SignatureVerifier

__all__ = [
    "APP_ID",
    "BOT_ID",
    "BOT_TOKEN",
    "TEAM_ID",
    "Call",
    "FakeSlack",
    "block_actions",
    "form_body",
    "sign",
    "signed_headers",
    "view_submission",
]

TEAM_ID = "T0FAKETEAM"
APP_ID = "A0FAKEAPP"
BOT_ID = "B0FAKEBOT"
BOT_USER = "U0FAKEBOT"
BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"


@dataclass
class Call:
    """One Web API call the fake received."""

    method: str
    args: dict[str, Any]
    status: int
    at: float  # time.monotonic()
    response: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Failure:
    status: int
    error: str
    retry_after: int | None
    drop: bool  # store the effect, then close the connection without answering


class FakeSlack:
    """The fake; use it as `async with` (or `await start()` / `await stop()`)."""

    def __init__(self, *, team_id: str = TEAM_ID, app_id: str = APP_ID) -> None:
        self.team_id = team_id
        self.app_id = app_id
        self.port = 0
        self.log: list[Call] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.channels: dict[str, str] = {"approvals": "C0APPROVALS", "general": "C0GENERAL"}
        self.usergroups: dict[str, tuple[str, list[str]]] = {}  # handle -> (id, members)
        self.failures: dict[str, list[_Failure]] = {}
        self.socket_envelopes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.socket_acks: list[dict[str, Any]] = []
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    # -- control --------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        error: str = "ratelimited",
        retry_after: int | None = 1,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `method` with an error (429 + Retry-After default)."""
        for _ in range(times):
            self.failures.setdefault(method, []).append(
                _Failure(status, error, retry_after if status == 429 else None, drop=False)
            )

    def drop_next(self, method: str) -> None:
        """Carry out the next call of `method`, then close the connection without an answer."""
        self.failures.setdefault(method, []).append(_Failure(200, "", None, drop=True))

    def add_usergroup(self, handle: str, group_id: str, members: list[str]) -> None:
        self.usergroups[handle] = (group_id, members)

    def calls(self, method: str | None = None) -> list[Call]:
        """Recorded calls (of one method), oldest first."""
        return [c for c in self.log if method is None or c.method == method]

    def ok_calls(self, method: str) -> list[Call]:
        return [c for c in self.calls(method) if c.status == 200 and c.response.get("ok")]

    def live_messages(self, channel: str) -> list[dict[str, Any]]:
        return list(self.messages.get(channel, []))

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> Any:
        """Wait until `predicate()` is truthy (checked after every call); return its value."""
        async with asyncio.timeout(timeout), self._changed:
            while not (value := predicate()):
                await self._changed.wait()
            return value

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the Web API ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                args.update(await request.json())
            else:
                args.update(dict(await request.post()))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = token or str(args.pop("token", ""))
        failures = self.failures.get(method)
        failure = failures.pop(0) if failures else None
        if failure is not None and not failure.drop:
            body = {"ok": False, "error": failure.error}
            headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after else {}
            return await self._answer(method, args, failure.status, body, headers)
        expected = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if token != expected:
            return await self._answer(method, args, 200, {"ok": False, "error": "invalid_auth"})
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            body = {"ok": False, "error": "unknown_method"}
            return await self._answer(method, args, 404, body)
        body = handler(args, request)
        if failure is not None and failure.drop:
            await self._record(method, args, 0, body)
            transport = request.transport
            if transport is not None:
                transport.close()
            raise ConnectionResetError("the fake dropped the connection on purpose")
        return await self._answer(method, args, 200, body)

    async def _answer(
        self,
        method: str,
        args: dict[str, Any],
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        await self._record(method, args, status, body)
        return web.json_response(body, status=status, headers=headers)

    async def _record(
        self, method: str, args: dict[str, Any], status: int, body: dict[str, Any]
    ) -> None:
        self.log.append(Call(method, args, status, time.monotonic(), body))
        async with self._changed:
            self._changed.notify_all()

    def _auth_test(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://fake.slack.test/",
            "team": "Fake Team",
            "user": "sudo-queue",
            "team_id": self.team_id,
            "user_id": BOT_USER,
            "bot_id": BOT_ID,
            "app_id": self.app_id,
            "is_enterprise_install": False,
        }

    def _channel(self, value: Any) -> str | None:
        name = str(value or "")
        if name in self.channels.values():
            return name
        return self.channels.get(name.lstrip("#"))

    def _chat_postMessage(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        channel = self._channel(args.get("channel"))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        ts = f"{int(time.time())}.{next(self._ts):06d}"
        blocks = args.get("blocks")
        message = {
            "type": "message",
            "ts": ts,
            "text": args.get("text", ""),
            "blocks": json.loads(blocks) if isinstance(blocks, str) else blocks,
            "bot_id": BOT_ID,
            "user": BOT_USER,
            "app_id": self.app_id,
        }
        metadata = args.get("metadata")
        if metadata:
            message["metadata"] = json.loads(metadata) if isinstance(metadata, str) else metadata
        self.messages.setdefault(channel, []).append(message)
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _find(self, args: dict[str, Any]) -> dict[str, Any] | None:
        channel = self._channel(args.get("channel"))
        for message in self.messages.get(channel or "", []):
            if message["ts"] == args.get("ts"):
                return message
        return None

    def _chat_update(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        message = self._find(args)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        blocks = args.get("blocks")
        message["text"] = args.get("text", "")
        message["blocks"] = json.loads(blocks) if isinstance(blocks, str) else blocks
        message["edited"] = {"user": BOT_USER, "ts": f"{time.time():.6f}"}
        return {"ok": True, "channel": args.get("channel"), "ts": message["ts"]}

    def _chat_delete(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        message = self._find(args)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        channel = self._channel(args.get("channel")) or ""
        self.messages[channel].remove(message)
        return {"ok": True, "channel": channel, "ts": message["ts"]}

    def _chat_postEphemeral(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if self._channel(args.get("channel")) is None:
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "message_ts": f"{time.time():.6f}"}

    def _views_open(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if not args.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        view = args.get("view")
        view = json.loads(view) if isinstance(view, str) else view
        return {"ok": True, "view": {"id": "V" + uuid.uuid4().hex[:10].upper(), **(view or {})}}

    def _usergroups_list(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        return {
            "ok": True,
            "usergroups": [
                {"id": group_id, "handle": handle, "name": handle.title()}
                for handle, (group_id, _) in self.usergroups.items()
            ],
        }

    def _usergroups_users_list(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        for group_id, members in self.usergroups.values():
            if group_id == args.get("usergroup"):
                return {"ok": True, "users": list(members)}
        return {"ok": False, "error": "no_such_subteam"}

    def _conversations_list(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        channels = [{"id": cid, "name": name} for name, cid in self.channels.items()]
        return {"ok": True, "channels": channels, "response_metadata": {"next_cursor": ""}}

    def _conversations_history(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        channel = self._channel(args.get("channel"))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        oldest = float(args.get("oldest") or 0)
        with_metadata = str(args.get("include_all_metadata", "")).lower() in ("1", "true")
        found = []
        for message in reversed(self.messages.get(channel, [])):
            if float(message["ts"]) < oldest:
                continue
            shown = dict(message)
            if not with_metadata:
                shown.pop("metadata", None)
            found.append(shown)
        return {"ok": True, "messages": found, "has_more": False}

    def _apps_connections_open(self, args: dict[str, Any], request: web.Request) -> dict[str, Any]:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}

    # -- Socket Mode ----------------------------------------------------------------------------

    async def send_socket(self, payload: dict[str, Any], kind: str = "interactive") -> str:
        """Deliver an envelope to the connected Socket Mode client; returns its envelope id."""
        envelope_id = str(uuid.uuid4())
        await self.socket_envelopes.put(
            {
                "envelope_id": envelope_id,
                "type": kind,
                "payload": payload,
                "accepts_response_payload": kind == "interactive",
            }
        )
        return envelope_id

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        await ws.send_json({"type": "hello", "num_connections": 1})

        async def pump() -> None:
            while True:
                envelope = await self.socket_envelopes.get()
                await ws.send_json(envelope)

        sender = asyncio.create_task(pump())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.socket_acks.append(json.loads(msg.data))
                    async with self._changed:
                        self._changed.notify_all()
        finally:
            sender.cancel()
        return ws


# -- interactive payloads -------------------------------------------------------------------------


def block_actions(
    message: dict[str, Any],
    channel: str,
    *,
    user: str,
    action_id: str,
    team_id: str = TEAM_ID,
    app_id: str = APP_ID,
) -> dict[str, Any]:
    """The payload Slack sends when `user` clicks the button `action_id` in `message`."""
    actions_block = next(b for b in message["blocks"] if b["type"] == "actions")
    button = next(e for e in actions_block["elements"] if e["action_id"] == action_id)
    return {
        "type": "block_actions",
        "team": {"id": team_id, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "team_id": team_id},
        "api_app_id": app_id,
        "token": "legacy-verification-token",
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": channel},
        "trigger_id": f"{time.time():.0f}.{uuid.uuid4().hex[:12]}",
        "channel": {"id": channel, "name": "approvals"},
        "message": message,
        "response_url": "https://hooks.slack.invalid/actions/unused",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": actions_block["block_id"],
                "value": button["value"],
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }


def view_submission(
    view: dict[str, Any],
    *,
    user: str,
    reason: str | None,
    team_id: str = TEAM_ID,
    app_id: str = APP_ID,
) -> dict[str, Any]:
    """The payload Slack sends when `user` submits the reject dialog `view` (from views.open)."""
    return {
        "type": "view_submission",
        "team": {"id": team_id, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "team_id": team_id},
        "api_app_id": app_id,
        "trigger_id": f"{time.time():.0f}.{uuid.uuid4().hex[:12]}",
        "view": {
            **view,
            "state": {
                "values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}
            },
        },
    }


def form_body(payload: dict[str, Any]) -> str:
    """An interactive payload as Slack POSTs it: `payload=<json>`, form-encoded."""
    return urlencode({"payload": json.dumps(payload)})


def sign(body: str, secret: str, timestamp: int | None = None) -> tuple[str, str]:
    """(timestamp, signature) for `body`, with Slack's v0 HMAC-SHA256 scheme."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return ts, signature


def signed_headers(body: str, secret: str, timestamp: int | None = None) -> dict[str, str]:
    ts, signature = sign(body, secret, timestamp)
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
    }


if __name__ == "__main__":  # pragma: no cover - a manual aid: `python -m tests.slack_fake`

    async def _main() -> None:
        async with FakeSlack() as fake:
            print(f"fake Slack Web API at {fake.api_url}", flush=True)
            await asyncio.Event().wait()

    asyncio.run(_main())
