"""Slack approvals against a local fake of the Slack Web API, a private redis-server and the real
policy worker: clicks are interactive payloads POSTed to /slack/events, signed like Slack does."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import structlog
from pydantic import SecretStr
from redis.asyncio import Redis

from sudo_queue import Gate, RequestDenied, Status
from sudo_queue.adapters.slack import SlackApprovals
from sudo_queue.adapters.slack_blocks import ACTION_APPROVE, ACTION_REJECT
from sudo_queue.adapters.slack_config import (
    NOTIFY_FUNCTION,
    SlackSettings,
    SlackSetupError,
    load_settings,
    notify_target,
)
from sudo_queue.adapters.slack_notify import notify_slack
from sudo_queue.cli import _notify_targets, build_parser
from sudo_queue.settings import Settings
from sudo_queue.store import Store
from sudo_queue.workers.policy import PolicyHolder, WorkerConfig, worker_kwargs
from sudo_queue.workers.runner import WakeableWorker, json_dumps, json_loads

from .helpers import ROOT, cli_env, free_port
from .slack_fake import (
    APP_TOKEN,
    BOT_TOKEN,
    FakeSlack,
    block_actions,
    form_body,
    signed_headers,
    view_submission,
)

pytestmark = pytest.mark.redis_server

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CHANNEL = "C0APPROVALS"
ALICE, BOB, GROUPIE, MALLORY, DEFAULT = "U0ALICE", "U0BOB", "U0GROUPIE", "U0MALLORY", "U0DEFAULT"

POLICY = """
version: 1
default: deny
rules:
  - name: big-charges
    resource: stripe
    action: charge
    decision: require_approval
    approvers: ["U0ALICE", "@finance-leads"]
    reason: "charges above 50 need a human"
  - name: two-keys
    resource: vault
    action: open
    decision: require_approval
    approvers: ["U0ALICE", "U0BOB", "U0GROUPIE"]
    min_approvals: 2
  - name: quick
    resource: email
    action: send
    decision: require_approval
    approvers: ["U0ALICE"]
    expires_in: 1
  - name: ops
    resource: deploy
    action: "*"
    decision: require_approval
  - name: announce
    resource: slack
    action: announce
    decision: require_approval
    approvers: ["U0ALICE"]
    channel: "#general"
  - name: lost
    resource: slack
    action: lost
    decision: require_approval
    channel: "#nowhere"
"""


@contextlib.asynccontextmanager
async def running(kwargs: dict[str, Any]) -> AsyncIterator[WakeableWorker]:
    """An arq worker (our WakeableWorker) running in this event loop until the block ends."""
    worker = WakeableWorker(**kwargs)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        worker.handle_sig(signal.SIGUSR1)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker.close()


def request_of(message: dict[str, Any]) -> str:
    return str(message.get("metadata", {}).get("event_payload", {}).get("request_id", ""))


def has_buttons(message: dict[str, Any]) -> bool:
    return any(block["type"] == "actions" for block in message["blocks"])


def message_text(message: dict[str, Any]) -> str:
    """Every text of a message's blocks, joined: what a reader sees (before Slack renders it)."""
    texts = [message.get("text", "")]
    for block in message["blocks"]:
        if "text" in block:
            texts.append(block["text"]["text"])
        texts += [f["text"] for f in block.get("fields", [])]
        texts += [
            e["text"]
            for e in block.get("elements", [])
            if "text" in e and isinstance(e["text"], str)
        ]
    return "\n".join(texts)


