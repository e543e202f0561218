"""Stop strings end a completion: the rollout service on the real Redis
protocol, driving the torch engine on the shipped tiny model (greedy, so each
completion is known: '57+68=' -> '125' then the eos token)."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from services.rollout.service import RolloutService
from services.rollout.torch_engine import TorchEngine
from shared.bus import StreamBus
from shared.config import DEFAULT_MODEL_DIR, RolloutConfig
from shared.messages import Completion, Prompt, RewardSpec, RolloutRequest, SamplingParams, decode

RESULT_WAIT_S = 120.0  # a guard against hanging, never an assertion


@contextlib.asynccontextmanager
async def rollout_service(redis_url, stream_prefix, data_dir):
    torch.set_num_threads(1)
    config = RolloutConfig(redis_url=redis_url, stream_prefix=stream_prefix, consumer_name="rollout-stop-test",
                           data_dir=str(data_dir), device="cpu", dtype="float32", max_rows=8, max_loras=2,
                           drain_timeout_s=10.0)
    engine = TorchEngine(DEFAULT_MODEL_DIR, config.signature, max_rows=config.max_rows, max_loras=config.max_loras,
                         device="cpu", dtype="float32", torch_threads=1)
    service = RolloutService(config, engine=engine)
    await service.setup()
    task = asyncio.create_task(service.run(), name="rollout-under-test")
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
        await service.close()


def greedy_request(name: str, stop: list[str]) -> RolloutRequest:
    return RolloutRequest(
        request_id=f"exp-stop:{name}", experiment_id="exp-stop", step=0, purpose="eval",
        prompts=[Prompt(prompt_id=name, text="57+68=", answer="125")], adapter_version=0, adapter_path=None,
        sampling=SamplingParams(n=1, temperature=0.0, max_tokens=8, stop=stop), reward=RewardSpec(type="math"),
    )


async def read_completions(redis, key: str, count: int) -> dict[str, Completion]:
    deadline = asyncio.get_running_loop().time() + RESULT_WAIT_S
    while True:
        found = [decode(fields[b"msg"]) for _, fields in await redis.xrange(key)]
        if len(found) >= count:
            return {c.request_id.split(":")[1]: c for c in found if isinstance(c, Completion)}
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(found)} of {count} completions on {key}")
        await asyncio.sleep(0.05)


async def test_a_stop_string_ends_the_completion(redis_url, stream_prefix, async_redis, tmp_path):
    async with rollout_service(redis_url, stream_prefix, tmp_path) as service:
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(greedy_request("plain", []))
        plain = (await read_completions(async_redis, stream_prefix + "completions", 1))["plain"].results[0].samples[0]
        # the greedy completion is known now: stop strings taken from its text
        text = plain.text
        requests = {"one-char": [text[1]], "two-chars": [text[1:3]], "earliest": [text[2:], text[1]],
                    "at-start": [text[0]], "absent": ["x"]}
        for name, stop in requests.items():
            await bus.publish(greedy_request(name, stop))
        completions = await read_completions(async_redis, stream_prefix + "completions", 1 + len(requests))
        tokenizer = service.engine.tokenizer()
    assert all(c.error is None for c in completions.values())
    assert len(text) >= 3 and plain.finish_reason == "stop"  # ended by the eos token
    assert len(plain.token_ids) == len(text) + 1  # a token per character, then eos
    samples = {name: completion.results[0].samples[0] for name, completion in completions.items()}
    for name, stop in requests.items():
        sample = samples[name]
        at = min((text.find(s) for s in stop if s in text), default=None)
        # cut after the token that completes the stop string; the text ends before it
        kept = len(plain.token_ids) if at is None else at + len(next(s for s in stop if text.find(s) == at))
        assert sample.text == (text if at is None else text[:at]), name
        assert sample.token_ids == plain.token_ids[:kept] and sample.logprobs == plain.logprobs[:kept], name
        assert sample.finish_reason == "stop"
    assert samples["two-chars"].text == text[:1] and len(samples["two-chars"].token_ids) == 3
    assert plain.token_ids[-1] not in samples["two-chars"].token_ids  # the tokens after it are gone (eos too)
    assert tokenizer.decode(samples["two-chars"].token_ids) == text[:3]
