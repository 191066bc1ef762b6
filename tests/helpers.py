"""Shared test helpers: a private redis-server, CLI and worker subprocesses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from sudo_queue.models import Status
from sudo_queue.store import Store, TransitionResult

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "config" / "policy.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(what: str) -> None:
    """A test that cannot get what it needs fails in CI and skips on a developer's machine."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is required in CI", pytrace=False)
    pytest.skip(f"{what} is not available")


@dataclass
class RedisServer:
    """A redis-server of our own on a free port; never another server's data."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            need("redis-server (apt-get install redis-server)")
            raise AssertionError("unreachable")
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    need(f"a private redis-server on port {self.port}")
                time.sleep(0.02)
        client.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def flush(self) -> None:
        with redis.Redis(port=self.port) as client:
            client.flushall()


def cli_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SUDO_QUEUE_REDIS_URL"] = redis_url
    env["SUDO_QUEUE_LOG_FORMAT"] = "json"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(redis_url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sudo_queue", *args],
        env=cli_env(redis_url),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def start_worker(
    redis_url: str, policy: Path = POLICY, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115  # closed by the process
    return subprocess.Popen(
        [sys.executable, "-m", "sudo_queue", "worker", "--policy", str(policy)],
        env=cli_env(redis_url),
        stdout=out,
        stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
        cwd=ROOT,
    )


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(5)
    return process.returncode


async def decide_as_policy(
    store: Store,
    request_id: str,
    status: Status,
    *,
    expires_in_s: float = 60.0,
    approvers: Sequence[str] = (),
    min_approvals: int = 1,
) -> TransitionResult:
    """Apply a policy verdict to a queued request from its stored record, as the worker does."""
    record = await store.get(request_id)
    assert record is not None, f"no record for {request_id}"
    return await store.decide(
        request_id,
        status=status,
        agent=record.agent,
        resource=record.resource,
        action=record.action,
        args_digest=record.args_digest,
        rule="test-rule",
        reason="decided by the test",
        policy_version="test",
        actor="policy",
        expires_in_s=expires_in_s,
        approvers=approvers,
        min_approvals=min_approvals,
    )
