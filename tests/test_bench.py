"""Every benchmark runs (`python -m bench NAME --quick`), so none can rot; figures are not checked.

The five run at once, each with its own redis-server and workers, to keep the suite fast; speed
itself is measured by the benchmarks, never asserted by a test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .helpers import ROOT, need

BENCHMARKS = ("latency", "resume", "throughput", "waiters", "policy")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def outputs() -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Run every benchmark's quick mode concurrently; their outputs by name."""
    if shutil.which("redis-server") is None:
        need("redis-server (apt-get install redis-server)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bench", name, "--quick"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in BENCHMARKS
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        yield done
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.redis_server
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_and_reports(
    name: str, outputs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """The benchmark exits 0 and prints its table and a verdict for each of its goals."""
    result = outputs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"== {name}:" in result.stdout
    assert "machine: " in result.stdout
    assert "p50" in result.stdout
    assert "goal  " in result.stdout
    if name != "policy":
        assert "ratios: sudo-queue" in result.stdout


def test_unknown_benchmark_is_a_usage_error() -> None:
    """`python -m bench` with an unknown name exits 2 and lists the benchmarks."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "latency" in result.stderr
