"""The scheduler's lease across a Redis outage longer than its ttl: the
holder takes it again when Redis is back and nobody else holds it (and is
told to re-read its state), but never takes it from another holder."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.scheduler.lease import Lease, LeaseLost
from shared.redis_server import EmbeddedRedis

TTL_S = 0.6
WAIT_S = 20.0


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, so that it can be killed and restarted (empty)."""
    server = EmbeddedRedis(tmp_path / "own-redis", persist=False)
    server.start()
    yield server
    server.stop()


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_lease_that_lapsed_in_an_outage_is_taken_again_and_the_holder_told(own_redis):
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=1.0)
    lease = Lease(client, "test:lease", "leader", TTL_S)
    assert await lease.try_acquire()
    regained = asyncio.Event()
    stopping = asyncio.Event()
    keeper = asyncio.create_task(lease.keep(stopping, on_regained=regained.set), name="lease-keeper")
    own_redis.kill()
    await asyncio.sleep(3 * TTL_S)  # down for longer than the ttl: the lease may have lapsed
    assert not keeper.done()  # an outage is waited out, not a reason to stop
    own_redis.start()  # same port, comes back empty: nobody holds the lease
    await asyncio.wait_for(regained.wait(), WAIT_S)
    assert await lease.holder_now() == "leader"
    stopping.set()
    await asyncio.wait_for(keeper, WAIT_S)
    await client.aclose()


async def test_a_lease_that_lapsed_and_was_taken_by_another_is_lost(own_redis):
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=1.0)
    lease = Lease(client, "test:lease", "leader", TTL_S)
    assert await lease.try_acquire()
    keeper = asyncio.create_task(lease.keep(asyncio.Event()), name="lease-keeper")
    own_redis.kill()
    await asyncio.sleep(3 * TTL_S)
    own_redis.start()
    other = aioredis.Redis.from_url(own_redis.url)
    await other.set("test:lease", "heir", px=60_000)  # someone else led while this holder was cut off
    with pytest.raises(LeaseLost, match="heir"):
        await asyncio.wait_for(keeper, WAIT_S)
    await other.aclose()
    await client.aclose()
