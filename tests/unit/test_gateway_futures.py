"""The gateway's futures: owned by one key, outcomes kept, failures said."""

from __future__ import annotations

import asyncio

from services.gateway.futures import FutureStore, OpFailed


async def _value(value, delay_s: float = 0.0):
    await asyncio.sleep(delay_s)
    return value


async def _fail(error: Exception):
    raise error


async def test_a_future_is_only_its_owners_and_keeps_its_outcome():
    store = FutureStore(keep_s=60.0)
    json_id = await store.start("alice", _value({"metrics": {"loss": 1.0}}), timeout_s=5.0)
    proto_id = await store.start("alice", _value(b"\x01\x02"), timeout_s=5.0)
    assert store.get(json_id, "bob") is None and store.get(["x"], "alice") is None
    record = store.get(json_id, "alice")
    assert await store.wait(record, 5.0) and record.json == {"metrics": {"loss": 1.0}} and record.error is None
    proto = store.get(proto_id, "alice")
    assert await store.wait(proto, 5.0) and proto.proto == b"\x01\x02"


async def test_failures_carry_a_reason_and_a_category():
    store = FutureStore(keep_s=60.0)
    user = store.get(await store.start("a", _fail(OpFailed("rank too large")), 5.0), "a")
    server = store.get(await store.start("a", _fail(RuntimeError("boom")), 5.0), "a")
    slow = store.get(await store.start("a", _value({}, delay_s=5.0), 0.05), "a")
    for record in (user, server, slow):
        assert await store.wait(record, 5.0)
    assert (user.error, user.category) == ("rank too large", "user")
    assert server.category == "server" and "boom" in server.error
    assert slow.category == "server" and "within" in slow.error


async def test_a_pending_future_waits_then_reports_not_done():
    store = FutureStore(keep_s=60.0)
    record = store.get(await store.start("a", _value({}, delay_s=5.0), 10.0), "a")
    assert not await store.wait(record, 0.05)
    assert store.pending() == 1
    await store.close()
    assert record.done.is_set() and record.category == "server"
