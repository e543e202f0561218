"""The rollout service on the real Redis protocol, run in-process, driving the
torch engine on a tiny random Qwen3 (hidden 64, 2 layers, char-level
tokenizer) saved to a temporary directory, with PEFT adapters on disk.

Shows: rows of two tenants decoded in the same engine steps (from the
engine's statistics); a new adapter version announced mid-generation, loaded
while decode goes on, with in-flight completions carrying the old version and
later ones the new; retirement of old versions; a request for a version that
cannot be loaded failing alone, with an event; adapters addressed by
(experiment, version) only: a forged announcement naming another tenant's
adapter (or a tampered version) is refused with an event and the victim keeps
being served its own weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import string
import time
from dataclasses import dataclass

import pytest
import torch

from services.rollout.service import RolloutService
from services.rollout.torch_engine import TorchEngine
from shared.adapters import WEIGHTS_FILE, AdapterStore
from shared.bus import StreamBus
from shared.config import RolloutConfig
from shared.engine import AdapterKey, LoraSignature
from shared.messages import (
    AdapterPublished,
    Completion,
    ExperimentEvent,
    Prompt,
    RewardSpec,
    RolloutRequest,
    SamplingParams,
    decode,
)

RESULT_WAIT_S = 120.0  # a guard against hanging, never an assertion
LOAD_HOLD_STEPS = 5  # decode steps the slowed adapter load waits to see
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIGNATURE = LoraSignature(rank=8, alpha=16.0, target_modules=tuple(TARGETS))


# ---------------------------------------------------------------- tiny model + adapters


def build_char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.digits + string.ascii_lowercase + "+-=: "))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def build_tiny_model(tokenizer, **sizes):
    """A seeded random 2-layer Qwen3 for ``tokenizer``; ``sizes`` override its dimensions."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dimensions = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 16, "max_position_embeddings": 128, **sizes}
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), num_hidden_layers=2, initializer_range=0.1, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, **dimensions,
    ))


def save_adapter(model, store: AdapterStore, tenant: str, version: int, seed: int) -> str:
    """A random adapter written to the store as ``version`` of ``tenant``
    (PEFT format + DIGEST, as the trainer writes it); its path."""
    path, _ = store.write_version(tenant, version, random_adapter(model, seed), SIGNATURE, "tiny")
    return str(path)


def random_adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors with random (non-zero) A and B for ``model``."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    tensors = {name.replace(".default.", "."): torch.randn(p.shape, generator=generator) * 0.2
               for name, p in peft_model.named_parameters() if "lora_" in name}
    peft_model.unload()  # restore the plain model for the next adapter
    return tensors


@dataclass
class Tiny:
    model_dir: str
    data_dir: str  # the services' data_dir: the adapter store is <data_dir>/adapters
    adapters: dict  # (tenant, version) -> the store's path of that version
    pending: dict  # (tenant, version) -> tensors a test writes to the store itself


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny-qwen3")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    store = AdapterStore(root / "data" / "adapters")
    adapters = {}
    for seed, (tenant, version) in enumerate([("exp-a", 1), ("exp-a", 2), ("exp-a", 3), ("exp-b", 1)], start=1):
        adapters[(tenant, version)] = save_adapter(model, store, tenant, version, seed)
    adapters[("victim", 1)] = save_adapter(model, store, "victim", 1, seed=11)
    return Tiny(str(root / "model"), str(root / "data"), adapters, {("victim", 2): random_adapter(model, seed=12)})


# ---------------------------------------------------------------- harness


@contextlib.asynccontextmanager
async def rollout_service(redis_url, stream_prefix, tiny: Tiny, **engine_options):
    torch.set_num_threads(1)
    model_dir = tiny.model_dir
    config = RolloutConfig(redis_url=redis_url, stream_prefix=stream_prefix, consumer_name="rollout-test",
                           model_dir=model_dir, data_dir=tiny.data_dir, device="cpu", dtype="float32", max_rows=32,
                           max_loras=4, drain_timeout_s=10.0)
    # ignore_eos: a random model's completions then have exactly max_tokens tokens
    engine = TorchEngine(model_dir, config.signature, max_rows=config.max_rows, max_loras=config.max_loras,
                         device="cpu", dtype="float32", ignore_eos=True, **engine_options)
    service = RolloutService(config, engine=engine)
    await service.setup()
    task = asyncio.create_task(service.run(), name="rollout-under-test")
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
        await service.close()


