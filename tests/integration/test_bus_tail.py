"""The bus's publish inside a transaction, its sync counterpart and its tail
readers of broadcast streams, on the real Redis protocol (embedded Valkey)."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from shared import messages
from shared.bus import StreamBus, StreamEntry, StreamTail, SyncStreamBus, decode_message_entry

WAIT_S = 30.0  # a guard against hanging, never an assertion


def event(experiment_id: str) -> messages.ExperimentEvent:
    return messages.ExperimentEvent(experiment_id=experiment_id, level="info", code="note", message="m")


def cancel(experiment_id: str) -> messages.ExperimentCancel:
    return messages.ExperimentCancel(experiment_id=experiment_id)


def experiment_of(entry: StreamEntry) -> str:
    return decode_message_entry(entry)[0].experiment_id


async def eventually(condition, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.fixture
def bus(async_redis, stream_prefix) -> StreamBus:
    return StreamBus(async_redis, prefix=stream_prefix)


# ---------------------------------------------------------------- publish_in


async def test_publish_in_writes_with_the_other_commands_of_a_multi(bus, async_redis, stream_prefix):
    state_key = stream_prefix + "state"
    async with async_redis.pipeline(transaction=True) as pipe:
        pipe.hset(state_key, "step", 1)
        bus.publish_in(pipe, cancel("exp-a"))
        bus.publish_in(pipe, event("exp-a"), stream="events")
        pipe.hincrby(state_key, "published", 2)
        results = await pipe.execute()
    [(cancel_id, fields)] = await async_redis.xrange(bus.key("experiments"))
    assert results[1] == cancel_id  # the XADD ran inside the MULTI, between the other commands
    assert fields == {b"msg": messages.encode(cancel("exp-a"))}
    assert await async_redis.xlen(bus.key("events")) == 1
    assert await async_redis.hgetall(state_key) == {b"step": b"1", b"published": b"2"}


async def test_publish_in_refuses_a_wrong_stream_before_queueing_anything(bus, async_redis):
    async with async_redis.pipeline(transaction=True) as pipe:
        with pytest.raises(TypeError):
            bus.publish_in(pipe, cancel("exp-a"), stream="metrics")
        assert len(pipe) == 0
    assert not await async_redis.exists(bus.key("metrics"))


async def test_publish_in_caps_the_stream_like_publish(async_redis, stream_prefix):
    small_bus = StreamBus(async_redis, prefix=stream_prefix, maxlen=10)
    async with async_redis.pipeline(transaction=True) as pipe:
        for i in range(500):
            small_bus.publish_in(pipe, cancel(f"e{i}"))
        await pipe.execute()
    assert 10 <= await async_redis.xlen(small_bus.key("experiments")) < 500


# ---------------------------------------------------------------- the sync bus and tail


async def test_the_sync_and_async_bus_write_the_same_entry(sync_redis, async_redis, stream_prefix):
    SyncStreamBus(sync_redis, prefix=stream_prefix).publish(cancel("same"))
    await StreamBus(async_redis, prefix=stream_prefix).publish(cancel("same"))
    [(_, sync_fields), (_, async_fields)] = sync_redis.xrange(stream_prefix + "experiments")
    assert sync_fields == async_fields == {b"msg": messages.encode(cancel("same"))}


def test_sync_bus_refuses_what_the_async_bus_refuses(redis_url, sync_redis, stream_prefix):
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        SyncStreamBus(decoding)
    decoding.close()
    with pytest.raises(TypeError):
        SyncStreamBus(sync_redis, prefix=stream_prefix).publish(cancel("x"), "events")


@pytest.mark.parametrize("protocol", [2, 3])
def test_sync_tail_reads_after_each_position_without_a_group(redis_url, stream_prefix, protocol):
    client = redis.Redis.from_url(redis_url, protocol=protocol)
    bus = SyncStreamBus(client, prefix=stream_prefix)
    old = bus.publish(event("old"), "events")
    assert bus.stream_end("events") == old and bus.stream_end("experiments") == "0-0"
    positions = {"events": bus.stream_end("events"), "experiments": bus.stream_end("experiments")}
    assert bus.tail(positions, block_ms=None, count=10) == []  # nothing new since the ends
    new_event = bus.publish(event("new"), "events")
    submission = bus.publish(cancel("new"))
    entries = bus.tail(positions, block_ms=None, count=10)
    assert [(e.stream, e.entry_id) for e in entries] == [("events", new_event), ("experiments", submission)]
    assert [experiment_of(e) for e in entries] == ["new", "new"]
    again = bus.tail(positions, block_ms=None, count=10)  # the caller keeps the positions: a re-read sees them again
    assert [e.entry_id for e in again] == [new_event, submission]
    assert [e.entry_id for e in bus.tail({"events": "0-0"}, block_ms=None, count=1)] == [old]
    client.close()


async def test_async_tail_waits_for_an_entry_up_to_block_ms(bus):
    end = await bus.stream_end("events")
    reader = asyncio.create_task(bus.tail({"events": end}, block_ms=int(WAIT_S * 1000), count=10))
    await asyncio.sleep(0.1)
    entry_id = await bus.publish(event("awaited"), "events")
    [entry] = await asyncio.wait_for(reader, WAIT_S)
    assert (entry.stream, entry.entry_id, experiment_of(entry)) == ("events", entry_id, "awaited")


# ---------------------------------------------------------------- StreamTail


async def test_stream_tail_skips_a_raising_entry_and_rereads_one_that_failed_on_an_outage(bus):
    await bus.publish(event("before-start"), "events")
    tail = StreamTail(bus, ["events"], block_ms=100)
    await tail.start_at_end()
    calls: list[str] = []
    failed_once: set[str] = set()

    async def handle(entry: StreamEntry) -> None:
        name = experiment_of(entry)
        calls.append(name)
        if name == "hostile":
            raise ValueError("a bad entry")
        if name == "outage" and name not in failed_once:
            failed_once.add(name)
            raise RedisConnectionError("Redis went away while handling")

    stop = asyncio.Event()
    follower = asyncio.create_task(tail.follow(handle, until=stop.is_set), name="tail-follower")
    for name in ("first", "hostile", "outage", "last"):
        await bus.publish(event(name), "events")
    await eventually(lambda: "last" in calls, "the last entry")
    stop.set()
    await asyncio.wait_for(follower, WAIT_S)
    assert calls == ["first", "hostile", "outage", "outage", "last"]
    assert tail.last_ids["events"] == await bus.stream_end("events")


async def test_stream_tail_rides_out_a_redis_restart(own_redis, stream_prefix):
    client = aioredis.Redis.from_url(own_redis.url)
    bus = StreamBus(client, prefix=stream_prefix)
    tail = StreamTail(bus, ["events"], block_ms=100, retry_event="test_tail_retrying")
    await tail.start_at_end()
    seen: list[str] = []

    async def handle(entry: StreamEntry) -> None:
        seen.append(experiment_of(entry))

    stop = asyncio.Event()
    with capture_logs() as logs:
        follower = asyncio.create_task(tail.follow(handle, until=stop.is_set), name="tail-follower")
        await bus.publish(event("before"), "events")
        await eventually(lambda: seen == ["before"], "the entry before the restart")
        own_redis.kill()
        await eventually(lambda: any(e["event"] == "test_tail_retrying" for e in logs), "a retry")
        assert not follower.done()
        own_redis.start()  # same port, same data
        await bus.publish(event("after"), "events")
        await eventually(lambda: seen == ["before", "after"], "the entry after the restart")
        stop.set()
        await asyncio.wait_for(follower, WAIT_S)
    await client.aclose()
