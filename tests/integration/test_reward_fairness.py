"""Fair scoring on the real Redis protocol with the real reward service: a
slow HTTP reward tenant holds at most its share of scoring slots while a
built-in reward tenant keeps being scored, and every reward's time is bounded
by the operator's limits whatever the spec asks for."""

from __future__ import annotations

import asyncio
import dataclasses

from services.reward.service import RewardService
from shared.bus import StreamBus
from shared.messages import RewardSpec
from tests.integration.test_reward_service import (
    by_experiment,
    completion,
    config,
    raw_server,
    read_messages,
    running,
)


@dataclasses.dataclass
class SlowServer:
    """Counts the requests it holds open; answers only once ``release`` is set."""

    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    open_now: int = 0
    most_open: int = 0
    received: int = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.received += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.release.wait()
            body = b'{"reward": 0.5}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        finally:
            self.open_now -= 1
            writer.close()

    async def wait_for_open(self, count: int) -> None:
        async with asyncio.timeout(30):  # a guard against hanging, never an assertion
            while self.open_now < count:
                await asyncio.sleep(0.01)


async def test_a_slow_http_tenant_slows_only_itself(redis_url, stream_prefix, async_redis):
    slow_server = SlowServer()
    async with raw_server(slow_server) as slow_url:
        settings = dataclasses.replace(config(redis_url, stream_prefix, [slow_url]),
                                       max_inflight=4, max_inflight_per_experiment=2)
        service = RewardService(settings)
        async with running(service):
            bus = StreamBus(async_redis, prefix=stream_prefix)
            # The slow tenant's six completions (12 requests) are on the stream first.
            slow_spec = RewardSpec(type="http", url=slow_url, timeout_s=60, max_attempts=1)
            for index in range(6):
                await bus.publish(completion("slow", slow_spec, ["42", "7"], request_id=f"slow:s0:p{index}"))
            await slow_server.wait_for_open(2)
            for index in range(6):
                await bus.publish(completion("builtin", RewardSpec(type="exact_match"), ["42", "7"],
                                             request_id=f"builtin:s0:p{index}"))
            builtin = await read_messages(async_redis, stream_prefix + "scored", 6)
            # every built-in completion is scored while the slow tenant's all wait
            assert {s.completion.experiment_id for s in builtin} == {"builtin"}
            assert all(s.rewards == [1.0, 0.0] for s in builtin)
            assert slow_server.received == 2 and slow_server.most_open == 2
            slow_server.release.set()
            slow = await read_messages(async_redis, stream_prefix + "scored", 6,
                                       where=lambda m: m.completion.experiment_id == "slow")
    assert all(s.reward_error is None and s.rewards == [0.5, 0.5] for s in slow)
    assert slow_server.received == 12
    assert slow_server.most_open == 2  # never more than max_inflight_per_experiment at the server


async def test_reward_time_is_bounded_by_the_operators_limits(redis_url, stream_prefix, async_redis):
    never_answers = SlowServer()
    async with raw_server(never_answers) as hang_url:
        settings = dataclasses.replace(config(redis_url, stream_prefix, [hang_url]), max_reward_timeout_s=0.3,
                                       max_reward_attempts=5, max_reward_budget_s=0.7)
        service = RewardService(settings)
        async with running(service):
            bus = StreamBus(async_redis, prefix=stream_prefix)
            greedy = RewardSpec(type="http", url=hang_url, timeout_s=3600, max_attempts=100)
            await bus.publish(completion("greedy", greedy, ["42"]))
            await bus.publish(completion("nobody", RewardSpec(type="worker", worker="nobody", timeout_s=3600,
                                                              max_attempts=100), ["42"]))
            scored = by_experiment(await read_messages(async_redis, stream_prefix + "scored", 2))
            never_answers.release.set()
    # 0.3 s per attempt, and 2 attempts fit the 0.7 s budget
    assert "0.3s" in scored["greedy"].reward_error and "attempt 2 of 2" in scored["greedy"].reward_error
    assert never_answers.received == 2
    assert "within 0.3s (2 attempt(s))" in scored["nobody"].reward_error