@dataclass
class Env:
    """A running Slack channel: fake Slack, Slack app, notifier, policy worker, and an agent."""

    fake: FakeSlack
    url: str
    gate: Gate
    store: Store
    redis: Redis
    http: aiohttp.ClientSession
    slack: SlackApprovals

    async def submit(
        self, resource: str = "stripe", action: str = "charge", args: Any = None
    ) -> str:
        return await self.gate.submit(resource, action, {"amount": 5000} if args is None else args)

    async def message(self, request_id: str) -> dict[str, Any]:
        """The request's live message in the channel, once the notifier has posted it."""

        def find() -> dict[str, Any] | None:
            found = [m for m in self.fake.live_messages(CHANNEL) if request_of(m) == request_id]
            return found[0] if found else None

        message: dict[str, Any] = await self.fake.wait_for(find)
        return copy.deepcopy(message)  # as the approver's client shows it, whatever comes later

    async def decided_message(self, request_id: str) -> dict[str, Any]:
        """The request's message once it has been updated to show the outcome (no buttons)."""

        def find() -> dict[str, Any] | None:
            for m in self.fake.live_messages(CHANNEL):
                if request_of(m) == request_id and not has_buttons(m):
                    return m
            return None

        message: dict[str, Any] = await self.fake.wait_for(find)
        return message

    async def post(
        self, payload: dict[str, Any], *, timestamp: int | None = None, secret: str = SECRET
    ) -> int:
        body = form_body(payload)
        headers = signed_headers(body, secret, timestamp)
        async with self.http.post(self.url, data=body, headers=headers) as response:
            return response.status

    def click_payload(
        self, message: dict[str, Any], user: str, action_id: str = ACTION_APPROVE, **kw: str
    ) -> dict[str, Any]:
        return block_actions(message, CHANNEL, user=user, action_id=action_id, **kw)

    async def click(
        self, request_id: str, user: str, action_id: str = ACTION_APPROVE, **kw: str
    ) -> int:
        message = await self.message(request_id)
        return await self.post(self.click_payload(message, user, action_id, **kw))

    async def reject(self, request_id: str, user: str, reason: str | None) -> int:
        """Click Reject, then submit the dialog views.open showed with `reason`."""
        opened = len(self.fake.ok_calls("views.open"))
        assert await self.click(request_id, user, ACTION_REJECT) == 200
        call = await self.fake.wait_for(lambda: self.fake.ok_calls("views.open")[opened:])
        view = (
            json.loads(call[0].args["view"])
            if isinstance(call[0].args["view"], str)
            else call[0].args["view"]
        )
        return await self.post(view_submission(view, user=user, reason=reason))

    def ephemerals(self, user: str) -> list[str]:
        return [
            str(c.args["text"])
            for c in self.fake.ok_calls("chat.postEphemeral")
            if c.args["user"] == user
        ]

    async def ephemeral(self, user: str, count: int = 1) -> str:
        """Wait for `user`'s `count`-th ephemeral reply and return it."""
        found: list[str] = await self.fake.wait_for(lambda: self.ephemerals(user)[count - 1 :])
        return found[0]

    async def record(self, request_id: str) -> Any:
        return await self.store.get(request_id)

    async def status(self, request_id: str, status: Status, limit: float = 10) -> Any:
        async with asyncio.timeout(limit):
            while (record := await self.store.get(request_id)).status is not status:  # noqa: ASYNC110  # polling Redis, not an event
                await asyncio.sleep(0.02)
        return record


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as slack:
        slack.add_usergroup("finance-leads", "S0FINANCE", [GROUPIE])
        yield slack


@pytest.fixture
def settings(fake: FakeSlack) -> SlackSettings:
    return SlackSettings(
        bot_token=BOT_TOKEN,
        signing_secret=SECRET,
        channel=CHANNEL,
        api_url=fake.api_url,
        approvers=DEFAULT,
    )


@pytest.fixture
def audit_key() -> str | None:
    """No audit HMAC key unless a test parametrizes one."""
    return None


@pytest_asyncio.fixture
async def env(
    redis_url: str, fake: FakeSlack, settings: SlackSettings, tmp_path: Path, audit_key: str | None
) -> AsyncIterator[Env]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    config = WorkerConfig(
        redis_url=redis_url,
        policy_path=policy,
        notify=(notify_target(),),
        poll_delay_s=0.2,
        audit_key=SecretStr(audit_key) if audit_key else None,
    )
    async with (
        SlackApprovals(settings, redis_url=redis_url, audit_key=audit_key) as slack,
        slack.serve_http("127.0.0.1", free_port()) as url,
        running(worker_kwargs(config, PolicyHolder(policy))),
        running(
            slack.worker_kwargs(
                job_serializer=json_dumps, job_deserializer=json_loads, poll_delay_s=0.2
            )
        ),
        Gate.connect(redis_url, agent="billing-bot") as gate,
        aiohttp.ClientSession() as http,
        Redis.from_url(redis_url, decode_responses=True) as redis,
    ):
        yield Env(fake, url, gate, Store(redis), redis, http, slack)


