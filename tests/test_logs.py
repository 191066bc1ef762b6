"""Logs: JSON lines or human-readable (SUDO_QUEUE_LOG_FORMAT), with the request id on each line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sudo_queue import Gate
from sudo_queue.workers.runner import job_log_context

from .helpers import start_worker, stop_process

SCRIPT = """
import logging, sys, structlog
from sudo_queue.logs import configure_logging
configure_logging(sys.argv[1], "info")
with structlog.contextvars.bound_contextvars(request_id="r1", job_id="sq-eval:r1"):
    structlog.get_logger("sudo_queue.x").info("request_decided", status="allowed")
    logging.getLogger("arq.worker").warning("job %s failed", "sq-eval:r1")
structlog.get_logger("sudo_queue.x").info("worker_stopped")
"""


def run_script(fmt: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stderr.splitlines()


def test_json_lines_carry_the_bound_request_id() -> None:
    """In JSON mode every line is JSON, ours and arq's, and both carry the bound request id."""
    decided, failed, stopped = (json.loads(line) for line in run_script("json"))
    assert (decided["event"], decided["request_id"], decided["job_id"]) == (
        "request_decided",
        "r1",
        "sq-eval:r1",
    )
    assert (failed["event"], failed["logger"], failed["request_id"]) == (
        "job sq-eval:r1 failed",
        "arq.worker",
        "r1",
    )
    assert failed["level"] == "warning"
    assert "request_id" not in stopped  # the binding ends with the job


def test_console_format_is_plain_text_off_a_terminal() -> None:
    """SUDO_QUEUE_LOG_FORMAT=console writes human-readable lines, without colour codes in a pipe."""
    lines = run_script("console")
    assert len(lines) == 3
    assert "request_decided" in lines[0]
    assert "request_id=r1" in lines[0]
    assert "request_id=r1" in lines[1]
    assert "\x1b[" not in "".join(lines)
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


@pytest.mark.parametrize(
    ("job_id", "request_id"),
    [
        ("sq-eval:4f1c", "4f1c"),
        ("sq-expire:4f1c", "4f1c"),
        ("sq-notify:notify_slack:4f1c:pending", "4f1c"),
        ("cron:sweep:1795234035123", None),
    ],
)
def test_job_log_context_finds_the_request(job_id: str, request_id: str | None) -> None:
    """A job's log context names the request its id was derived from (none for cron jobs)."""
    context = job_log_context(job_id)
    assert context["job_id"] == job_id
    assert context.get("request_id") == request_id


@pytest.mark.redis_server
async def test_worker_lines_name_request_and_job(redis_url: str, tmp_path: Path) -> None:
    """The worker's log (JSON, not a terminal) is all JSON; its decision line names both the
    request and the job that decided it."""
    log_path = tmp_path / "worker.log"
    worker = start_worker(redis_url, log_path=log_path)
    try:
        async with Gate.connect(redis_url, agent="billing-bot") as gate:
            decision = await gate.request("stripe", "charge", {"amount": 20}, timeout=10)
    finally:
        # SIGTERM lets an in-flight job finish, so the line logged after the write is there.
        assert stop_process(worker) == 0
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    decided = next(r for r in records if r["event"] == "request_decided")
    assert decided["request_id"] == decision.request_id
    assert decided["job_id"] == f"sq-eval:{decision.request_id}"
