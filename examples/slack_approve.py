"""Slack approvals end to end, with a fake Slack: worker + Slack app + agent + one Approve click.

    python examples/slack_approve.py

It starts a local fake of the Slack Web API (tests/slack_fake.py, on 127.0.0.1), then
`sudo-queue worker --notify slack` and `sudo-queue slack` pointed at it through
SUDO_QUEUE_SLACK_API_URL. An agent asks to charge 5000 (config/policy.yaml sends that to a
human); once the app has posted the approval message, the script clicks Approve as U0123ABCD
with a request signed the way Slack signs it, and the agent prints its approved Decision.

Redis: SUDO_QUEUE_REDIS_URL (default redis://127.0.0.1:6379/0); keys go to the namespace
`slack-example`. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from sudo_queue import Gate
from sudo_queue.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent
# The fake Slack lives with the tests (they share it); the repository root makes it importable.
sys.path.insert(0, str(ROOT))

from tests.slack_fake import (  # noqa: E402  # needs the sys.path entry above
    BOT_TOKEN,
    FakeSlack,
    block_actions,
    form_body,
    signed_headers,
)

NAMESPACE = "slack-example"
CHANNEL = "C0APPROVALS"
APPROVER = "U0123ABCD"  # listed in config/policy.yaml's big-charges rule
SIGNING_SECRET = "example-signing-secret-not-a-real-one"  # noqa: S105  # the fake Slack's, not a secret


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`sudo-queue --namespace slack-example ARGS`, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sudo_queue", "--namespace", NAMESPACE, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


async def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        while True:
            if process.poll() is not None:
                raise SystemExit(f"`sudo-queue slack` exited; its log is {log}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


def request_of(message: dict[str, Any]) -> str:
    return str(message.get("metadata", {}).get("event_payload", {}).get("request_id", ""))


async def main() -> int:
    redis_url = os.environ.get("SUDO_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
    configure_logging("console", "warning")
    logs = Path(tempfile.mkdtemp(prefix="sudo-queue-slack-example-"))
    port = free_port()
    async with FakeSlack() as fake:
        fake.add_usergroup("finance-leads", "S0FINANCE", ["U0FINANCE1"])
        env = {
            **os.environ,
            "SUDO_QUEUE_REDIS_URL": redis_url,
            "SUDO_QUEUE_LOG_FORMAT": "json",
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SUDO_QUEUE_SLACK_CHANNEL": CHANNEL,
            "SUDO_QUEUE_SLACK_API_URL": fake.api_url,
        }
        worker = start(
            ["worker", "--policy", "config/policy.yaml", "--notify", "slack"], env, logs / "w.log"
        )
        app = start(["slack", "--port", str(port)], env, logs / "slack.log")
        try:
            await wait_until_serving(f"http://127.0.0.1:{port}/healthz", app, logs / "slack.log")
            print(
                f"fake Slack at {fake.api_url}; Slack app at http://127.0.0.1:{port}/slack/events"
            )
            async with Gate.connect(redis_url, agent="billing-bot", namespace=NAMESPACE) as gate:
                request_id = await gate.submit("stripe", "charge", {"amount": 5000})
                print(f"agent: asked to charge 5000, request {request_id}; waiting")

                def posted() -> dict[str, Any] | None:
                    mine = [m for m in fake.live_messages(CHANNEL) if request_of(m) == request_id]
                    return mine[0] if mine else None

                message = await fake.wait_for(posted, timeout=20)
                print(f"slack: approval message posted in {CHANNEL} (ts {message['ts']})")

                click = block_actions(
                    message, CHANNEL, user=APPROVER, action_id="sudo_queue.approve"
                )
                body = form_body(click)
                async with aiohttp.ClientSession() as http:
                    url = f"http://127.0.0.1:{port}/slack/events"
                    headers = signed_headers(body, SIGNING_SECRET)
                    async with http.post(url, data=body, headers=headers) as response:
                        print(f"slack: {APPROVER} clicked Approve (HTTP {response.status})")

                decision = await gate.wait(request_id, timeout=20)
                print(f"agent: {decision}")

                def updated() -> bool:
                    return not any(b["type"] == "actions" for b in message["blocks"])

                await fake.wait_for(updated, timeout=20)
                print("slack: message updated:", message["blocks"][-1]["text"]["text"])
                return 0 if decision.granted else 1
        finally:
            for process in (app, worker):
                process.send_signal(signal.SIGTERM)
            for process in (app, worker):
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