def request(tenant: str, version: int, adapters: dict, *, index: int = 0, max_tokens: int = 8,
            n: int = 2, path: str | None = "auto", prompts: list[Prompt] | None = None) -> RolloutRequest:
    adapter_path = adapters.get((tenant, version)) if path == "auto" else path
    return RolloutRequest(
        request_id=f"{tenant}:v{version}:p{index}", experiment_id=tenant, step=0, purpose="train",
        prompts=prompts or [Prompt(prompt_id=f"p{index}", text="12+30=", answer="42")], adapter_version=version,
        adapter_path=adapter_path, sampling=SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=index),
        reward=RewardSpec(type="exact_match"),
    )


async def wait_for(condition, what: str):
    deadline = asyncio.get_running_loop().time() + RESULT_WAIT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def read_messages(redis, key: str, count: int, kind=object) -> list:
    deadline = asyncio.get_running_loop().time() + RESULT_WAIT_S
    while True:
        found = [m for m in (decode(f[b"msg"]) for _, f in await redis.xrange(key)) if isinstance(m, kind)]
        if len(found) >= count:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(found)} of {count} messages on {key}")
        await asyncio.sleep(0.05)


def by_request(completions: list[Completion]) -> dict[str, Completion]:
    return {c.request_id: c for c in completions}


def announcement(tiny: Tiny, tenant: str, version: int, **forged) -> AdapterPublished:
    """The trainer's announcement of a version in the store (``forged`` fields replace its own)."""
    store = AdapterStore(tiny.data_dir + "/adapters")
    fields = {"path": tiny.adapters[(tenant, version)], "digest": store.digest(tenant, version), **forged}
    return AdapterPublished(experiment_id=tenant, version=version, step=version - 1, **fields)


# ---------------------------------------------------------------- tests


async def test_two_tenants_share_decode_steps(redis_url, stream_prefix, async_redis, tiny):
    adapters = tiny.adapters
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(request("exp-a", 1, adapters, max_tokens=40))
        await bus.publish(request("exp-b", 1, adapters, max_tokens=40))
        await bus.publish(request("exp-c", 0, adapters, max_tokens=40))  # version 0: the base model
        completions = by_request(await read_messages(async_redis, stream_prefix + "completions", 3))
        step_tenants = service.engine.stats().step_tenants
    # the engine names base-model rows None: all three requests decoded in the same steps
    shared_steps = [s for s in step_tenants if {"exp-a", "exp-b", None} <= s]
    assert shared_steps, f"no decode step held every tenant: {step_tenants}"
    first = completions["exp-a:v1:p0"]
    assert first.error is None and first.adapter_version == 1 and first.worker == "rollout-test"
    assert completions["exp-c:v0:p0"].adapter_version == 0
    for completion in completions.values():
        [result] = completion.results
        assert result.prompt_token_ids and len(result.samples) == 2
        for sample in result.samples:
            assert len(sample.token_ids) == len(sample.logprobs) == 40
            assert all(lp <= 0.0 for lp in sample.logprobs)
            assert sample.finish_reason == "length"
        assert completion.timings.decode_s > 0 and completion.timings.time_to_first_token_s > 0


async def test_a_request_larger_than_the_engine_is_split_and_one_bad_prompt_fails_alone(
        redis_url, stream_prefix, async_redis, tiny):
    """20 prompts x n=4 is 80 rows, the engine has 32: the request runs in
    parts (never more rows out than the engine has) and comes back whole, one
    result per prompt in order; a prompt that tokenizes to nothing gets its
    own error and the others their samples."""
    prompts = [Prompt(prompt_id=f"q{i}", text=f"{i}+1=") for i in range(20)]
    prompts[7] = Prompt(prompt_id="empty", text="")
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(request("exp-a", 1, tiny.adapters, n=4, max_tokens=4, prompts=prompts))
        await bus.publish(request("exp-b", 0, tiny.adapters, n=4, max_tokens=4))  # another tenant meanwhile
        completions = by_request(await read_messages(async_redis, stream_prefix + "completions", 2))
        assert service.rows.free == service.engine.capacity_rows == 32  # every row given back
    big = completions["exp-a:v1:p0"]
    assert big.error is None and [r.prompt.prompt_id for r in big.results] == [p.prompt_id for p in prompts]
    assert "empty after tokenization" in (big.results[7].error or "") and big.results[7].samples == []
    assert all(r.error is None and len(r.samples) == 4 for i, r in enumerate(big.results) if i != 7)
    assert completions["exp-b:v0:p0"].results[0].error is None


