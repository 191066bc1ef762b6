"""`sudo-queue demo`, run the way a newcomer runs it, on each of its three kinds of Redis."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from sudo_queue.adapters.slack_blocks import ACTION_APPROVE
from sudo_queue.embedded import RedisKind, local_redis
from sudo_queue.workers.policy import PolicyHolder, WorkerConfig, worker_kwargs

from .helpers import POLICY, ROOT, free_port, need
from .slack_fake import APP_TOKEN, BOT_TOKEN, FakeSlack, block_actions

CHANNEL = "C0APPROVALS"

SECRET = "sk_test_demo_0000000000000000000000"  # the demo agent's api_key arg


def demo_env(path: str | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without any sudo-queue or Slack settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUDO_QUEUE_", "SLACK_"))}
    if path is not None:
        env["PATH"] = path
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_demo(
    *args: str, env: dict[str, str], stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sudo_queue", "demo", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def assert_whole_loop(out: str) -> None:
    """What a user must see: the three decisions, the resumed agent and the audit trail."""
    assert "allowed by the policy (rule small-charges)" in out
    assert "denied by the policy (rule never-drop): dropping tables is never done by an agent" in (
        out
    )
    assert "waiting for a human. Rule 'big-charges'" in out
    assert "agent billing-bot: resumed" in out
    assert "approved by tester (rule big-charges)" in out
    assert "audit trail (8 entries" in out
    assert "done in" in out
    assert "1 allowed, 1 denied, 1 approved." in out
    assert "[REDACTED]" in out
    assert SECRET not in out  # the demo's secret arg is never shown


def test_demo_yes_on_a_throwaway_redis_server() -> None:
    """With no Redis configured, the demo starts its own redis-server and runs to the end."""
    if shutil.which("redis-server") is None:
        need("redis-server on PATH")
    result = run_demo("--yes", "--as", "tester", env=demo_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a throwaway redis-server at redis://127.0.0.1:" in result.stdout
    assert_whole_loop(result.stdout)


@pytest.mark.redis_server
def test_demo_yes_on_the_configured_redis_leaves_its_data_alone(redis_url: str) -> None:
    """With SUDO_QUEUE_REDIS_URL, the demo works in a namespace of its own and removes it,
    leaving every key that was there before as it was."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set("someone:else", "untouched")
    client.zadd("sq:pending", {"their-request": 1})
    result = run_demo("--yes", "--as", "tester", env=demo_env(SUDO_QUEUE_REDIS_URL=redis_url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"the configured Redis at {redis_url}" in result.stdout
    assert "keys     namespace 'sq-demo-" in result.stdout
    assert_whole_loop(result.stdout)
    assert "removed the demo's" in result.stdout
    assert sorted(client.keys("*")) == ["someone:else", "sq:pending"]
    assert client.get("someone:else") == "untouched"
    assert client.zrange("sq:pending", 0, -1) == ["their-request"]
    client.close()


@pytest.mark.redis_server
def test_demo_refuses_a_namespace_another_worker_serves(redis_url: str) -> None:
    """An explicit namespace that a live worker serves is refused: the demo's worker would
    otherwise decide that worker's requests with the demo policy."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set("prod:queue:health-check", "alive", px=11_000)
    result = run_demo(
        "--yes", env=demo_env(SUDO_QUEUE_REDIS_URL=redis_url, SUDO_QUEUE_NAMESPACE="prod")
    )
    assert result.returncode == 1
    assert "a policy worker already serves namespace 'prod'" in result.stderr
    assert client.keys("*") == ["prod:queue:health-check"]
    client.close()


def test_demo_yes_in_memory_without_redis(tmp_path: Path) -> None:
    """No reachable Redis and no redis-server on PATH: fakeredis, with a clear notice."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    result = run_demo(
        "--yes",
        "--as",
        "tester",
        env=demo_env(path=str(tmp_path), SUDO_QUEUE_REDIS_URL=dead),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note     {dead} does not answer" in result.stdout
    assert "note     no redis-server on PATH" in result.stdout
    assert "an in-memory Redis (fakeredis)" in result.stdout
    assert "NOTICE   state is in memory and ends with this process" in result.stdout
    assert_whole_loop(result.stdout)


def test_demo_prompt_reject_with_reason(tmp_path: Path) -> None:
    """At the prompt, 'r' and a reason reject the request; the agent reports that reason."""
    result = run_demo("--as", "tester", env=demo_env(path=str(tmp_path)), stdin="r\ncard flagged\n")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "+-- approval needed" in out
    assert "| call      stripe.charge" in out
    assert "| rule      big-charges: charges above 50 need a human" in out
    assert '"api_key": "[REDACTED]"' in out
    assert SECRET not in out
    assert "approve or reject? [a/r] r" in out
    assert "rejected by tester: card flagged" in out
    assert "agent billing-bot: resumed" in out
    assert "rejected by tester (rule big-charges): card flagged" in out
    assert "the call does not happen" in out
    assert "1 allowed, 1 denied, 1 rejected." in out


def test_demo_prompt_end_of_input_rejects(tmp_path: Path) -> None:
    """With nobody at the prompt (stdin closed), the request is rejected, never approved."""
    result = run_demo("--as", "tester", env=demo_env(path=str(tmp_path)), stdin="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rejected by tester: no answer at the terminal prompt (end of input)" in result.stdout
    assert "approved by" not in result.stdout


async def test_throwaway_redis_server_is_stopped_at_the_end() -> None:
    """The demo's own redis-server answers inside the block and is gone after it."""
    async with local_redis() as local:
        if local.kind is not RedisKind.SERVER:
            need("redis-server on PATH")
        assert local.url is not None
        assert await local.client.ping()
        url = local.url
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


@pytest.mark.redis_server
async def test_demo_with_slack_posts_and_a_click_approves(redis_url: str) -> None:
    """With Slack settings, the demo posts the approval to Slack instead of prompting, and an
    approver's click (Socket Mode) resumes the agent."""
    async with FakeSlack() as fake:
        fake.add_usergroup("finance-leads", "S0FINANCE", ["U0GROUPIE"])
        env = demo_env(
            SUDO_QUEUE_REDIS_URL=redis_url,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_APP_TOKEN=APP_TOKEN,
            SUDO_QUEUE_SLACK_CHANNEL=CHANNEL,
            SUDO_QUEUE_SLACK_API_URL=fake.api_url,
        )
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sudo_queue",
            "demo",
            "--as",
            "tester",
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,  # a prompt would read end-of-input and reject
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            posted = await fake.wait_for(lambda: fake.live_messages(CHANNEL), timeout=20)
            click = block_actions(
                copy.deepcopy(posted[0]), CHANNEL, user="U0123ABCD", action_id=ACTION_APPROVE
            )
            await fake.send_socket(click)
            out, err = await asyncio.wait_for(demo.communicate(), 30)
        finally:
            if demo.returncode is None:
                demo.kill()
                await demo.wait()
    text = out.decode()
    assert demo.returncode == 0, text + err.decode()
    assert f"slack    Socket Mode; approval messages go to {CHANNEL}" in text
    assert f"posted to Slack ({CHANNEL}): approve or reject there" in text
    assert "+-- approval needed" not in text
    assert "approved by U0123ABCD (rule big-charges)" in text
    assert "1 allowed, 1 denied, 1 approved." in text


def test_sweep_jobs_are_per_namespace() -> None:
    """The demo's worker (namespace sq-demo-...) and a real one (sq) on the same Redis never
    share a sweep job id: arq's job keys are global, so a shared id made one skip the other's
    ticks."""
    ids = {
        worker_kwargs(
            WorkerConfig(redis_url="redis://127.0.0.1:1/0", policy_path=POLICY, namespace=ns),
            PolicyHolder(POLICY),
        )["cron_jobs"][0].name
        for ns in ("sq", "sq-demo-1a2b3c")
    }
    assert ids == {"sq:sweep", "sq-demo-1a2b3c:sweep"}