async def test_approve_resumes_waiting_agent(env: Env) -> None:
    """Approve in Slack: the waiting agent gets the approval; the message loses its buttons."""
    request_id = await env.submit()
    waiting = asyncio.create_task(env.gate.wait(request_id, timeout=10))
    message = await env.message(request_id)
    buttons = next(b for b in message["blocks"] if b["type"] == "actions")["elements"]
    assert [(b["action_id"], b["value"]) for b in buttons] == [
        (ACTION_APPROVE, request_id),
        (ACTION_REJECT, request_id),
    ]
    shown = message_text(message)
    assert "billing-bot" in shown
    assert "stripe.charge" in shown
    assert "big-charges" in shown
    assert "charges above 50 need a human" in shown
    assert '"amount": 5000' in shown
    assert not waiting.done()

    assert await env.click(request_id, ALICE) == 200
    decision = await waiting
    assert (decision.status, decision.decided_by, decision.rule) == (
        Status.APPROVED,
        ALICE,
        "big-charges",
    )
    updated = await env.decided_message(request_id)
    assert updated["ts"] == message["ts"]
    assert f"*Approved* by <@{ALICE}>" in message_text(updated)
    assert len(env.fake.ok_calls("chat.postMessage")) == 1


async def test_reject_with_reason_reaches_agent(env: Env) -> None:
    """Reject asks for a reason in a dialog; the agent's RequestDenied carries that reason."""
    request_id = await env.submit()
    assert await env.reject(request_id, ALICE, "card flagged by fraud team") == 200
    with pytest.raises(RequestDenied) as info:
        await env.gate.wait(request_id, timeout=10)
    decision = info.value.decision
    assert (decision.status, decision.decided_by) == (Status.REJECTED, ALICE)
    assert decision.reason == "card flagged by fraud team"
    updated = message_text(await env.decided_message(request_id))
    assert f"*Rejected* by <@{ALICE}>" in updated
    assert "card flagged by fraud team" in updated


async def test_reject_without_reason(env: Env) -> None:
    """The reason is optional: an empty dialog still rejects, saying who rejected."""
    request_id = await env.submit()
    assert await env.reject(request_id, ALICE, None) == 200
    record = await env.status(request_id, Status.REJECTED)
    assert record.reason == f"rejected by {ALICE}"


async def test_usergroup_member_may_approve(env: Env) -> None:
    """A member of @finance-leads (resolved through usergroups.list/users.list) approves."""
    request_id = await env.submit()
    assert await env.click(request_id, GROUPIE) == 200
    record = await env.status(request_id, Status.APPROVED)
    assert record.decided_by == GROUPIE
    lookups = env.fake.ok_calls("usergroups.users.list")
    assert [c.args["usergroup"] for c in lookups] == ["S0FINANCE"]


async def test_usergroup_members_are_cached(env: Env) -> None:
    """A second decision within the cache TTL does not ask Slack for the group again."""
    first, second = await env.submit(args={"amount": 60}), await env.submit(args={"amount": 70})
    await env.click(first, GROUPIE)
    await env.status(first, Status.APPROVED)
    await env.click(second, GROUPIE)
    await env.status(second, Status.APPROVED)
    assert len(env.fake.ok_calls("usergroups.users.list")) == 1
    assert len(env.fake.ok_calls("usergroups.list")) == 1


async def test_non_approver_click_changes_nothing(env: Env) -> None:
    """Someone not listed gets an ephemeral "not an approver"; the request stays untouched."""
    request_id = await env.submit()
    message = await env.message(request_id)
    assert await env.click(request_id, MALLORY) == 200
    assert "not an approver" in await env.ephemeral(MALLORY)
    assert await env.click(request_id, MALLORY, ACTION_REJECT) == 200
    assert "not an approver" in await env.ephemeral(MALLORY, 2)
    record = await env.record(request_id)
    assert (record.status, record.approvals) == (Status.PENDING, [])
    assert env.fake.ok_calls("views.open") == []
    assert env.fake.live_messages(CHANNEL) == [message]


async def test_default_approvers_when_rule_names_none(env: Env) -> None:
    """A rule without approvers is decided by SUDO_QUEUE_SLACK_APPROVERS, and by nobody else."""
    request_id = await env.submit("deploy", "prod", {"version": "1.2.3"})
    await env.click(request_id, ALICE)
    assert "not an approver" in await env.ephemeral(ALICE)
    await env.click(request_id, DEFAULT)
    record = await env.status(request_id, Status.APPROVED)
    assert record.decided_by == DEFAULT