async def test_more_samples_per_prompt_than_the_engine_has_rows_fail_with_a_reason(
        redis_url, stream_prefix, async_redis, tiny):
    """n=40 on an engine of 32 rows can never run: the request gets an error
    that says so (answered, not retried forever), and the engine goes on
    serving the next request."""
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(request("exp-a", 0, tiny.adapters, n=40, max_tokens=2))
        await bus.publish(request("exp-b", 0, tiny.adapters, n=2, max_tokens=2))
        completions = by_request(await read_messages(async_redis, stream_prefix + "completions", 2))
        assert service.rows.free == 32
    too_wide = completions["exp-a:v0:p0"]
    assert "n=40 exceeds the engine's 32 rows" in (too_wide.error or "")
    assert len(completions["exp-b:v0:p0"].results[0].samples) == 2


async def test_new_version_loads_mid_generation_without_pausing_decode(
        redis_url, stream_prefix, async_redis, tiny):
    adapters = tiny.adapters
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        engine = service.engine
        load_window = {}
        real_prepare = engine._runner.prepare

        def slow_prepare(path, tensors):
            """A slow adapter store: the load holds until decode has advanced
            LOAD_HOLD_STEPS steps, which deadlocks if loading paused decode."""
            stats = engine.stats()
            load_window.setdefault("start", (stats.decode_steps, stats.running_rows))
            give_up_at = time.monotonic() + RESULT_WAIT_S  # then the assertion below fails instead of hanging
            while engine.stats().decode_steps < load_window["start"][0] + LOAD_HOLD_STEPS:
                if time.monotonic() > give_up_at:
                    break
                time.sleep(0.005)
            load_window["end_steps"] = engine.stats().decode_steps
            return real_prepare(path, tensors)

        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(request("exp-a", 1, adapters, max_tokens=120, index=0))
        await wait_for(lambda: engine.stats().running_rows > 0, "the version-1 request to decode")
        engine._runner.prepare = slow_prepare  # only the announced version loads slowly
        await bus.publish(announcement(tiny, "exp-a", 2))
        await wait_for(lambda: engine.has_adapter(AdapterKey("exp-a", 2)), "version 2 to load")
        engine._runner.prepare = real_prepare
        in_flight = await async_redis.xlen(stream_prefix + "completions")
        await bus.publish(request("exp-a", 2, adapters, max_tokens=8, index=1))
        completions = by_request(await read_messages(async_redis, stream_prefix + "completions", 2))
    start_steps, rows_at_start = load_window["start"]
    assert rows_at_start > 0  # version 1 was decoding when the load began...
    assert load_window["end_steps"] >= start_steps + LOAD_HOLD_STEPS  # ...and kept decoding during it
    assert in_flight == 0  # the version-1 request was still in flight when version 2 was ready
    assert completions["exp-a:v1:p0"].adapter_version == 1
    assert completions["exp-a:v2:p1"].adapter_version == 2
    assert all(c.error is None for c in completions.values())


async def test_old_versions_retire_once_idle(redis_url, stream_prefix, async_redis, tiny):
    adapters = tiny.adapters
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        engine = service.engine
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(request("exp-a", 1, adapters, max_tokens=4))
        await read_messages(async_redis, stream_prefix + "completions", 1)
        assert engine.has_adapter(AdapterKey("exp-a", 1))
        for version in (2, 3):
            await bus.publish(announcement(tiny, "exp-a", version))
        await wait_for(lambda: engine.has_adapter(AdapterKey("exp-a", 3)), "version 3 to preload")
        await wait_for(lambda: not engine.has_adapter(AdapterKey("exp-a", 1)), "version 1 to retire")
        # the newest versions stay (max_off_policy_steps > 0 may still ask for the previous one)
        assert engine.has_adapter(AdapterKey("exp-a", 2))
        # a late request for a retired version loads it again from the store
        await bus.publish(request("exp-a", 1, adapters, max_tokens=4, index=7))
        completions = await read_messages(async_redis, stream_prefix + "completions", 2)
    late = by_request(completions)["exp-a:v1:p7"]
    assert late.error is None and late.adapter_version == 1


