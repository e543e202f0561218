"""Tinker API operations at the message level: ``TinkerOp``s published on a
real Redis to a running trainer (and rollout), results read back from
``tinker_results`` / ``tinker_samples``; checked against direct torch
computations with the shipped tiny model."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.trainer.service import TrainerService
from shared.bus import StreamBus
from shared.config import TrainerConfig
from shared.messages import AdapterPublished, decode
from shared.tinker_messages import AdamParams, Datum, TensorData, TinkerOp, TinkerOpResult

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "clora-tiny"
RANK, ALPHA = 8, 16.0
EVENTUALLY_S = 120.0


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared
    yield
    torch.set_num_threads(previous)


def trainer_config(redis_url: str, prefix: str, data_dir: Path, **overrides) -> TrainerConfig:
    config = TrainerConfig(
        redis_url=redis_url, stream_prefix=prefix, model_dir=str(MODEL_DIR), data_dir=str(data_dir),
        consumer_name="trainer-tinker-test", device="cpu", dtype="float32", lora_rank=RANK, lora_alpha=ALPHA,
        max_deliveries=2, drain_timeout_s=10.0, heartbeat_ttl_s=2.0,
    )
    return replace(config, **overrides)


class Replies:
    """Reads a reply stream from its start; hands out replies by id."""

    def __init__(self, redis, prefix: str, stream: str, id_field: str) -> None:
        self.redis, self.key, self.stream, self.id_field = redis, prefix + stream, stream, id_field
        self.last_id, self.seen = "0", {}

    async def get(self, reply_id: str):
        deadline = asyncio.get_running_loop().time() + EVENTUALLY_S
        while reply_id not in self.seen:
            remaining_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
            assert remaining_ms > 0, f"no reply {reply_id} on {self.key}"
            reply = await self.redis.xread({self.key: self.last_id}, block=min(remaining_ms, 500))
            for _, entries in reply:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    message = decode(fields[b"msg"], self.stream)
                    self.seen.setdefault(getattr(message, self.id_field), message)
        return self.seen[reply_id]


class TinkerDriver:
    def __init__(self, bus: StreamBus, results: Replies, run_id: str) -> None:
        self.bus, self.results, self.run_id = bus, results, run_id

    async def op(self, op: str, **fields) -> TinkerOpResult:
        op_id = uuid.uuid4().hex
        fields.setdefault("run_id", self.run_id)
        self.last_op = TinkerOp(op_id=op_id, op=op, **fields)
        await self.bus.publish(self.last_op)
        return await self.results.get(op_id)

    async def ok(self, op: str, **fields) -> TinkerOpResult:
        result = await self.op(op, **fields)
        assert result.ok, result.error
        return result


def ce_datum(tokens: list[int], weights: list[float] | None = None) -> Datum:
    inputs = {"target_tokens": TensorData(data=[float(t) for t in tokens[1:]], dtype="int64")}
    if weights is not None:
        inputs["weights"] = TensorData(data=weights)
    return Datum(model_input=tokens[:-1], loss_fn_inputs=inputs)


DATA_A = [ce_datum([5, 17, 29, 40, 7, 3]), ce_datum([11, 2, 40, 7], [0.0, 1.0, 0.5])]
DATA_B = [ce_datum([9, 45, 1, 26, 33, 8, 14])]


def peft_from(path: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return PeftModel.from_pretrained(base, path, is_trainable=True).eval()


def direct_ce_loss(model, data: list[Datum]) -> torch.Tensor:
    total = torch.zeros(())
    for datum in data:
        logits = model(input_ids=torch.tensor([datum.model_input])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([int(t) for t in datum.loss_fn_inputs["target_tokens"].data])
        token_logp = logp.gather(-1, targets[:, None])[:, 0]
        weights = (torch.tensor(datum.loss_fn_inputs["weights"].data) if "weights" in datum.loss_fn_inputs
                   else torch.ones_like(token_logp))
        total = total - (weights * token_logp).sum()
    return total


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {k.replace(".default.", "."): v for k, v in model.named_parameters() if "lora_" in k}


async def start(service) -> asyncio.Task:
    await service.setup()
    return asyncio.create_task(service.run())


async def stop(service, task: asyncio.Task) -> None:
    service.stop()
    await asyncio.wait_for(task, EVENTUALLY_S)
    await service.close()


async def test_forward_backward_accumulates_and_optim_step_is_adam(redis_url, stream_prefix, async_redis, tmp_path):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    results = Replies(async_redis, stream_prefix, "tinker_results", "op_id")
    service = TrainerService(trainer_config(redis_url, stream_prefix, tmp_path))
    task = await start(service)
    run = TinkerDriver(bus, results, "tk-" + uuid.uuid4().hex[:16])
    try:
        await run.ok("create", lora_rank=RANK, seed=3)
        saved = await run.ok("save_weights", name="start")
        assert saved.adapter_version == 1
        first = await run.ok("forward_backward", data=DATA_A, loss_fn="cross_entropy")
        await bus.publish(run.last_op)  # a redelivery: answered again, its gradient not added twice
        second = await run.ok("forward_backward", data=DATA_B, loss_fn="cross_entropy")
        adam = AdamParams(learning_rate=0.01, beta1=0.9, beta2=0.95, eps=1e-8)
        await run.ok("optim_step", adam=adam)
        after = await run.ok("save_weights", name="after")
        assert after.adapter_version == 2
        forward_after = await run.ok("forward", data=DATA_A, loss_fn="cross_entropy")
    finally:
        await stop(service, task)

    store = service.store
    # The same computation, directly: the saved start version, both batches' losses (gradients accumulated in
    # the same order, on one thread as the trainer's), one torch Adam step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = peft_from(str(store.path(run.run_id, 1)))
        loss_a = direct_ce_loss(model, DATA_A)
        loss_b = direct_ce_loss(model, DATA_B)
        params = lora_params(model)
        optimizer = torch.optim.Adam(list(params.values()), lr=adam.learning_rate, betas=(adam.beta1, adam.beta2),
                                     eps=adam.eps)
        loss_a.backward()
        loss_b.backward()
        optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert first.metrics["loss:sum"] == pytest.approx(loss_a.item(), rel=1e-5)
    assert second.metrics["loss:sum"] == pytest.approx(loss_b.item(), rel=1e-5)
    elementwise = first.loss_fn_outputs[1]["elementwise_loss"].data
    assert elementwise[0] == 0.0 and len(elementwise) == 3  # weight 0: no loss
    trained = store.load_tensors(store.path(run.run_id, 2))
    assert set(trained) == set(params)
    # Adam moves every element by up to the learning rate (0.01); one whose gradient is within float noise of
    # zero lands anywhere in that range, so the bound is 1% of it: a wrong rule (SGD, other betas, no bias
    # correction) is off by the learning rate's order on most elements.
    for name, param in params.items():
        torch.testing.assert_close(trained[name], param.detach(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert forward_after.metrics["loss:sum"] == pytest.approx(direct_ce_loss(model, DATA_A).item(), rel=1e-5)
    assert forward_after.metrics["loss:sum"] < first.metrics["loss:sum"]


async def test_bad_ops_get_clear_errors_and_the_consumer_keeps_going(
        redis_url, stream_prefix, async_redis, tmp_path):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    results = Replies(async_redis, stream_prefix, "tinker_results", "op_id")
    adapters = Replies(async_redis, stream_prefix, "adapters", "version")
    service = TrainerService(trainer_config(redis_url, stream_prefix, tmp_path))
    task = await start(service)
    run = TinkerDriver(bus, results, "tk-" + uuid.uuid4().hex[:16])
    try:
        missing = await run.op("forward", data=DATA_A)
        assert not missing.ok and "does not exist" in (missing.error or "")
        bad_id = await run.op("create", run_id="../etc")
        assert not bad_id.ok and "not a valid id" in (bad_id.error or "")
        await run.ok("create", lora_rank=4)
        too_big = await run.op("create", run_id="tk-big", lora_rank=RANK * 4)
        assert not too_big.ok and too_big.error_kind == "user"
        wrong_inputs = await run.op("forward_backward", data=DATA_A, loss_fn="importance_sampling")
        assert not wrong_inputs.ok and "lacks" in (wrong_inputs.error or "")
        out_of_vocab = await run.op("forward", data=[ce_datum([1, 10**9, 3])])
        assert not out_of_vocab.ok and "vocabulary" in (out_of_vocab.error or "")
        short = Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": TensorData(data=[2.0], dtype="int64")})
        assert not (await run.op("forward", data=[short])).ok
        bad_name = await run.op("save_state", name="../../escape")
        assert not bad_name.ok and "checkpoint name" in (bad_name.error or "")
        no_state = await run.op("load_state", name="never-saved")
        assert not no_state.ok and "no saved state" in (no_state.error or "")
        bad_adam = await run.op("optim_step", adam=AdamParams(beta1=1.5))
        assert not bad_adam.ok and "beta1" in (bad_adam.error or "")
        await async_redis.xadd(stream_prefix + "tinker_ops", {"msg": b"\x93not a message"})

        # Still serving: a save_state / load_state round trip into a new run gives the same forward.
        await run.ok("forward_backward", data=DATA_B)
        await run.ok("optim_step", adam=AdamParams(learning_rate=0.05))
        before = await run.ok("forward", data=DATA_A)
        await run.ok("save_state", name="ckpt-1")
        copy = TinkerDriver(bus, results, "tk-" + uuid.uuid4().hex[:16])
        loaded = await copy.ok("load_state", name="ckpt-1", source_run_id=run.run_id)
        assert loaded.lora_rank == 4
        again = await copy.ok("forward", data=DATA_A)
        assert again.metrics["loss:sum"] == pytest.approx(before.metrics["loss:sum"], rel=1e-6)
        # A saved state whose files changed on disk is refused, and creates no run.
        await run.ok("save_state", name="ckpt-2")
        tampered = tmp_path / "tinker_states" / run.run_id / "ckpt-2" / "adapter.safetensors"
        tampered.write_bytes(tampered.read_bytes()[:-4] + b"\0\0\0\0")
        stranger = TinkerDriver(bus, results, "tk-" + uuid.uuid4().hex[:16])
        refused = await stranger.op("load_state", name="ckpt-2", source_run_id=run.run_id)
        assert not refused.ok and "digest" in (refused.error or "")
        assert not (await stranger.op("forward", data=DATA_A)).ok  # no such run
        saved = await copy.ok("save_weights")
        announced: AdapterPublished = await adapters.get(saved.adapter_version)
        assert announced.experiment_id == copy.run_id
        assert service.store.verify(announced.path) == announced.digest
        letters = await bus.dead_letters("tinker_ops")
        assert len(letters) == 1

        # Policy-gradient losses against their definitions: sampling logprobs q = the model's (ratio 1),
        # then q = logp - 0.5 (ratio e^0.5, clipped by ppo to 1.2 for a positive advantage).
        logp = before.loss_fn_outputs[0]["logprobs"].data
        datum = DATA_A[0]
        advantages = [1.0, 0.5, 2.0, 0.25, 1.5][:len(logp)]

        def pg_datum(q: list[float]) -> Datum:
            return Datum(model_input=datum.model_input, loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"], "logprobs": TensorData(data=q),
                "advantages": TensorData(data=advantages)})

        on_policy = await run.ok("forward", data=[pg_datum(logp)], loss_fn="importance_sampling")
        assert on_policy.metrics["loss:sum"] == pytest.approx(-sum(advantages), rel=1e-5)
        shifted = [x - 0.5 for x in logp]
        clipped = await run.ok("forward", data=[pg_datum(shifted)], loss_fn="ppo")
        assert clipped.metrics["loss:sum"] == pytest.approx(-1.2 * sum(advantages), rel=1e-5)
        unclipped = await run.ok("forward", data=[pg_datum(shifted)], loss_fn="ppo",
                                 loss_fn_config={"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
        assert unclipped.metrics["loss:sum"] == pytest.approx(-math.exp(0.5) * sum(advantages), rel=1e-5)
        bad_config = await run.op("forward", data=[pg_datum(logp)], loss_fn="ppo", loss_fn_config={"eps": 0.1})
        assert not bad_config.ok and "unknown keys" in (bad_config.error or "")

        # Version 0 is the base model: a run that was never created may score tokens under it.
        base_only = TinkerDriver(bus, results, "tk-" + uuid.uuid4().hex[:16])
        scored = await base_only.ok("compute_logprobs", data=[Datum(model_input=[4, 9, 12])], adapter_version=0)
        values = scored.loss_fn_outputs[0]["logprobs"].data
        assert len(values) == 3 and math.isnan(values[0]) and all(v < 0 for v in values[1:])
    finally:
        await stop(service, task)


async def test_sampled_logprobs_match_the_trainers_under_the_same_version(
        redis_url, stream_prefix, async_redis, tmp_path):
    from services.rollout.service import RolloutService
    from services.rollout.torch_engine import TorchEngine
    from shared.config import RolloutConfig
    from shared.messages import Prompt, RewardSpec, RolloutRequest, SamplingParams
    from shared.tinker_messages import TinkerSampleRequest, TinkerSampling

    bus = StreamBus(async_redis, prefix=stream_prefix)
    results = Replies(async_redis, stream_prefix, "tinker_results", "op_id")
    samples = Replies(async_redis, stream_prefix, "tinker_samples", "request_id")
    trainer = TrainerService(trainer_config(redis_url, stream_prefix, tmp_path))
    config = RolloutConfig(
        redis_url=redis_url, stream_prefix=stream_prefix, consumer_name="rollout-tinker-test",
        model_dir=str(MODEL_DIR), data_dir=str(tmp_path), device="cpu", dtype="float32", max_rows=8, max_loras=4,
        lora_rank=RANK, lora_alpha=ALPHA, drain_timeout_s=10.0)
    # ignore_eos: every sequence runs to max_tokens, so the two requests below surely overlap
    engine = TorchEngine(str(MODEL_DIR), config.signature, max_rows=config.max_rows, max_loras=config.max_loras,
                         device="cpu", dtype="float32", ignore_eos=True)
    rollout = RolloutService(config, engine=engine)
    trainer_task, rollout_task = await start(trainer), await start(rollout)
    run = TinkerDriver(bus, results, "tk-" + uuid.uuid4().hex[:16])
    prompt = [5, 17, 29, 40]

    async def sample(version: int, **fields):
        request_id = uuid.uuid4().hex
        fields.setdefault("prompt_token_ids", prompt)
        await bus.publish(TinkerSampleRequest(
            request_id=request_id, run_id=run.run_id, adapter_version=version, num_samples=2,
            sampling=TinkerSampling(max_tokens=6, temperature=1.0, seed=7), **fields))
        return await samples.get(request_id)

    try:
        await run.ok("create", lora_rank=RANK)
        await run.ok("forward_backward", data=DATA_A + DATA_B)
        await run.ok("optim_step", adam=AdamParams(learning_rate=0.05))
        version = (await run.ok("save_weights", name="trained")).adapter_version
        checked = 0
        for sampled_version in (version, 0):
            result = await sample(sampled_version)
            assert result.error is None and len(result.sequences) == 2
            data = [Datum(model_input=prompt + s.token_ids) for s in result.sequences if s.token_ids]
            scored = await run.ok("compute_logprobs", data=data, adapter_version=sampled_version)
            for sequence, output in zip([s for s in result.sequences if s.token_ids], scored.loss_fn_outputs,
                                        strict=True):
                recomputed = output["logprobs"].data[len(prompt):]
                assert recomputed == pytest.approx(sequence.logprobs, abs=1e-4)
                checked += len(recomputed)
        assert checked > 0
        # the trained version samples differently from the base: the adapter was applied
        trained_lp = (await run.ok("compute_logprobs", data=[Datum(model_input=prompt)], adapter_version=version))
        base_lp = (await run.ok("compute_logprobs", data=[Datum(model_input=prompt)], adapter_version=0))
        assert trained_lp.loss_fn_outputs[0]["logprobs"].data[1:] != pytest.approx(
            base_lp.loss_fn_outputs[0]["logprobs"].data[1:], abs=1e-4)

        missing = await sample(version + 5)
        assert missing.error is not None and "unavailable" in missing.error and not missing.sequences
        empty = await sample(0, prompt_token_ids=[])
        assert empty.error is not None and "empty" in empty.error
        out_of_vocab = await sample(0, prompt_token_ids=[10**6])
        assert out_of_vocab.error is not None
        assert (await sample(version)).error is None  # still serving

        # A scheduler experiment's request and a Tinker run's decode in the same steps.
        await bus.publish(RolloutRequest(
            request_id="exp-a:0", experiment_id="exp-a", step=0, purpose="train",
            prompts=[Prompt(prompt_id="p0", text="12+30=")], adapter_version=0, adapter_path=None,
            sampling=SamplingParams(n=2, max_tokens=40, seed=1), reward=RewardSpec(type="exact_match")))
        long_request = uuid.uuid4().hex
        await bus.publish(TinkerSampleRequest(
            request_id=long_request, run_id=run.run_id, adapter_version=version, prompt_token_ids=prompt,
            num_samples=2, sampling=TinkerSampling(max_tokens=40, seed=2)))
        long = await samples.get(long_request)
        assert long.error is None and [len(s.token_ids) for s in long.sequences] == [40, 40]
        await Replies(async_redis, stream_prefix, "completions", "request_id").get("exp-a:0")
        step_tenants = rollout.engine.stats().step_tenants
        assert [s for s in step_tenants if {run.run_id, None} <= s], f"never in one decode step: {step_tenants}"
    finally:
        await stop(rollout, rollout_task)
        await stop(trainer, trainer_task)