async def test_group_lookup_failure_fails_closed(env: Env) -> None:
    """When Slack cannot list a group's members, its members cannot decide (and are told why)."""
    request_id = await env.submit()
    env.fake.fail_next("usergroups.users.list", status=200, error="fatal_error", retry_after=None)
    await env.click(request_id, GROUPIE)
    reply = await env.ephemeral(GROUPIE)
    assert "Could not check whether you are an approver" in reply
    assert "fatal_error" in reply
    record = await env.record(request_id)
    assert (record.status, record.approvals) == (Status.PENDING, [])


@pytest.mark.parametrize(
    ("secret", "age_s"),
    [("not-the-signing-secret", 0), (SECRET, 360)],
    ids=["forged-signature", "six-minutes-old"],
)
async def test_forged_or_stale_request_is_401(env: Env, secret: str, age_s: int) -> None:
    """A forged signature or a 6-minute-old timestamp gets 401 and changes nothing."""
    request_id = await env.submit()
    message = await env.message(request_id)
    payload = env.click_payload(message, ALICE)
    status = await env.post(payload, secret=secret, timestamp=int(time.time()) - age_s)
    assert status == 401
    record = await env.record(request_id)
    assert (record.status, record.approvals) == (Status.PENDING, [])
    assert env.fake.calls("chat.postEphemeral") == []


async def test_tampered_body_is_401(env: Env) -> None:
    """A body changed after signing (another user id) gets 401."""
    request_id = await env.submit()
    message = await env.message(request_id)
    body = form_body(env.click_payload(message, MALLORY))
    headers = signed_headers(body, SECRET)
    tampered = body.replace(MALLORY, ALICE)
    async with env.http.post(env.url, data=tampered, headers=headers) as response:
        assert response.status == 401
    assert (await env.record(request_id)).status is Status.PENDING


@pytest.mark.parametrize(
    "other", [{"team_id": "T0OTHERTEAM"}, {"app_id": "A0OTHERAPP"}], ids=["team", "app"]
)
async def test_other_workspace_or_app_is_refused(env: Env, other: dict[str, str]) -> None:
    """A correctly signed click from another team_id or api_app_id is refused (403)."""
    request_id = await env.submit()
    assert await env.click(request_id, ALICE, **other) == 403
    record = await env.record(request_id)
    assert (record.status, record.approvals) == (Status.PENDING, [])


async def test_double_click_and_replay_count_once(env: Env) -> None:
    """With a quorum of 2, a second click and an exact replay of the first count nothing."""
    request_id = await env.submit("vault", "open", {"vault": "prod"})
    message = await env.message(request_id)
    payload = env.click_payload(message, ALICE)
    body = form_body(payload)
    headers = signed_headers(body, SECRET)
    async with env.http.post(env.url, data=body, headers=headers) as response:
        assert response.status == 200
    assert "counted: 1 of 2" in await env.ephemeral(ALICE)

    async with env.http.post(env.url, data=body, headers=headers) as response:  # exact replay
        assert response.status == 200
    assert await env.click(request_id, ALICE) == 200  # a second, genuine click
    assert "already approved" in await env.ephemeral(ALICE, 2)
    record = await env.record(request_id)
    assert (record.status, record.approvals) == (Status.PENDING, [ALICE])

    await env.click(request_id, BOB)
    await env.decided_message(request_id)
    assert len(env.ephemerals(ALICE)) == 2, "the replay must not have run the listener"


async def test_quorum_of_two(env: Env) -> None:
    """min_approvals 2: the first approval shows on the message, the second resumes the agent."""
    request_id = await env.submit("vault", "open", {"vault": "prod"})
    waiting = asyncio.create_task(env.gate.wait(request_id, timeout=10))
    await env.click(request_id, ALICE)
    assert "counted: 1 of 2" in await env.ephemeral(ALICE)

    def shows_first_vote() -> bool:
        message = env.fake.live_messages(CHANNEL)[0]
        return has_buttons(message) and f"Approved so far by <@{ALICE}>" in message_text(message)

    await env.fake.wait_for(shows_first_vote)
    assert not waiting.done()

    await env.click(request_id, BOB)
    decision = await waiting
    assert (decision.status, decision.decided_by) == (Status.APPROVED, BOB)
    updated = message_text(await env.decided_message(request_id))
    assert f"*Approved* by <@{ALICE}>, <@{BOB}>" in updated


