"""Fixtures: fakeredis for unit tests, a private real redis-server for integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import fakeredis
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sudo_queue.store import Store

from .helpers import RedisServer, free_port


@pytest_asyncio.fixture
async def fake_redis() -> AsyncIterator[Redis]:
    """A fresh in-memory Redis (with Lua) per test."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def store(fake_redis: Redis) -> Store:
    return Store(fake_redis)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session (flushed before each test that uses it)."""
    server = RedisServer(port=free_port(), directory=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the private redis-server, emptied for this test."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest_asyncio.fixture
async def real_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()
