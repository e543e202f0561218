"""The stream bus on a real Redis protocol server (embedded Valkey).

Covers issue 2's points 1 (a SIGKILLed consumer's entry is handled once by
another), 2 (always-failing handler -> dead letter, later entries flow) and
3 (undecodable payloads dead-lettered with a reason, consumer stays up), plus
the delivery machinery those rest on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal

import msgpack
import pytest

from shared import messages
from shared.bus import DEAD_LETTER_STREAM, Entry, PermanentError, StreamBus
from tests.integration.bus_worker import GROUP as WORKER_GROUP
from tests.integration.worker_process import WorkerProcesses, wait_for

STREAM = "experiments"
GROUP = "testers"
EVENTUALLY_S = 10.0


def cancel(experiment_id: str) -> messages.ExperimentCancel:
    return messages.ExperimentCancel(experiment_id=experiment_id)


@pytest.fixture
def bus(async_redis, stream_prefix) -> StreamBus:
    return StreamBus(async_redis, prefix=stream_prefix, maxlen=1000)


@contextlib.asynccontextmanager
async def running(consumer, drain_timeout_s: float | None = None):
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop, drain_timeout_s=drain_timeout_s), name="test-consumer")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=EVENTUALLY_S + (drain_timeout_s or 0))


async def eventually(condition, timeout_s: float = EVENTUALLY_S, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def pending_count(bus: StreamBus, group: str = GROUP) -> int:
    return (await bus.redis.xpending(bus.key(STREAM), group))["pending"]


# ---------------------------------------------------------------- publishing


async def test_publish_writes_one_msgpack_field_that_decodes(bus, async_redis):
    entry_id = await bus.publish(cancel("exp-a"))
    [(raw_id, fields)] = await async_redis.xrange(bus.key(STREAM))
    assert raw_id.decode() == entry_id
    assert list(fields) == [b"msg"]
    assert messages.decode(fields[b"msg"], STREAM) == cancel("exp-a")
    assert msgpack.unpackb(fields[b"msg"])["kind"] == "experiment_cancel"


async def test_publish_refuses_a_stream_that_does_not_carry_the_kind(bus):
    with pytest.raises(TypeError):
        await bus.publish(cancel("exp-a"), "metrics")
    job_stream_without_shard = "train_jobs"
    hyper = messages.TrainHyper(learning_rate=0.1)
    job = messages.TrainJob(job_id="j", experiment_id="e", step=0, base_version=0, lora_rank=8, groups=[], hyper=hyper)
    with pytest.raises(ValueError, match="suffix"):
        await bus.publish(job, job_stream_without_shard)
    await bus.publish(job, "train_jobs:3")
    assert await bus.redis.xlen(bus.key("train_jobs:3")) == 1


async def test_publish_caps_the_stream_approximately(async_redis, stream_prefix):
    small_bus = StreamBus(async_redis, prefix=stream_prefix, maxlen=10)
    for i in range(500):
        await small_bus.publish(cancel(f"e{i}"))
    # MAXLEN ~ trims whole macro nodes (100 entries each by default), never below the cap.
    assert 10 <= await async_redis.xlen(small_bus.key(STREAM)) < 500


async def test_bus_refuses_a_client_that_decodes_responses(redis_url):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        StreamBus(client)
    await client.aclose()


# ---------------------------------------------------------------- consuming


async def test_handles_every_entry_once_and_acks_after_the_handler(bus):
    seen: list[tuple[str, Entry]] = []
    pending_while_handling: list[int] = []

    async def handler(message, entry):
        pending_while_handling.append(await pending_count(bus))
        seen.append((message.experiment_id, entry))

    ids = [await bus.publish(cancel(f"e{i}")) for i in range(3)]
    async with running(bus.consumer(STREAM, GROUP, handler, consumer_name="c1")):
        await eventually(lambda: len(seen) == 3, what="3 entries handled")
        await eventually(lambda: _no_pending(bus), what="all acked")
    assert [e for e, _ in seen] == ["e0", "e1", "e2"]
    assert [entry.entry_id for _, entry in seen] == ids
    assert all(entry.deliveries == 1 and entry.stream == STREAM for _, entry in seen)
    assert pending_while_handling == [1, 1, 1]  # not acked before the handler returned


async def _no_pending(bus: StreamBus, group: str = GROUP) -> bool:
    return await pending_count(bus, group) == 0


async def test_always_failing_handler_is_dead_lettered_and_later_entries_flow(bus):
    """Issue 2, point 2."""
    events: list[tuple[str, str, int]] = []

    async def handler(message, entry):
        events.append((message.experiment_id, "attempt", entry.deliveries))
        if message.experiment_id == "poison":
            raise RuntimeError("boom: cannot handle poison")
        events.append((message.experiment_id, "done", entry.deliveries))

    poison_id = await bus.publish(cancel("poison"))
    for i in range(3):
        await bus.publish(cancel(f"good{i}"))
    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1", max_deliveries=3, retry_backoff_s=0.05)
    async with running(consumer) as task:
        [letter] = await eventually(lambda: bus.dead_letters(STREAM), what="a dead letter")
        await eventually(lambda: sum(1 for e in events if e[1] == "done") == 3, what="good entries")
        await eventually(lambda: _no_pending(bus), what="all acked")
        await bus.publish(cancel("after"))
        await eventually(lambda: ("after", "done", 1) in events, what="entry after the dead letter")
        assert not task.done()
    assert letter.entry_id == poison_id
    assert letter.deliveries == 3
    assert "RuntimeError: boom: cannot handle poison" in letter.reason
    assert (letter.stream, letter.group, letter.consumer) == (STREAM, GROUP, "c1")
    assert messages.decode(letter.payload, STREAM) == cancel("poison")
    assert [d for e, kind, d in events if e == "poison"] == [1, 2, 3]
    # the good entries were handled while the poison entry waited for its retries
    first_good = events.index(("good0", "done", 1))
    last_poison = events.index(("poison", "attempt", 3))
    assert first_good < last_poison


async def test_permanent_error_is_dead_lettered_at_once(bus):
    attempts: list[int] = []

    async def handler(message, entry):
        attempts.append(entry.deliveries)
        raise PermanentError("experiment id is reserved")

    await bus.publish(cancel("reserved"))
    async with running(bus.consumer(STREAM, GROUP, handler, consumer_name="c1", max_deliveries=5)):
        [letter] = await eventually(lambda: bus.dead_letters(STREAM), what="a dead letter")
    assert attempts == [1]
    assert "experiment id is reserved" in letter.reason
    assert await pending_count(bus) == 0


async def test_undecodable_entries_are_dead_lettered_with_a_reason(bus, async_redis):
    """Issue 2, point 3: garbage, wrong kind, wrong field type (and friends)."""
    handled: list[str] = []

    async def handler(message, entry):
        handled.append(message.experiment_id)

    metrics = messages.StepMetrics(experiment_id="x", step=0, adapter_version=0, reward_mean=0.0, accuracy=None,
                                   rollout_s=0.0, train_s=0.0)
    bad_payloads = {
        "garbage": {"msg": b"\xc1\x00garbage"},
        "wrong_kind": {"msg": messages.encode(metrics)},
        "wrong_type": {"msg": msgpack.packb({"kind": "experiment_cancel", "schema": 1, "experiment_id": 123})},
        "newer_schema": {"msg": msgpack.packb({"kind": "experiment_cancel", "schema": 99, "experiment_id": "x"})},
        "no_msg_field": {"body": b"hello"},
    }
    ids = {name: (await async_redis.xadd(bus.key(STREAM), fields)).decode() for name, fields in bad_payloads.items()}
    async with running(bus.consumer(STREAM, GROUP, handler, consumer_name="c1")) as task:
        letters = await eventually(lambda: _at_least(bus.dead_letters(STREAM), 5), what="5 dead letters")
        await bus.publish(cancel("fine"))
        await eventually(lambda: handled == ["fine"], what="the good message")
        assert not task.done()
    reasons = {name: next(d.reason for d in letters if d.entry_id == entry_id) for name, entry_id in ids.items()}
    assert "malformed" in reasons["garbage"]
    assert "step_metrics" in reasons["wrong_kind"] and "experiment_cancel" in reasons["wrong_kind"]
    assert "experiment_id" in reasons["wrong_type"] and "str" in reasons["wrong_type"]
    assert "schema 99" in reasons["newer_schema"]
    assert "no 'msg' field" in reasons["no_msg_field"]
    assert all(r.startswith("cannot decode message") for n, r in reasons.items() if n != "no_msg_field")
    garbage_letter = next(d for d in letters if d.entry_id == ids["garbage"])
    assert garbage_letter.payload == b"\xc1\x00garbage"
    assert await pending_count(bus) == 0


async def _at_least(letters_coro, n: int):
    letters = await letters_coro
    return letters if len(letters) >= n else None


async def test_dead_letters_filter_by_stream(bus, async_redis):
    await async_redis.xadd(bus.key("metrics"), {"msg": b"\xc1"})
    await async_redis.xadd(bus.key(STREAM), {"msg": b"\xc1"})

    async def never_called(message, entry):
        raise AssertionError("undecodable entries must not reach the handler")

    async with running(bus.consumer("metrics", GROUP, never_called, consumer_name="c1")):
        async with running(bus.consumer(STREAM, GROUP, never_called, consumer_name="c1")):
            await eventually(lambda: _at_least(bus.dead_letters(), 2), what="2 dead letters")
    assert [d.stream for d in await bus.dead_letters("metrics")] == ["metrics"]
    assert [d.stream for d in await bus.dead_letters(STREAM)] == [STREAM]
    assert await async_redis.xlen(bus.key(DEAD_LETTER_STREAM)) == 2


async def test_concurrency_reads_only_as_many_entries_as_free_slots(bus):
    release = asyncio.Event()
    started: list[str] = []

    async def handler(message, entry):
        started.append(message.experiment_id)
        await release.wait()

    for i in range(5):
        await bus.publish(cancel(f"e{i}"))
    async with running(bus.consumer(STREAM, GROUP, handler, consumer_name="c1", concurrency=3)):
        await eventually(lambda: len(started) == 3, what="3 handlers in flight")
        await asyncio.sleep(0.3)  # room for a (wrong) extra read
        assert len(started) == 3
        assert await pending_count(bus) == 3  # the other two are still unread in the stream
        release.set()
        await eventually(lambda: len(started) == 5, what="all 5 handled")
        await eventually(lambda: _no_pending(bus), what="all acked")


async def test_stop_cancels_handlers_past_the_drain_bound_and_restart_rereads_them(bus):
    never = asyncio.Event()
    first_run: list[Entry] = []
    second_run: list[Entry] = []

    async def stuck(message, entry):
        first_run.append(entry)
        await never.wait()

    async def quick(message, entry):
        second_run.append(entry)

    entry_id = await bus.publish(cancel("e0"))
    async with running(bus.consumer(STREAM, GROUP, stuck, consumer_name="same"), drain_timeout_s=0.2):
        await eventually(lambda: first_run, what="the stuck handler")
    pending = await bus.redis.xpending_range(bus.key(STREAM), GROUP, "-", "+", 10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [(entry_id, "same")]

    async with running(bus.consumer(STREAM, GROUP, quick, consumer_name="same", reclaim_idle_s=60)):
        await eventually(lambda: second_run, what="the pending entry re-read")
        await eventually(lambda: _no_pending(bus), what="ack")
    assert second_run[0].entry_id == entry_id
    assert second_run[0].deliveries == 2


async def test_group_is_recreated_when_it_disappears(bus, async_redis):
    handled: list[str] = []

    async def handler(message, entry):
        handled.append(message.experiment_id)

    async with running(bus.consumer(STREAM, GROUP, handler, consumer_name="c1")) as task:
        await bus.publish(cancel("before"))
        await eventually(lambda: handled == ["before"], what="first entry")
        await async_redis.delete(bus.key(STREAM))  # drops the group with the stream
        await bus.publish(cancel("after"))
        await eventually(lambda: handled == ["before", "after"], what="entry after NOGROUP")
        assert not task.done()


async def test_slow_live_handler_keeps_its_entry(bus):
    """Lease renewal: a handler slower than reclaim_idle_s is not handed to a
    second consumer of the group while its consumer lives."""
    handled_by: list[str] = []

    def handler_for(name: str, sleep_s: float):
        async def handler(message, entry):
            await asyncio.sleep(sleep_s)
            handled_by.append(name)
        return handler

    await bus.publish(cancel("slow"))
    # The handler outlives reclaim_idle_s twice over: without lease renewal "other" would take it.
    slow = bus.consumer(STREAM, GROUP, handler_for("slow", 2.2), consumer_name="slow", reclaim_idle_s=1.0)
    async with running(slow):
        await eventually(lambda: slow.in_flight == 1, what="slow handler started")
        other = bus.consumer(STREAM, GROUP, handler_for("other", 0.0), consumer_name="other", reclaim_idle_s=1.0)
        async with running(other):
            await eventually(lambda: handled_by, what="the slow handler")
            await asyncio.sleep(0.3)
    assert handled_by == ["slow"]
    assert await pending_count(bus) == 0


async def test_entry_delivered_too_often_without_ack_is_dead_lettered_unhandled(bus, async_redis):
    """A message that kills every consumer that touches it (no handler ever
    returns) must not crash-loop a service forever."""
    handled: list[str] = []

    async def handler(message, entry):
        handled.append(message.experiment_id)

    await bus.ensure_group(STREAM, GROUP)
    entry_id = await bus.publish(cancel("crasher"))
    for _ in range(3):  # three deliveries to a consumer that then "died"
        await async_redis.xreadgroup(GROUP, "dead", {bus.key(STREAM): "0" if _ else ">"})
    await asyncio.sleep(0.15)
    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1", max_deliveries=3, reclaim_idle_s=0.1)
    async with running(consumer):
        [letter] = await eventually(lambda: bus.dead_letters(STREAM), what="a dead letter")
    assert handled == []
    assert letter.entry_id == entry_id and letter.deliveries == 4
    assert "without an ack" in letter.reason


# ---------------------------------------------------------------- a real kill


@pytest.fixture
def workers(redis_url, stream_prefix, tmp_path):
    processes = WorkerProcesses(redis_url, stream_prefix, tmp_path)
    yield processes
    processes.stop_all()


def test_sigkilled_consumer_entry_is_handled_once_by_another(workers, sync_redis, stream_prefix):
    """Issue 2, point 1: SIGKILL in the middle of a handler; after the idle
    timeout another consumer of the group handles the entry; the effect
    (a non-idempotent INCR) happens exactly once."""
    fast_reclaim = ("--reclaim-idle-s", "1", "--heartbeat-ttl-s", "2")
    victim = workers.start("--handler-sleep-s", "60", *fast_reclaim)
    raw = {"kind": "experiment_cancel", "schema": 1, "experiment_id": "kill-me"}
    entry_id = sync_redis.xadd(f"{stream_prefix}experiments", {"msg": msgpack.packb(raw)}).decode()
    started = wait_for(lambda: sync_redis.lrange(f"{stream_prefix}started", 0, -1), 30, "victim's handler start")
    assert started == [f"kill-me|{victim.pid}".encode()]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    rescuer = workers.start("--handler-sleep-s", "0", *fast_reclaim)
    effects_key = f"{stream_prefix}effects:kill-me"
    wait_for(lambda: sync_redis.get(effects_key), 30, "the effect by the second consumer")
    wait_for(lambda: sync_redis.xpending(f"{stream_prefix}experiments", WORKER_GROUP)["pending"] == 0, 10, "ack")
    assert sync_redis.lrange(f"{stream_prefix}started", 0, -1) == [
        f"kill-me|{victim.pid}".encode(), f"kill-me|{rescuer.pid}".encode()
    ]
    events = sync_redis.xrange(f"{stream_prefix}events")
    assert len(events) == 1 and str(rescuer.pid) in msgpack.unpackb(events[0][1][b"msg"])["message"]
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(timeout=30) == 0, workers.logs()
    assert sync_redis.get(effects_key) == b"1"
    assert entry_id not in [d["message_id"].decode() for d in sync_redis.xpending_range(
        f"{stream_prefix}experiments", WORKER_GROUP, "-", "+", 10)]


# ---------------------------------------------------------------- hostile entries (issue 12)


async def test_entries_over_max_entry_bytes_are_dead_lettered_with_size_and_a_bounded_prefix(bus, async_redis):
    handled: list[str] = []

    async def handler(message, entry):
        handled.append(message.experiment_id)

    cap = 4096
    big_but_valid = messages.encode(cancel("x" * (cap + 10)))  # would decode fine: refused for its size alone
    big_garbage_field = {"msg": messages.encode(cancel("small")), "pad": b"z" * (cap * 4)}
    big_id = (await async_redis.xadd(bus.key(STREAM), {"msg": big_but_valid})).decode()
    garbage_id = (await async_redis.xadd(bus.key(STREAM), big_garbage_field)).decode()
    await bus.publish(cancel("fits"))
    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1", max_entry_bytes=cap)
    async with running(consumer) as task:
        letters = await eventually(lambda: _at_least(bus.dead_letters(STREAM), 2), what="2 dead letters")
        await eventually(lambda: handled == ["fits"], what="the entry under the cap")
        assert not task.done()
    by_id = {d.entry_id: d for d in letters}
    big = by_id[big_id]
    assert f"entry is {len(big_but_valid) + 3} bytes" in big.reason and f"limit of {cap} bytes" in big.reason
    assert "max_entry_bytes" in big.reason
    assert big.payload == big_but_valid[:1024]
    assert "limit of 4096 bytes" in by_id[garbage_id].reason
    assert len(by_id[garbage_id].payload) <= 1024
    assert await pending_count(bus) == 0


async def test_odd_entries_are_dead_lettered_with_a_reason(bus, async_redis):
    handled: list[str] = []

    async def handler(message, entry):
        handled.append(message.experiment_id)

    odd_entries = {
        "extra_field": {"msg": messages.encode(cancel("extra")), "trace": b"abc"},
        "binary_field_name": {b"\xff\xfe\x00": b"x"},
        "many_fields": {f"f{i}": b"v" for i in range(50)},
        "empty_msg": {"msg": b""},
        "deep_nesting": {"msg": b"\x81\xa1a" * 100_000 + b"\xc0"},
        "hostile_id": {"msg": msgpack.packb({"kind": "experiment_cancel", "experiment_id": "victim:s0\n",
                                             "schema": 1, "x": [1] * 10})},
    }
    ids = {name: (await async_redis.xadd(bus.key(STREAM), fields)).decode() for name, fields in odd_entries.items()}
    async with running(bus.consumer(STREAM, GROUP, handler, consumer_name="c1")) as task:
        letters = await eventually(lambda: _at_least(bus.dead_letters(STREAM), len(ids)), what="dead letters")
        await bus.publish(cancel("fine"))
        await eventually(lambda: handled == ["fine"], what="the good message")
        assert not task.done()
    reasons = {name: next(d.reason for d in letters if d.entry_id == entry_id) for name, entry_id in ids.items()}
    assert "fields other than 'msg'" in reasons["extra_field"] and "'trace'" in reasons["extra_field"]
    assert "no 'msg' field" in reasons["binary_field_name"]
    assert "no 'msg' field" in reasons["many_fields"] and "45 more" in reasons["many_fields"]
    assert len(reasons["many_fields"]) < 300
    assert reasons["empty_msg"].startswith("cannot decode message")
    assert "nested too deeply" in reasons["deep_nesting"]
    assert "unknown field `x`" in reasons["hostile_id"]
    assert await pending_count(bus) == 0


@pytest.mark.parametrize("error", [RecursionError("deep"), MemoryError(), KeyError("k"), ValueError("v"),
                                   ZeroDivisionError("z"), AssertionError("a")],
                         ids=lambda e: type(e).__name__)
async def test_any_handler_exception_is_retried_then_dead_lettered_never_fatal(bus, error):
    attempts: list[int] = []

    async def handler(message, entry):
        if message.experiment_id == "bad":
            attempts.append(entry.deliveries)
            raise error

    await bus.publish(cancel("bad"))
    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1", max_deliveries=2, retry_backoff_s=0.05)
    async with running(consumer) as task:
        [letter] = await eventually(lambda: bus.dead_letters(STREAM), what="a dead letter")
        assert not task.done()
    assert attempts == [1, 2]
    assert type(error).__name__ in letter.reason


async def test_a_failing_dead_letter_write_leaves_the_entry_pending_and_the_consumer_alive(bus, async_redis):
    """Dead-lettering itself can fail (here: the dead-letter key holds the
    wrong type); the consumer keeps serving and dead-letters it later."""
    handled: list[str] = []

    async def handler(message, entry):
        handled.append(message.experiment_id)

    await async_redis.set(bus.key(DEAD_LETTER_STREAM), b"not a stream")
    garbage_id = (await async_redis.xadd(bus.key(STREAM), {"msg": b"\xc1"})).decode()
    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1", reclaim_idle_s=0.5)
    async with running(consumer) as task:
        await bus.publish(cancel("after"))
        await eventually(lambda: handled == ["after"], what="the entry after the failed dead letter")
        assert await pending_count(bus) == 1  # the garbage entry: still pending, not lost
        assert consumer.dead_lettered == 0
        await async_redis.delete(bus.key(DEAD_LETTER_STREAM))
        [letter] = await eventually(lambda: bus.dead_letters(STREAM), what="the dead letter on a later try")
        assert not task.done()
    assert letter.entry_id == garbage_id and "cannot decode" in letter.reason
    assert await pending_count(bus) == 0


# ---------------------------------------------------------------- a Redis restart (issue 12)


async def test_consumer_rides_out_a_redis_restart_and_an_outage_failure_is_not_a_delivery(own_redis, stream_prefix):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(own_redis.url)
    bus = StreamBus(client, prefix=stream_prefix)
    handled: list[tuple[str, int]] = []
    outage = asyncio.Event()

    async def handler(message, entry):
        if message.experiment_id == "during":
            await outage.wait()
            await client.incr(stream_prefix + "effect")  # fails while Redis is down
        handled.append((message.experiment_id, entry.deliveries))

    await bus.publish(cancel("before"))
    await bus.publish(cancel("during"))
    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1", max_deliveries=1, retry_backoff_s=0.05)
    async with running(consumer) as task:
        await eventually(lambda: handled == [("before", 1)] and consumer.in_flight == 1, what="first entry")
        own_redis.kill()
        outage.set()
        await eventually(lambda: consumer.failed >= 1, what="the handler failing on the outage")
        await asyncio.sleep(1.0)  # the consumer keeps retrying meanwhile
        assert not task.done()
        own_redis.start()  # same port, same data
        await eventually(lambda: ("during", 1) in handled, timeout_s=30, what="the entry handled after the restart")
        await bus.publish(cancel("after"))
        await eventually(lambda: ("after", 1) in handled, timeout_s=30, what="a new entry after the restart")
        assert not task.done()
    # max_deliveries=1, yet the entry that failed over the outage was retried, not dead-lettered
    assert await bus.dead_letters(STREAM) == []
    assert await client.get(stream_prefix + "effect") == b"1"
    await client.aclose()


async def test_stop_ends_a_consumer_promptly_while_redis_is_down(own_redis, stream_prefix):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(own_redis.url)
    bus = StreamBus(client, prefix=stream_prefix)

    async def handler(message, entry):
        return None

    consumer = bus.consumer(STREAM, GROUP, handler, consumer_name="c1")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop), name="consumer-under-outage")
    await eventually(lambda: client.exists(bus.key(STREAM)), what="the group and its stream")
    own_redis.kill()
    await asyncio.sleep(1.5)  # several failed reads: still running, retrying
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=EVENTUALLY_S)  # returns (no error) although Redis is still down
    await client.aclose()