async def test_approve_racing_reject(env: Env) -> None:
    """Approve and reject sent together: one wins; the other is told and changes nothing."""
    request_id = await env.submit()
    opened = len(env.fake.ok_calls("views.open"))
    await env.click(request_id, GROUPIE, ACTION_REJECT)
    call = (await env.fake.wait_for(lambda: env.fake.ok_calls("views.open")[opened:]))[0]
    view = (
        json.loads(call.args["view"]) if isinstance(call.args["view"], str) else call.args["view"]
    )
    message = await env.message(request_id)
    statuses = await asyncio.gather(
        env.post(env.click_payload(message, ALICE)),
        env.post(view_submission(view, user=GROUPIE, reason="no")),
    )
    assert statuses == [200, 200]

    def settled() -> str | None:
        told = [t for u in (ALICE, GROUPIE) for t in env.ephemerals(u) if "already" in t]
        return told[0] if told else None

    loser_told = await env.fake.wait_for(settled)
    record = await env.record(request_id)
    assert record.status in (Status.APPROVED, Status.REJECTED)
    winner = ALICE if record.status is Status.APPROVED else GROUPIE
    assert record.decided_by == winner
    assert f"already {record.status.value}" in loser_told
    assert record.approvals == ([ALICE] if winner == ALICE else [])
    entries = await env.redis.xrange("sq:audit")
    terminal = [
        e
        for _, e in entries
        if e.get("request_id") == request_id and e.get("event") in ("approved", "rejected")
    ]
    assert len(terminal) == 1


async def test_click_on_decided_request_changes_nothing(env: Env) -> None:
    """After a CLI approval the message shows it, and a late click only gets an ephemeral."""
    request_id = await env.submit()
    message = await env.message(request_id)
    assert (await env.store.approve(request_id, actor="alice")).changed
    updated = message_text(await env.decided_message(request_id))
    assert "*Approved* by `alice`" in updated
    await env.post(env.click_payload(message, GROUPIE, ACTION_REJECT))
    assert "already approved by `alice`" in await env.ephemeral(GROUPIE)
    record = await env.record(request_id)
    assert (record.status, record.decided_by) == (Status.APPROVED, "alice")
    assert env.fake.ok_calls("views.open") == []


async def test_expiry_updates_message(env: Env) -> None:
    """A request nobody decides expires; its message says so and a late click is refused."""
    request_id = await env.submit("email", "send", {"to": "x@rival.example"})
    message = await env.message(request_id)
    with pytest.raises(RequestDenied) as info:
        await env.gate.wait(request_id, timeout=10)
    assert info.value.decision.status is Status.EXPIRED
    updated = message_text(await env.decided_message(request_id))
    assert "*Expired*: nobody decided before the deadline" in updated
    await env.post(env.click_payload(message, ALICE))
    assert "already expired" in await env.ephemeral(ALICE)
    assert (await env.record(request_id)).approvals == []


async def test_stale_digest_is_refused(env: Env) -> None:
    """A click whose block carries another args digest changes nothing: approvals bind to args."""
    request_id = await env.submit()
    payload = env.click_payload(await env.message(request_id), ALICE)
    payload["actions"][0]["block_id"] = "sudo_queue.decide:" + "0" * 64
    await env.post(payload)
    assert "no longer matches the request's args" in await env.ephemeral(ALICE)
    assert (await env.record(request_id)).status is Status.PENDING


async def test_rate_limited_post_is_retried_once(env: Env) -> None:
    """A 429 on posting is retried after Retry-After; the channel gets exactly one message."""
    env.fake.fail_next("chat.postMessage", status=429, retry_after=1)
    request_id = await env.submit()
    message = await env.message(request_id)
    first, second = env.fake.calls("chat.postMessage")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0, "Retry-After was not honoured"
    assert [request_of(m) for m in env.fake.live_messages(CHANNEL)] == [request_id]
    assert await env.click(request_id, ALICE) == 200
    assert (await env.decided_message(request_id))["ts"] == message["ts"]


async def test_lost_post_answer_is_adopted_not_reposted(env: Env) -> None:
    """Slack posted but its answer was lost: the retry adopts the message, no second post."""
    env.fake.drop_next("chat.postMessage")
    request_id = await env.submit()
    await env.fake.wait_for(lambda: env.fake.ok_calls("conversations.history"), timeout=15)
    message = await env.message(request_id)
    async with asyncio.timeout(10):
        while not (await env.slack.notifier.message_of(request_id)):  # noqa: ASYNC110  # Redis
            await asyncio.sleep(0.02)
    assert await env.slack.notifier.message_of(request_id) == (CHANNEL, message["ts"])
    assert len(env.fake.calls("chat.postMessage")) == 1
    assert await env.click(request_id, ALICE) == 200
    updated = await env.decided_message(request_id)
    assert updated["ts"] == message["ts"]
    assert len(env.fake.live_messages(CHANNEL)) == 1


