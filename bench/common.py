"""What every benchmark needs: a private redis-server, worker processes, percentiles."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOW_ALL = """\
version: 1
default: deny
rules:
  - name: allow-bench
    resource: bench
    decision: allow
"""


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    ordered = sorted(samples_s)
    if not ordered:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1] * 1000}


def mean_ms(samples_s: Sequence[float]) -> float:
    return statistics.fmean(samples_s) * 1000 if samples_s else 0.0


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port, for this benchmark only."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import RedisServer, free_port

    server = RedisServer(port=free_port(), directory=Path(tempfile.mkdtemp(prefix="sq-bench-")))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def workers(
    url: str, count: int = 1, policy: str = ALLOW_ALL
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`sudo-queue worker` processes with the given policy text."""
    policy_file = Path(tempfile.mkdtemp(prefix="sq-bench-")) / "policy.yaml"
    policy_file.write_text(policy)
    env = {**os.environ, "SUDO_QUEUE_REDIS_URL": url, "SUDO_QUEUE_LOG_LEVEL": "warning"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sudo_queue", "worker", "--policy", str(policy_file)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    time.sleep(1.5)
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15)


def table(title: str, rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [title, f"{'':<28}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}   (ms)"]
    for name, p in rows:
        lines.append(f"{name:<28}{p['p50']:>9.2f}{p['p90']:>9.2f}{p['p99']:>9.2f}{p['max']:>9.2f}")
    return "\n".join(lines)
