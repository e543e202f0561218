"""The gateway's tables and futures in Redis: what one gateway process
stored, the next one loads; hostile entries and ids are refused."""

from __future__ import annotations

import asyncio

from services.gateway.futures import RESTARTED, FutureStore
from services.gateway.runs import Registry, Run, parse_tinker_path
from services.gateway.store import RedisTables


async def _value(value, delay_s: float = 0.0):
    await asyncio.sleep(delay_s)
    return value


async def test_a_new_registry_loads_what_the_last_one_stored(async_redis, stream_prefix):
    tables = RedisTables(async_redis, stream_prefix)
    first = Registry(tables)
    session = await first.add_session("alice")
    run = Run(run_id="tk-00aa", owner="alice", lora_rank=4, base_model="m")
    await first.add_run(run)
    run.sampler_paths["step-1"], run.latest_version = 3, 3
    run.state_names.add("ckpt")
    await first.add_run(run)
    await first.add_alias(f"{session}:train:0", run.run_id)
    sampling = await first.add_sampling("alice", run.run_id, 3, "tinker://tk-00aa/sampler_weights/step-1", "m")
    await async_redis.hset(f"{stream_prefix}gateway:runs", "tk-bad", b"\xc1not msgpack")
    await async_redis.hset(f"{stream_prefix}gateway:runs", "tk-other", await async_redis.hget(
        f"{stream_prefix}gateway:runs", "tk-00aa"))  # a row whose id is not its key

    second = Registry(tables)
    await second.load()
    assert second.counts() == {"runs": 1, "sessions": 1, "sampling_sessions": 1}
    assert second.session_owned(session, "alice") and not second.session_owned(session, "bob")
    loaded = second.run(f"{session}:train:0", "alice")
    assert loaded == run and second.run("tk-00aa", "bob") is None
    assert second.sampler_version(parse_tinker_path("tinker://tk-00aa/sampler_weights/step-1"), "alice")[1] == 3
    assert second.state_of(parse_tinker_path("tinker://tk-00aa/weights/ckpt"), "alice") is loaded
    assert second.sampling(sampling, "alice").adapter_version == 3 and second.sampling(sampling, "bob") is None


async def test_futures_outlive_their_gateway(async_redis, stream_prefix):
    tables = RedisTables(async_redis, stream_prefix)
    first = FutureStore(keep_s=60.0, tables=tables)
    done_id = await first.start("alice", _value({"metrics": {"loss": 1.5}}), 5.0)
    proto_id = await first.start("alice", _value(b"\x08\x01"), 5.0)
    for request_id in (done_id, proto_id):
        assert await first.wait(first.get(request_id, "alice"), 5.0)
    in_flight_id = await first.start("alice", _value({}, delay_s=30.0), 60.0)
    assert await async_redis.pttl(f"{stream_prefix}gateway:future:{done_id}") > 0
    await first.close()  # the gateway stops (or dies) with one future in flight

    second = FutureStore(keep_s=60.0, tables=tables)
    done = await second.find(done_id, "alice")
    assert done.json == {"metrics": {"loss": 1.5}} and done.error is None and done.done.is_set()
    assert (await second.find(proto_id, "alice")).proto == b"\x08\x01"
    in_flight = await second.find(in_flight_id, "alice")
    assert (in_flight.error, in_flight.category) == (RESTARTED, "server")
    assert await second.find(done_id, "bob") is None
    for hostile in ("req-*", "../req", ["req"], None, "req-" + "0" * 23 + ":x"):
        assert await second.find(hostile, "alice") is None