async def test_long_retry_after_goes_back_to_the_queue(env: Env) -> None:
    """A 429 asking for 30 s is not slept through: the job is deferred by Retry-After in arq."""
    env.fake.fail_next("chat.postMessage", status=429, retry_after=30)
    request_id = await env.submit()
    await env.fake.wait_for(lambda: env.fake.calls("chat.postMessage"))
    job = f"sq-notify:{NOTIFY_FUNCTION}:{request_id}:pending"
    async with asyncio.timeout(10):
        while True:  # the retry re-enqueues the job with a later score
            score = await env.redis.zscore("sq:slack", job)
            now_ms = await env.store.server_time_ms()
            if score is not None and score > now_ms + 1000:
                break
            await asyncio.sleep(0.02)
    assert 29_000 <= score - now_ms <= 32_000
    assert env.fake.live_messages(CHANNEL) == []
    assert await env.redis.hget(f"sq:slack:msg:{request_id}", "posting") is None


async def test_channel_name_is_resolved_once(env: Env) -> None:
    """A rule's `channel: "#general"` posts there; the name is looked up once per process."""
    first = await env.submit("slack", "announce", {"text": "hello"})
    second = await env.submit("slack", "announce", {"text": "again"})

    def both() -> bool:
        return {request_of(m) for m in env.fake.live_messages("C0GENERAL")} == {first, second}

    await env.fake.wait_for(both)
    assert len(env.fake.ok_calls("conversations.list")) == 1
    assert env.fake.live_messages(CHANNEL) == []


async def test_unknown_channel_fails_without_retrying(env: Env) -> None:
    """A channel the bot cannot see is a permanent error: the job fails once, nothing is posted."""
    request_id = await env.submit("slack", "lost", {})
    await env.status(request_id, Status.PENDING)
    ctx: Any = {"slack": env.slack.notifier, "job_try": 1}
    assert await notify_slack(ctx, request_id, "pending") == "failed"
    assert env.fake.calls("chat.postMessage") == []


async def test_args_cannot_ping_link_or_format(env: Env) -> None:
    """Args text is escaped and fenced: no <!channel>, mention, link, bold or fence escape."""
    args = {
        "note": "<!channel> <@U0MALLORY> <https://evil.example|click> *bold* ``` & done",
        "password": "hunter2",
        "headers": {"Authorization": "Bearer abcdefghijklmnop"},
        "rtl": "abc\u202edef",
    }
    request_id = await env.submit("deploy", "prod", args)
    message = await env.message(request_id)
    args_block = next(
        b["text"]["text"]
        for b in message["blocks"]
        if "text" in b and b["text"]["text"].startswith("*Args*")
    )
    assert "<" not in args_block
    assert ">" not in args_block
    assert "&lt;!channel&gt; &lt;@U0MALLORY&gt; &lt;https://evil.example|click&gt;" in args_block
    assert "&amp; done" in args_block
    assert args_block.count("```") == 2, "only the fence itself may contain three backticks"
    assert "hunter2" not in args_block
    assert "abcdefghijklmnop" not in args_block
    assert "[REDACTED]" in args_block
    assert "\\u202e" in args_block
    assert all(b.get("text", {}).get("verbatim", True) for b in message["blocks"])
    context = message_text(message)
    assert "secrets redacted" in context
    record = await env.record(request_id)
    assert record.args_digest in context


async def test_long_args_are_truncated_with_digest(env: Env) -> None:
    """A 60 KB payload is cut to fit Slack's limits; the message says so and shows the digest."""
    request_id = await env.submit("deploy", "prod", {"blob": "x<" * 30_000})
    message = await env.message(request_id)
    args_block = next(
        b["text"]["text"]
        for b in message["blocks"]
        if "text" in b and b["text"]["text"].startswith("*Args*")
    )
    assert len(args_block) <= 3000
    assert "more characters not shown" in args_block
    shown = message_text(message)
    assert "args truncated" in shown
    assert (await env.record(request_id)).args_digest in shown


