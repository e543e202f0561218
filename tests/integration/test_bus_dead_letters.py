"""``StreamBus.dead_letter_consumer`` on the real Redis protocol: the same
consumer loop as every group consumer, reading the flat entries of the
dead-letter stream, and never dead-lettering a dead letter again."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.bus import DEAD_LETTER_STREAM, DeadLetter, StreamBus

GROUP = "watchers"
WAIT_S = 30.0  # a guard against hanging, never an assertion


@pytest.fixture
def bus(async_redis, stream_prefix) -> StreamBus:
    return StreamBus(async_redis, prefix=stream_prefix)


async def eventually(condition, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not await condition():
            await asyncio.sleep(0.02)


async def run_until_all_acked(bus: StreamBus, handler, **options) -> object:
    """Run a dead-letter consumer until its group has read every entry and acked it."""
    consumer = bus.dead_letter_consumer(GROUP, handler, consumer_name="w1", retry_backoff_s=0.05, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop), name="dead-letter-consumer")
    key = bus.key(DEAD_LETTER_STREAM)
    newest = (await bus.redis.xrevrange(key, count=1))[0][0]

    async def all_acked() -> bool:
        groups = {g["name"]: g for g in await bus.redis.xinfo_groups(key)}
        group = groups.get(GROUP.encode())
        return group is not None and group["last-delivered-id"] == newest and group["pending"] == 0

    try:
        await eventually(all_acked, "every dead letter acked")
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
    return consumer


async def test_letters_written_before_the_consumer_reach_the_handler_and_junk_is_acked_not_dead_lettered(
        bus, async_redis):
    key = bus.key(DEAD_LETTER_STREAM)
    await bus.dead_letter("experiments", "1-1", "scheduler", "s1", 3, "cannot decode message: x", b"\xc1")
    await async_redis.xadd(key, {"unrelated": "fields"})
    await async_redis.xadd(key, {"stream": b"\xff\xfe", "reason": b"\xff", "payload": b"\xff"})
    await async_redis.xadd(key, {"stream": "completions", "reason": "r"})  # no payload
    await bus.dead_letter("rollout_requests", "2-2", "rollout", "r1", 5, "raise on this one", b"p")
    await bus.dead_letter("train_jobs:0", "3-3", "trainer", "t1", 1, "rank_mismatch", b"job")
    handled: list[DeadLetter] = []

    async def handler(letter: DeadLetter) -> None:
        handled.append(letter)
        if letter.reason == "raise on this one":
            raise ValueError("the handler cannot apply it")

    consumer = await run_until_all_acked(bus, handler)
    assert [(d.stream, d.reason) for d in handled] == [
        ("experiments", "cannot decode message: x"), ("\ufffd\ufffd", "\ufffd"),
        ("rollout_requests", "raise on this one"), ("train_jobs:0", "rank_mismatch")]
    first = handled[0]
    assert (first.entry_id, first.group, first.consumer, first.deliveries, first.payload) == (
        "1-1", "scheduler", "s1", 3, b"\xc1")
    assert [h.reason for h in handled].count("raise on this one") == 1  # a raising handler is not retried
    assert await async_redis.xlen(key) == 6  # nothing was dead-lettered again
    assert consumer.rejected == 2 and consumer.dead_lettered == 0


async def test_a_handler_that_failed_because_redis_was_away_gets_the_letter_again(bus, async_redis):
    await bus.dead_letter("completions", "1-1", "reward", "r1", 5, "first", b"")
    await bus.dead_letter("completions", "2-2", "reward", "r1", 5, "second", b"")
    calls: list[str] = []

    async def handler(letter: DeadLetter) -> None:
        calls.append(letter.reason)
        if letter.reason == "first" and calls.count("first") == 1:
            raise RedisConnectionError("Redis went away while applying it")

    await run_until_all_acked(bus, handler, max_deliveries=1)
    # max_deliveries=1, yet the outage did not count: the letter was handled again, once
    assert sorted(calls) == ["first", "first", "second"]
    assert await async_redis.xlen(bus.key(DEAD_LETTER_STREAM)) == 2


async def test_each_group_reads_every_letter(bus):
    await bus.dead_letter("experiments", "1-1", "scheduler", "s1", 1, "only", b"")
    seen: dict[str, list[str]] = {"a": [], "b": []}
    for name in seen:
        consumer = bus.dead_letter_consumer(f"group-{name}", lambda d, name=name: _append(seen[name], d.reason),
                                            consumer_name="w")
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop), name=f"dead-letters-{name}")
        async with asyncio.timeout(WAIT_S):
            while not seen[name]:
                await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
    assert seen == {"a": ["only"], "b": ["only"]}


async def _append(into: list[str], value: str) -> None:
    into.append(value)