async def test_unloadable_version_fails_only_that_request(redis_url, stream_prefix, async_redis, tiny, tmp_path):
    adapters = tiny.adapters
    # A version whose weights were changed after its DIGEST was written.
    store = AdapterStore(tiny.data_dir + "/adapters")
    tampered = store.root / "exp-t" / "v1"
    if not tampered.exists():
        shutil.copytree(adapters[("exp-b", 1)], tampered)
        with open(tampered / WEIGHTS_FILE, "r+b") as handle:
            handle.seek(-1, 2)
            handle.write(b"\x7f")
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(request("exp-a", 5, adapters, path=str(tmp_path / "missing" / "v5")))
        # Paths in requests are not trusted: another tenant's adapter is never served as exp-c's version 1...
        await bus.publish(request("exp-c", 1, adapters, path=adapters[("exp-b", 1)], index=3))
        await bus.publish(request("exp-t", 1, adapters, path=str(tampered), index=4))
        # ...and a request without a path is served from the store.
        await bus.publish(request("exp-b", 1, adapters, path=None, index=5))
        completions = by_request(await read_messages(async_redis, stream_prefix + "completions", 4))
        events = await read_messages(async_redis, stream_prefix + "events", 3, kind=ExperimentEvent)
        assert not service.stopping.is_set()
        assert not service.engine.has_adapter(AdapterKey("exp-c", 1))
        assert not service.engine.has_adapter(AdapterKey("exp-t", 1))
    for request_id in ("exp-a:v5:p0", "exp-c:v1:p3", "exp-t:v1:p4"):
        failed = completions[request_id]
        assert [r.samples for r in failed.results] == [[]], failed
        assert "not loadable from the adapter store" in failed.error, failed.error
    assert completions["exp-a:v5:p0"].adapter_version == 5
    assert "hash to" in completions["exp-t:v1:p4"].error  # the digest check, not a missing file
    served = completions["exp-b:v1:p5"]
    assert served.error is None and len(served.results[0].samples) == 2 and served.adapter_version == 1
    assert {e.experiment_id for e in events} == {"exp-a", "exp-c", "exp-t"}
    assert all(e.code == "rollout_failed" and e.level == "error" for e in events)


def reference_logprobs(model_dir: str, adapter_path: str, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of ``token_ids`` after ``prompt_ids`` under plain
    PEFT with the adapter at ``adapter_path`` (temperature 1)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_path).eval()
    with torch.no_grad():
        logits_T_V = model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits_T_V.float(), -1).gather(-1, torch.tensor(token_ids).unsqueeze(-1)).squeeze(-1)


async def test_forged_announcements_are_refused_and_the_victim_keeps_its_own_weights(
        redis_url, stream_prefix, async_redis, tiny):
    adapters, store = tiny.adapters, AdapterStore(tiny.data_dir + "/adapters")
    other_path, other_digest = adapters[("exp-b", 1)], store.digest("exp-b", 1)
    victim_v2 = AdapterKey("victim", 2)
    async with rollout_service(redis_url, stream_prefix, tiny) as service:
        bus = StreamBus(async_redis, prefix=stream_prefix)
        # The attack of issue 12: the victim's id, its next version, another tenant's path and digest.
        await bus.publish(AdapterPublished(experiment_id="victim", version=2, step=1, path=other_path,
                                           digest=other_digest))
        # The store's own path for that version, before the version exists.
        await bus.publish(AdapterPublished(experiment_id="victim", version=2, step=1,
                                           path=str(store.path("victim", 2)), digest=other_digest))
        rejected = await read_messages(async_redis, stream_prefix + "events", 2, kind=ExperimentEvent)
        assert not service.engine.has_adapter(victim_v2)

        # The trainer writes the real version 2; a forged digest for it is refused too.
        genuine_path, genuine_digest = store.write_version("victim", 2, tiny.pending[("victim", 2)], SIGNATURE, "tiny")
        await bus.publish(AdapterPublished(experiment_id="victim", version=2, step=1, path=str(genuine_path),
                                           digest=other_digest))
        rejected = await read_messages(async_redis, stream_prefix + "events", 3, kind=ExperimentEvent)
        assert not service.engine.has_adapter(victim_v2)
        # The genuine announcement, arriving last, is the one loaded.
        await bus.publish(AdapterPublished(experiment_id="victim", version=2, step=1, path=str(genuine_path),
                                           digest=genuine_digest))
        await wait_for(lambda: service.engine.has_adapter(victim_v2), "the genuine version 2 to preload")
        # A request naming the other tenant's path is served the victim's own version 2.
        await bus.publish(request("victim", 2, adapters, path=other_path, max_tokens=6, n=1))
        (completion,) = await read_messages(async_redis, stream_prefix + "completions", 1)
    assert [(e.experiment_id, e.code, e.level) for e in rejected] == [("victim", "adapter_rejected", "error")] * 3
    assert "path" in rejected[0].message and "not in the adapter store" in rejected[1].message
    assert "digest" in rejected[2].message
    assert completion.error is None and completion.adapter_version == 2
    [result] = completion.results
    (sample,) = result.samples
    served_logprobs = torch.tensor(sample.logprobs)
    genuine = reference_logprobs(tiny.model_dir, str(genuine_path), result.prompt_token_ids, sample.token_ids)
    forged = reference_logprobs(tiny.model_dir, other_path, result.prompt_token_ids, sample.token_ids)
    torch.testing.assert_close(served_logprobs, genuine, atol=1e-4, rtol=0)
    assert (served_logprobs - forged).abs().max() > 1e-2  # the other tenant's weights would give other numbers