async def test_socket_mode_click_approves(
    redis_url: str, fake: FakeSlack, settings: SlackSettings, tmp_path: Path
) -> None:
    """In Socket Mode the app connects with the app token; a click over the socket approves."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    config = WorkerConfig(redis_url=redis_url, policy_path=policy, notify=(notify_target(),))
    socket_settings = settings.model_copy(
        update={"app_token": SecretStr(APP_TOKEN), "signing_secret": None}
    )
    async with (
        SlackApprovals(socket_settings, redis_url=redis_url, socket=True) as slack,
        slack.serve_socket(),
        running(worker_kwargs(config, PolicyHolder(policy))),
        running(slack.worker_kwargs(job_serializer=json_dumps, job_deserializer=json_loads)),
        Gate.connect(redis_url, agent="billing-bot") as gate,
    ):
        request_id = await gate.submit("stripe", "charge", {"amount": 5000})
        message = await fake.wait_for(lambda: fake.live_messages(CHANNEL))
        payload = block_actions(
            copy.deepcopy(message[0]), CHANNEL, user=ALICE, action_id=ACTION_APPROVE
        )
        envelope_id = await fake.send_socket(payload)
        decision = await gate.wait(request_id, timeout=10)
        assert (decision.status, decision.decided_by) == (Status.APPROVED, ALICE)
        acks = await fake.wait_for(
            lambda: [a for a in fake.socket_acks if a.get("envelope_id") == envelope_id]
        )
        assert len(acks) == 1


async def test_replayed_click_is_logged_and_ignored(env: Env) -> None:
    """The exact same signed request twice: the second is answered 200 without running anything."""
    request_id = await env.submit("vault", "open", {"vault": "prod"})
    body = form_body(env.click_payload(await env.message(request_id), ALICE))
    headers = signed_headers(body, SECRET)
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            async with env.http.post(env.url, data=body, headers=headers) as response:
                assert response.status == 200
    assert [e["event"] for e in logs if e["event"] == "slack_replay_ignored"] == [
        "slack_replay_ignored"
    ]


def test_notify_names_agree() -> None:
    """The worker's `--notify slack` target names the queue and function the notifier serves."""
    assert notify_target("ns") == ("ns:slack", "notify_slack")
    assert notify_slack.__name__ == NOTIFY_FUNCTION


def test_notify_setting_reaches_worker_config() -> None:
    """SUDO_QUEUE_NOTIFY=slack and --notify slack both give the policy worker the Slack target."""
    parser = build_parser(Settings(notify="slack"))
    args = parser.parse_args(["--namespace", "ns", "worker"])
    assert args.notify is None
    assert args.notify_env == "slack"
    assert _notify_targets(args.notify_env.split(","), "ns") == (("ns:slack", "notify_slack"),)
    args = build_parser(Settings()).parse_args(["worker", "--notify", "slack"])
    assert _notify_targets(args.notify, "sq") == (("sq:slack", "notify_slack"),)


def slack_env(redis_url: str, **values: str | None) -> dict[str, str]:
    """A clean environment for `sudo-queue slack`: valid settings, then `values` (None: unset)."""
    env = {
        k: v
        for k, v in cli_env(redis_url).items()
        if not k.startswith(("SLACK_", "SUDO_QUEUE_SLACK"))
    }
    env |= {
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SECRET,
        "SUDO_QUEUE_SLACK_CHANNEL": CHANNEL,
        "SUDO_QUEUE_SLACK_API_URL": "http://127.0.0.1:9/api/",
    }
    for name, value in values.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.mark.parametrize(
    ("values", "socket", "named"),
    [
        ({"SLACK_BOT_TOKEN": None}, False, "SLACK_BOT_TOKEN is not set"),
        ({"SLACK_BOT_TOKEN": "xoxp-user-token"}, False, "SLACK_BOT_TOKEN must be a bot token"),
        ({"SUDO_QUEUE_SLACK_CHANNEL": None}, False, "SUDO_QUEUE_SLACK_CHANNEL is not set"),
        ({"SUDO_QUEUE_SLACK_CHANNEL": "not a channel"}, False, "SUDO_QUEUE_SLACK_CHANNEL"),
        ({"SUDO_QUEUE_SLACK_API_URL": "ftp://x"}, False, "SUDO_QUEUE_SLACK_API_URL"),
        ({"SUDO_QUEUE_SLACK_APPROVERS": "alice"}, False, "SUDO_QUEUE_SLACK_APPROVERS"),
        ({"SUDO_QUEUE_SLACK_TEAM_ID": "t1"}, False, "SUDO_QUEUE_SLACK_TEAM_ID"),
        ({"SLACK_SIGNING_SECRET": None}, False, "SLACK_SIGNING_SECRET is not set"),
        ({}, True, "SLACK_APP_TOKEN is not set"),
        ({"SLACK_APP_TOKEN": "xoxb-wrong"}, True, "SLACK_APP_TOKEN must be an app-level"),
    ],
)
def test_bad_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str | None], socket: bool, named: str
) -> None:
    """A missing or malformed setting raises SlackSetupError naming the variable."""
    for name, value in slack_env("redis://127.0.0.1:9/0", **values).items():
        monkeypatch.setenv(name, value)
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
    with pytest.raises(SlackSetupError, match=named):
        load_settings(socket=socket)


