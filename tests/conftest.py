"""Shared fixtures: a real Redis protocol server on a free port.

``REDIS_URL`` in the environment wins; otherwise one embedded Valkey server
is started for the whole session. Each test gets its own key prefix, so tests
never see each other's streams.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from shared.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), persist=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def stream_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def sync_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def async_redis(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
def owners_file(tmp_path, monkeypatch):
    """Owner secrets that tests' clients make go to a file of the test's own,
    never to the user's ``~/.config/clora/owners.json``."""
    path = tmp_path / "owners.json"
    monkeypatch.setenv("CLORA_OWNERS_FILE", str(path))
    return path


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own (persistent, fsynced on every write), so that
    it can be killed and restarted on the same port and data."""
    server = EmbeddedRedis(tmp_path / "own-redis", persist=True, fsync_always=True)
    server.start()
    yield server
    server.stop()
