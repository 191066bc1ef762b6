"""What every benchmark needs: a private redis-server, worker processes, baselines, the table.

Nothing here touches a Redis it did not start: each benchmark runs its own `redis-server` on a
free port of 127.0.0.1, in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent

# One policy for every benchmark: `bench.read` (any action but `approve`) is allowed by the
# second rule, `bench.approve` waits for a human. Other rules are never reached.
POLICY = """\
version: 1
default: deny
rules:
  - name: needs-a-human
    resource: bench
    action: approve
    decision: require_approval
    expires_in: 1h
  - name: allow-bench
    resource: bench
    decision: allow
"""

# What a user would otherwise pick: arq's stock worker polling its queue (arq's default), and a
# client that polls for its decision (SudoMode polls every 2 s, HumanLayer every 3 s).
STOCK_POLL_S = 0.5
CLIENT_POLL_S = 2.0

# The columns of the table, one row per variant.
_COLUMNS = (
    "n",
    "p50",
    "p90",
    "p99",
    "max",
    "rate/s",
    "redis cmd/s",
    "cmd/op",
    "lua us",
    "redis MB",
)


class BenchError(RuntimeError):
    """A benchmark could not run (redis-server missing, a worker that does not start)."""


# -- statistics ------------------------------------------------------------------------------------


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (nearest rank)."""
    ordered = sorted(samples_s)
    if not ordered:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1] * 1000}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- redis-server ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A private redis-server and the figures read from it."""

    url: str
    port: int
    pid: int
    # The worker processes running against it right now (set by `workers`).
    worker_pids: list[int] = field(default_factory=list)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=30)

    def commandstats(self) -> dict[str, tuple[int, int]]:
        """(calls, microseconds) per command so far; commands run inside scripts included."""
        with self.client() as client:
            stats: dict[str, dict[str, Any]] = client.info("commandstats")
        return {name: (int(e["calls"]), int(e["usec"])) for name, e in stats.items()}

    def calls(self) -> int:
        """Commands executed so far (INFO commandstats)."""
        return sum(calls for calls, _ in self.commandstats().values())

    def memory(self) -> int:
        with self.client() as client:
            return int(client.info("memory")["used_memory"])

    def pubsub_clients(self) -> list[dict[str, Any]]:
        """Connections with at least one subscription (CLIENT LIST)."""
        with self.client() as client:
            return [c for c in client.client_list() if int(c.get("sub", 0)) > 0]


@contextlib.contextmanager
def redis_server() -> Iterator[Server]:
    """A private redis-server on a free port of 127.0.0.1, stopped and removed afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="sq-bench-") as directory:
        port = _free_port()
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", directory,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--maxclients", "20000",
        ]  # fmt: skip
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_redis(port, process)
            yield Server(url=f"redis://127.0.0.1:{port}/0", port=port, pid=process.pid)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_for_redis(port: int, process: subprocess.Popen[bytes]) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
    finally:
        client.close()


