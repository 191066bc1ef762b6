"""Fault-suite fixtures: private redis-servers we may kill, and real worker processes."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from ..helpers import POLICY, RedisServer, free_port, start_worker, stop_process


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, with AOF (appendfsync everysec), safe to kill."""
    server = RedisServer(
        port=free_port(), directory=Path(tempfile.mkdtemp(prefix="sq-fault-")), appendonly=True
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def spawned() -> Iterator[list[Popen[str]]]:
    """Processes a test starts itself (agents); any still running at the end are killed."""
    processes: list[Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(5)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Popen[bytes]]]:
    """Start `sudo-queue worker` processes; every one is stopped at the end of the test."""
    started: list[Popen[bytes]] = []

    def start(url: str, policy: Path = POLICY, name: str = "worker") -> Popen[bytes]:
        process = start_worker(url, policy, tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        stop_process(process)