def test_bad_setting_stops_the_command(redis_url: str) -> None:
    """`sudo-queue slack` without its bot token exits 2 at start, naming the variable."""
    result = subprocess.run(
        [sys.executable, "-m", "sudo_queue", "slack", "--port", str(free_port())],
        env=slack_env(redis_url, SLACK_BOT_TOKEN=None),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "SLACK_BOT_TOKEN is not set" in result.stderr


async def test_refused_token_stops_the_app(redis_url: str, fake: FakeSlack) -> None:
    """A bot token Slack refuses (auth.test: invalid_auth) stops the app at start, exit 2."""
    env = slack_env(
        redis_url, SLACK_BOT_TOKEN="xoxb-revoked", SUDO_QUEUE_SLACK_API_URL=fake.api_url
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sudo_queue", "slack", "--port", str(free_port()),
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "Slack refused SLACK_BOT_TOKEN (invalid_auth)" in stderr.decode()


def test_unknown_notify_channel_is_refused(redis_url: str) -> None:
    """SUDO_QUEUE_NOTIFY naming a channel that does not exist stops the worker, exit 2."""
    env = cli_env(redis_url) | {"SUDO_QUEUE_NOTIFY": "teams"}
    result = subprocess.run(
        [sys.executable, "-m", "sudo_queue", "worker"],
        env=env, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown approval channel 'teams'" in result.stderr


def test_example_runs(redis_url: str) -> None:
    """examples/slack_approve.py runs worker, app, fake Slack and agent; the agent is approved."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "slack_approve.py")],
        env=cli_env(redis_url),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agent: approved by U0123ABCD (rule big-charges)" in result.stdout
    assert "*Approved* by <@U0123ABCD>" in result.stdout


async def test_cancel_updates_message(env: Env) -> None:
    """An agent that cancels its request: the message drops its buttons and says so."""
    request_id = await env.submit()
    await env.message(request_id)
    await env.gate.cancel(request_id)
    updated = message_text(await env.decided_message(request_id))
    assert "*Cancelled* by `billing-bot`" in updated


async def test_slack_command_serves_and_stops_on_sigterm(redis_url: str, fake: FakeSlack) -> None:
    """`sudo-queue slack` answers on --port and exits 0 on SIGTERM."""
    port = free_port()
    env = slack_env(redis_url, SUDO_QUEUE_SLACK_API_URL=fake.api_url)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sudo_queue", "slack", "--port", str(port),
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:
                assert process.returncode is None, "the app exited early"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            unsigned = {"payload": "{}"}
            async with http.post(f"http://127.0.0.1:{port}/slack/events", data=unsigned) as r:
                assert r.status == 401
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"slack_app_listening" in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("audit_key", ["an-audit-key-of-32-bytes-length!"])
async def test_slack_votes_keep_a_keyed_audit_chain_intact(env: Env, audit_key: str) -> None:
    """With SUDO_QUEUE_AUDIT_KEY, a Slack approval leaves a chain that a keyed verify accepts."""
    from sudo_queue.audit import AuditLog

    request_id = await env.submit()
    await env.message(request_id)
    assert await env.click(request_id, ALICE) == 200
    await env.decided_message(request_id)
    keyed = await AuditLog(env.redis, key=audit_key).verify()
    assert keyed.ok, keyed.problem
    unkeyed = await AuditLog(env.redis, key="some-other-key-of-32-bytes-len!!").verify()
    assert not unkeyed.ok