# -- worker processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def workers(
    server: Server, count: int = 1, *, stock: bool = False
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` policy worker processes with POLICY, ready to take work when this yields.

    `stock=True` runs arq's own Worker with its default 0.5 s polling on the same job functions
    (bench/stock_worker.py) instead of sudo-queue's event-driven one.
    """
    with tempfile.TemporaryDirectory(prefix="sq-bench-") as directory:
        policy = Path(directory) / "policy.yaml"
        policy.write_text(POLICY)
        env = {
            **os.environ,
            "SUDO_QUEUE_REDIS_URL": server.url,
            "SUDO_QUEUE_LOG_LEVEL": "warning",
            "SUDO_QUEUE_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = (
            [sys.executable, "-m", "bench.stock_worker", str(policy)]
            if stock
            else [sys.executable, "-m", "sudo_queue", "worker", "--policy", str(policy)]
        )
        procs = [
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            for _ in range(count)
        ]
        try:
            asyncio.run(_until_ready(server, procs))
            server.worker_pids = [proc.pid for proc in procs]
            yield procs
        finally:
            server.worker_pids = []
            stop(procs)


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the processes and wait for them (SIGKILL after 15 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _until_ready(server: Server, procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Wait until a probe request is decided: the workers are up and polling (or blocking)."""
    from sudo_queue import Gate

    async with Gate.connect(server.url, agent="bench-probe") as gate:
        deadline = time.monotonic() + 30
        while True:
            if any(proc.poll() is not None for proc in procs):
                raise BenchError("a worker process exited at start (run it by hand to see why)")
            try:
                await gate.request("bench", "probe", timeout=1)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise BenchError("the workers did not decide a probe within 30 s") from None


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.01
) -> None:
    """Re-check `condition` until it holds: set-up steps that watch other processes' work."""
    async with asyncio.timeout(timeout):
        # Another process changes what is watched, so there is no event to wait on; this runs
        # between measured phases only.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(interval)


# -- the polling client baseline -------------------------------------------------------------------


async def poll_for_decision(store: Any, request_id: str, interval: float = CLIENT_POLL_S) -> Any:
    """The baseline client: read the record every `interval` seconds until it is decided.

    The first read happens at once, as a polling client's first status check would.
    """
    while True:
        record = await store.get(request_id)
        if record is not None and record.status.terminal:
            return record
        await asyncio.sleep(interval)


async def staggered(
    count: int, spread_s: float, make: Callable[[int], Awaitable[Any]]
) -> list[Any]:
    """Run `make(i)` for i < count concurrently, each started at a random offset in spread_s."""

    async def one(i: int) -> Any:
        await asyncio.sleep(random.uniform(0, spread_s))
        return await make(i)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


# -- results and the table -------------------------------------------------------------------------


@dataclass
class Result:
    """One variant of one benchmark: latency samples, a rate, and what Redis did meanwhile."""

    name: str
    samples_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    operations: int = 0  # what `rate/s` counts (requests, decisions, evaluations)
    redis_calls: int | None = None
    redis_memory: int = 0
    script_us: float = float("nan")  # mean Redis time of one Lua script call (EVALSHA)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU used per process group
    note: str = ""

    @property
    def p(self) -> dict[str, float]:
        return percentiles(self.samples_s)

    @property
    def rate(self) -> float:
        return self.operations / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    @property
    def redis_rate(self) -> float:
        if self.redis_calls is None or self.elapsed_s <= 0:
            return float("nan")
        return self.redis_calls / self.elapsed_s

    @property
    def per_operation(self) -> float:
        if self.redis_calls is None or not self.operations:
            return float("nan")
        return self.redis_calls / self.operations


class Measure:
    """Wall time and Redis commands of a phase: `with Measure(server) as m: ...; m.result(...)`."""

    def __init__(self, server: Server | None) -> None:
        self.server = server
        self.started = self.elapsed = 0.0
        self.before: dict[str, tuple[int, int]] = {}
        self.calls = 0
        self.script_us = float("nan")
        self.cpu: dict[str, float] = {}

    def _cpu(self) -> dict[str, float]:
        if self.server is None:
            return {"agent": cpu_seconds(os.getpid())}
        return {
            "agent": cpu_seconds(os.getpid()),
            "workers": sum(cpu_seconds(pid) for pid in self.server.worker_pids),
            "redis": cpu_seconds(self.server.pid),
        }

    def __enter__(self) -> Measure:
        if self.server is not None:
            self.before = self.server.commandstats()
        self.cpu = self._cpu()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.started
        self.cpu = {name: used - self.cpu[name] for name, used in self._cpu().items()}
        if self.server is None:
            return
        after = self.server.commandstats()
        # The INFO call that took `before` is not the system's work.
        self.calls = max(
            sum(c for c, _ in after.values()) - sum(c for c, _ in self.before.values()) - 1, 0
        )
        calls, usec = (
            a - b
            for a, b in zip(
                after.get("cmdstat_evalsha", (0, 0)),
                self.before.get("cmdstat_evalsha", (0, 0)),
                strict=True,
            )
        )
        if calls:
            self.script_us = usec / calls

    def result(self, name: str, samples_s: list[float], operations: int, note: str = "") -> Result:
        return Result(
            name=name,
            samples_s=samples_s,
            elapsed_s=self.elapsed,
            operations=operations,
            redis_calls=self.calls if self.server is not None else None,
            redis_memory=self.server.memory() if self.server is not None else 0,
            script_us=self.script_us,
            cpu_s=self.cpu,
            note=note,
        )


def _fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN: not measured
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(results: Sequence[Result]) -> str:
    """The figures of every variant, one row each, latencies in milliseconds."""
    width = max(len(r.name) for r in results) + 2
    head = f"{'':<{width}}" + "".join(f"{c:>12}" for c in _COLUMNS)
    lines = [head, f"{'':<{width}}{'':>12}" + "".join(f"{'ms':>12}" for _ in range(4))]
    for r in results:
        p = r.p
        cells = [
            str(len(r.samples_s)) if r.samples_s else str(r.operations),
            _fmt(p["p50"]),
            _fmt(p["p90"]),
            _fmt(p["p99"]),
            _fmt(p["max"]),
            _fmt(r.rate, 0),
            _fmt(r.redis_rate, 1),
            _fmt(r.per_operation, 1),
            _fmt(r.script_us, 0),
            _fmt(r.redis_memory / 1e6, 1) if r.redis_memory else "-",
        ]
        lines.append(f"{r.name:<{width}}" + "".join(f"{c:>12}" for c in cells))
        notes = [r.note] if r.note else []
        # /proc counts CPU in clock ticks (10 ms): short phases would show noise.
        if r.operations and sum(r.cpu_s.values()) >= 0.3:
            per_op = ", ".join(
                f"{name} {used / r.operations * 1000:.2f}" for name, used in r.cpu_s.items()
            )
            notes.append(f"CPU ms per op: {per_op}")
        for note in notes:
            lines.append(f"{'':<{width}}  {note}")
    return "\n".join(lines)


def ratios(ours: Result, baselines: Sequence[Result], *, higher_is_better: bool = False) -> str:
    """How many times better sudo-queue is than each baseline, on p50 (or on the rate)."""
    parts = []
    for base in baselines:
        if higher_is_better:
            factor = ours.rate / base.rate if base.rate else float("nan")
            parts.append(f"{factor:,.1f}x the rate of {base.name}")
        else:
            factor = base.p["p50"] / ours.p["p50"] if ours.p["p50"] else float("nan")
            parts.append(f"{factor:,.0f}x faster at p50 than {base.name}")
    return "ratios: sudo-queue is " + "; ".join(parts) if parts else ""


def goal(label: str, value: float, limit: float, unit: str, *, at_most: bool = True) -> str:
    """One line of the goals table: the figure, the goal, met or missed."""
    met = value <= limit if at_most else value >= limit
    sign = "<=" if at_most else ">="
    return f"goal  {label}: {_fmt(value)} {unit} ({sign} {_fmt(limit)} {unit}): " + (
        "met" if met else "MISSED"
    )


def machine() -> str:
    """The machine the figures come from: cores, CPU model, Python and Redis versions."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = "unknown"
    binary = shutil.which("redis-server")
    if binary:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        for token in out.stdout.split():
            if token.startswith("v="):
                redis_version = token[2:]
    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
        f"redis-server {redis_version}, load average {loadavg:.2f} at start"
    )


def header(title: str, what: str) -> str:
    return f"\n== {title}: {what}\n{machine()}"


def quiet_logging() -> None:
    """The benchmark's own process logs warnings only (the library logs per request at debug)."""
    from sudo_queue.logs import configure_logging

    configure_logging("console", "warning")
