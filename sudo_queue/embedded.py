"""A Redis and a policy worker inside one process: what `sudo-queue demo` and the examples run on.

`local_redis()` picks a Redis in this order: the URL it is given, if that answers a PING; else a
throwaway `redis-server` (a free port on 127.0.0.1, a temporary directory, no persistence),
stopped when the block ends; else an in-process fakeredis, whose state lives in memory only.
`policy_worker()` runs the real policy worker (workers/policy.py, on arq) as a task of the current
event loop against that Redis. Nothing here is for production: run `sudo-queue worker` there.

The worker is loaded by module path when the block starts, so `import sudo_queue` never pulls in
arq's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .constants import DEFAULT_NAMESPACE
from .errors import GateUnavailable
from .gate import Gate
from .policy import Policy

__all__ = [
    "LocalRedis",
    "LocalStack",
    "RedisKind",
    "display_url",
    "local_redis",
    "local_stack",
    "policy_worker",
    "running_worker",
]

# How long a throwaway redis-server gets to answer its first PING.
SERVER_START_S = 10.0


class RedisKind(StrEnum):
    """Where the Redis of a local stack comes from."""

    URL = "url"
    SERVER = "redis-server"
    MEMORY = "memory"


@dataclass(frozen=True, kw_only=True)
class LocalRedis:
    """The Redis a local stack uses, and how it was chosen."""

    kind: RedisKind
    client: Redis
    """A client with `decode_responses=True`, as the Gate and the Store expect."""
    url: str | None
    """How another process reaches it; None for the in-memory Redis, which no one else can."""
    description: str
    notices: tuple[str, ...] = ()
    """Why an earlier choice was skipped (a URL that did not answer ...)."""
    fake_server: Any = field(default=None, repr=False)


def display_url(url: str) -> str:
    """`url` with its password masked, for output and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _client(url: str) -> Redis:
    client: Redis = Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
    )
    return client


async def _answers(url: str) -> str | None:
    """None if `url` answers a PING, else why not."""
    client = _client(url)
    try:
        await client.ping()
    except (RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _start_server(binary: str, directory: str) -> tuple[asyncio.subprocess.Process, str]:
    """A private redis-server on a free port of 127.0.0.1; retried if the port was taken."""
    for _ in range(3):
        port = _free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + SERVER_START_S
        while process.returncode is None and time.monotonic() < deadline:
            if await _answers(url) is None:
                return process, url
            await asyncio.sleep(0.02)
        await _stop_server(process)
    raise GateUnavailable(
        f"{binary} did not start (three tries on free ports); "
        "set SUDO_QUEUE_REDIS_URL to a Redis you run"
    )


async def _stop_server(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def local_redis(
    url: str | None = None, *, redis_server: str | None = "redis-server"
) -> AsyncIterator[LocalRedis]:
    """`url` if it answers; else a throwaway redis-server if one is on PATH; else fakeredis.

    `redis_server` names the binary to look for (None: never start one).
    """
    notices: list[str] = []
    if url is not None:
        problem = await _answers(url)
        if problem is None:
            client = _client(url)
            try:
                yield LocalRedis(
                    kind=RedisKind.URL,
                    client=client,
                    url=url,
                    description=f"the configured Redis at {display_url(url)}",
                )
            finally:
                await client.aclose()
            return
        notices.append(f"{display_url(url)} does not answer ({problem})")

    binary = shutil.which(redis_server) if redis_server else None
    if binary is not None:
        with tempfile.TemporaryDirectory(prefix="sudo-queue-") as directory:
            process, server_url = await _start_server(binary, directory)
            client = _client(server_url)
            try:
                yield LocalRedis(
                    kind=RedisKind.SERVER,
                    client=client,
                    url=server_url,
                    description=(
                        f"a throwaway redis-server at {server_url} (pid {process.pid}), "
                        "stopped when this ends"
                    ),
                    notices=tuple(notices),
                )
            finally:
                await client.aclose()
                await _stop_server(process)
        return
    notices.append("no redis-server on PATH")

    try:
        fakeredis = importlib.import_module("fakeredis")
        importlib.import_module("lupa")  # fakeredis runs Lua only with its `lua` extra
    except ImportError as exc:
        raise GateUnavailable(
            "no Redis to use: " + "; ".join(notices) + ", and fakeredis is not installed. "
            "Set SUDO_QUEUE_REDIS_URL, install redis-server, or pip install 'fakeredis[lua]'"
        ) from exc
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    try:
        yield LocalRedis(
            kind=RedisKind.MEMORY,
            client=client,
            url=None,
            description="an in-memory Redis (fakeredis) inside this process",
            notices=tuple(notices),
            fake_server=server,
        )
    finally:
        await client.aclose()


@asynccontextmanager
async def policy_worker(
    redis: LocalRedis,
    *,
    policy_path: Path,
    namespace: str = DEFAULT_NAMESPACE,
    notify: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[Policy]:
    """Run the policy worker on `redis` as a task of this event loop; yields its policy.

    A policy file that does not load raises PolicyError before anything starts.
    """
    module = importlib.import_module("sudo_queue.workers.policy")
    holder = module.PolicyHolder(policy_path)
    config = module.WorkerConfig(
        redis_url=redis.url or "redis://in-memory",
        policy_path=policy_path,
        namespace=namespace,
        notify=tuple(notify),
    )
    memory = redis.kind is RedisKind.MEMORY
    # No URL reaches an in-process Redis: the jobs use our client, and arq a pool on the same
    # fake server.
    kwargs: dict[str, Any] = module.worker_kwargs(
        config, holder, redis=redis.client if memory else None
    )
    if memory:
        fakeredis = importlib.import_module("fakeredis")
        arq_connections = importlib.import_module("arq.connections")
        raw = fakeredis.FakeAsyncRedis(server=redis.fake_server)
        # What arq's create_pool would set: above all the JSON serializer (its default is pickle).
        kwargs["redis_pool"] = arq_connections.ArqRedis(
            connection_pool=raw.connection_pool,
            job_serializer=kwargs["job_serializer"],
            job_deserializer=kwargs["job_deserializer"],
            default_queue_name=kwargs["queue_name"],
        )
    async with running_worker(kwargs):
        yield holder.current


@asynccontextmanager
async def running_worker(kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    """A WakeableWorker built from `kwargs`, running as a task of this loop until the block ends.

    No signal handlers and no reconnect loop (that is `run_forever`, for worker processes).
    """
    runner = importlib.import_module("sudo_queue.workers.runner")
    worker = runner.WakeableWorker(**kwargs)
    task = asyncio.create_task(worker.async_run(), name=f"sudo-queue-worker-{worker.queue_name}")
    try:
        yield worker
    finally:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await worker.close()
        task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task


@dataclass(frozen=True, kw_only=True)
class LocalStack:
    """A Redis and a running policy worker; `gate()` connects an agent to them."""

    redis: LocalRedis
    policy: Policy
    namespace: str

    def gate(self, agent: str) -> Gate:
        """A Gate on this stack's Redis (close it, or use it as `async with`)."""
        return Gate(self.redis.client, agent=agent, namespace=self.namespace)


@asynccontextmanager
async def local_stack(
    *,
    policy_path: Path,
    url: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    redis_server: str | None = "redis-server",
) -> AsyncIterator[LocalStack]:
    """`local_redis()` plus `policy_worker()`: everything an agent needs, in one block."""
    async with (
        local_redis(url, redis_server=redis_server) as redis,
        policy_worker(redis, policy_path=policy_path, namespace=namespace) as policy,
    ):
        yield LocalStack(redis=redis, policy=policy, namespace=namespace)
