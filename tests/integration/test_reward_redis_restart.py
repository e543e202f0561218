"""The reward service rides out a Redis restart with no manual step: its
reader of reward-worker replies retries while Redis is away and delivers
replies again once it is back (it used to raise, and the service exited 1)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from services.reward.service import RewardService
from services.reward.worker import reward_worker
from shared.bus import StreamBus
from shared.messages import RewardSpec
from shared.redis_server import EmbeddedRedis
from tests.integration.test_reward_service import completion, config, read_messages, running

WAIT_S = 60.0  # a guard against hanging, never an assertion


async def wait_for_log(logs: list[dict], event: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not any(entry["event"] == event for entry in logs):
            await asyncio.sleep(0.05)


async def test_worker_replies_survive_a_redis_restart(tmp_path, stream_prefix):
    redis_server = EmbeddedRedis(tmp_path / "valkey", persist=False)  # a restart comes back empty, same port
    redis_server.start()
    client = aioredis.Redis.from_url(redis_server.url)

    @reward_worker("length")
    def reward(prompt: str, text: str, answer: str | None) -> float:
        return float(len(text))

    stop_worker = asyncio.Event()
    worker = asyncio.create_task(reward.serve(redis_url=redis_server.url, stream_prefix=stream_prefix,
                                              stop=stop_worker))
    service = RewardService(config(redis_server.url, stream_prefix, []))
    spec = RewardSpec(type="worker", worker="length", timeout_s=5, max_attempts=5)
    try:
        with capture_logs() as logs:
            async with running(service) as service_task:
                bus = StreamBus(client, prefix=stream_prefix)
                await bus.publish(completion("before", spec, ["a", "abc"], request_id="before:s0:p0"))
                before = await read_messages(client, stream_prefix + "scored", 1)

                redis_server.stop()
                await wait_for_log(logs, "reward_replies_read_retrying")  # the reader saw the outage
                redis_server.start()

                await client.aclose()  # the test's own connections died with the server
                client = aioredis.Redis.from_url(redis_server.url)
                bus = StreamBus(client, prefix=stream_prefix)
                await bus.publish(completion("after", spec, ["ab", "abcd"], request_id="after:s0:p0"))
                after = await read_messages(client, stream_prefix + "scored", 1)
                assert not service_task.done()
        stop_worker.set()
        await asyncio.wait_for(worker, WAIT_S)
    finally:
        await client.aclose()
        redis_server.stop()
    assert before[0].rewards == [1.0, 3.0]
    assert after[0].completion.experiment_id == "after"
    assert after[0].reward_error is None and after[0].rewards == [2.0, 4.0]
