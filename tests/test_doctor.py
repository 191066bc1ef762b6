"""`sudo-queue doctor`: the checklist a user reads, against real servers and a fake Slack API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import yaml

from sudo_queue.doctor import SLACK_SCOPES

from .helpers import (
    ROOT,
    RedisServer,
    cli_env,
    free_port,
    need,
    run_cli,
    start_worker,
    stop_process,
)

GOOD_TOKEN = "xoxb-good-0000"
NARROW_TOKEN = "xoxb-narrow-0000"


def wait_for_worker(url: str, namespace: str = "sq", limit: float = 10) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + limit
    while not client.exists(f"{namespace}:queue:health-check"):
        assert time.monotonic() < deadline, "the worker never wrote its health-check key"
        time.sleep(0.05)
    client.close()


def lines(output: str) -> list[str]:
    return [" ".join(line.split()) for line in output.splitlines()]


@pytest.mark.redis_server
def test_doctor_passes_against_a_running_worker(redis_url: str, tmp_path: Path) -> None:
    """A reachable Redis, a loadable policy and a live worker: exit 0 and an all-ok list
    (the test server runs without AOF, which is a warning, not a failure)."""
    worker = start_worker(redis_url, log_path=tmp_path / "worker.log")
    try:
        wait_for_worker(redis_url)
        result = run_cli(redis_url, "doctor")
    finally:
        stop_process(worker)
    assert result.returncode == 0, result.stdout + result.stderr
    out = lines(result.stdout)
    assert any(line.startswith("[ ok ] redis Redis 7") for line in out), out
    assert any(line.startswith("[warn] persistence AOF is off") for line in out), out
    assert any(line.startswith("[ ok ] policy config/policy.yaml loads: 6 rules") for line in out)
    assert any(
        line.startswith("[ ok ] worker a policy worker is alive (j_complete=") for line in out
    )
    assert "[skip] slack not configured (SLACK_BOT_TOKEN is unset)" in out
    assert out[-1] == "no failures, 1 warning"


def test_doctor_fails_clearly_with_redis_stopped() -> None:
    """Nothing listening at the URL: exit 3 and a FAIL line saying what to do."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli(url, "doctor")
    assert result.returncode == 3
    out = lines(result.stdout)
    redis_line = next(line for line in out if line.startswith("[FAIL] redis"))
    assert f"cannot reach Redis at {url}" in redis_line
    assert "start it or fix SUDO_QUEUE_REDIS_URL" in redis_line
    assert "[skip] worker skipped: Redis is unreachable" in out
    assert out[-1] == "1 failure, no warnings"


@pytest.mark.redis_server
def test_doctor_fails_without_a_worker(redis_url: str) -> None:
    """No worker heartbeat on the namespace is a failure: no request would ever be decided."""
    result = run_cli(redis_url, "doctor")
    assert result.returncode == 1
    worker_line = next(line for line in lines(result.stdout) if "worker" in line)
    assert worker_line.startswith("[FAIL] worker no policy worker has reported on namespace 'sq'")
    assert "start `sudo-queue worker --policy FILE`" in worker_line


@pytest.mark.redis_server
def test_doctor_names_a_broken_policy(redis_url: str, tmp_path: Path) -> None:
    """A policy that does not load fails with the loader's message naming the file."""
    bad = tmp_path / "policy.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    decision: perhaps\n")
    result = run_cli(redis_url, "doctor", "--policy", str(bad))
    assert result.returncode == 1
    policy_line = next(line for line in lines(result.stdout) if line.startswith("[FAIL] policy"))
    assert str(bad) in policy_line


@pytest.mark.redis_server
def test_doctor_sees_aof_on(tmp_path: Path) -> None:
    """A Redis with appendonly yes and appendfsync everysec passes the persistence check."""
    server = RedisServer(port=free_port(), directory=tmp_path, appendonly=True)
    server.start()
    try:
        result = run_cli(server.url, "doctor")
    finally:
        server.stop()
    assert "[ ok ] persistence AOF on (appendfsync everysec)" in lines(result.stdout)
    assert "[ ok ] eviction maxmemory-policy noeviction" in lines(result.stdout)


@pytest.mark.redis_server
def test_doctor_tolerates_config_being_disabled(tmp_path: Path) -> None:
    """Where CONFIG is disabled (managed Redis), persistence is a warning, not a crash."""
    binary = shutil.which("redis-server")
    if binary is None:
        need("redis-server on PATH")
        return
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    process = subprocess.Popen(
        [*argv, "--save", "", "--rename-command", "CONFIG", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        client.close()
        result = run_cli(f"redis://127.0.0.1:{port}/0", "doctor")
    finally:
        process.terminate()
        process.wait(10)
    persistence = next(line for line in lines(result.stdout) if "persistence" in line)
    assert persistence.startswith("[warn] persistence cannot read CONFIG")
    assert "appendonly yes" in persistence


class FakeSlack(BaseHTTPRequestHandler):
    """Slack's auth.test, as far as the doctor uses it."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if self.path != "/api/auth.test" or token not in (GOOD_TOKEN, NARROW_TOKEN):
            body, scopes = {"ok": False, "error": "invalid_auth"}, ""
        else:
            body = {"ok": True, "user": "sudoqueue", "user_id": "U0BOT", "team": "Acme"}
            scopes = ",".join(SLACK_SCOPES) if token == GOOD_TOKEN else "users:read"
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-oauth-scopes", scopes)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slack_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSlack)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/"
    server.shutdown()
    server.server_close()


def doctor_with_slack(redis_url: str, api: str, token: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(redis_url)
    env.update(
        SLACK_BOT_TOKEN=token,
        SLACK_SIGNING_SECRET="signing-secret-0000",
        SUDO_QUEUE_SLACK_API_URL=api,
    )
    env.pop("SLACK_APP_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "sudo_queue", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.redis_server
def test_doctor_checks_the_slack_token(redis_url: str, slack_api: str) -> None:
    """With SLACK_BOT_TOKEN set, auth.test runs against SUDO_QUEUE_SLACK_API_URL: a good token
    passes, a token without chat:write warns, a refused one fails; no token is ever printed."""
    good = doctor_with_slack(redis_url, slack_api, GOOD_TOKEN)
    assert "[ ok ] slack auth.test ok: bot sudoqueue (U0BOT) in Acme" in lines(good.stdout)
    assert not any("slack scopes" in line for line in lines(good.stdout))
    assert GOOD_TOKEN not in good.stdout + good.stderr

    narrow = doctor_with_slack(redis_url, slack_api, NARROW_TOKEN)
    assert any(
        line.startswith("[warn] slack scopes the bot token lacks chat:write")
        for line in lines(narrow.stdout)
    )

    refused = doctor_with_slack(redis_url, slack_api, "xoxb-revoked-0000")
    assert refused.returncode == 1
    slack_line = next(line for line in lines(refused.stdout) if line.startswith("[FAIL] slack"))
    assert "refused the bot token (invalid_auth)" in slack_line
    assert "xoxb-revoked-0000" not in refused.stdout + refused.stderr


def test_doctor_checks_every_scope_the_manifest_asks_for() -> None:
    """The scopes doctor checks are exactly the bot scopes of config/slack-manifest.yaml."""
    manifest = yaml.safe_load((ROOT / "config" / "slack-manifest.yaml").read_text())
    assert set(SLACK_SCOPES) == set(manifest["oauth_config"]["scopes"]["bot"])
