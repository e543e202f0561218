"""The vLLM engine on a GPU: runtime adapter loading under fresh names and
ids, mixed-tenant generation with sampled-token logprobs, retirement.
Skips without CUDA or without vllm installed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shared.engine import AdapterKey, AdapterNotLoaded, LoraSignature
from shared.messages import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm")

from services.rollout.vllm_engine import VLLMEngine  # noqa: E402
from tests.integration.test_rollout_service import TARGETS, build_char_tokenizer, build_tiny_model  # noqa: E402


def build_gpu_friendly_model(tokenizer):
    """Like the CPU tests' tiny Qwen3, with a head size vLLM's kernels support."""
    return build_tiny_model(tokenizer, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("vllm-tiny")
    tokenizer = build_char_tokenizer()
    model = build_gpu_friendly_model(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    paths = {}
    for seed, name in enumerate(["exp-a", "exp-b"], start=1):
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter_name, parameter in peft_model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        peft_model.save_pretrained(root / name / "v1")
        model = peft_model.unload()
        paths[name] = root / name / "v1"
    return root / "model", paths


async def test_vllm_engine_serves_many_adapters(model_and_adapters):
    model_dir, paths = model_and_adapters
    engine = VLLMEngine(model_dir, LoraSignature(rank=8), max_rows=16, max_loras=2, max_cpu_loras=4,
                        gpu_memory_utilization=0.3, max_model_len=128, dtype="bfloat16", enforce_eager=True)
    await engine.start()
    try:
        a, b = AdapterKey("exp-a", 1), AdapterKey("exp-b", 1)
        await asyncio.gather(engine.register_adapter(a, paths["exp-a"]), engine.register_adapter(a, paths["exp-a"]),
                             engine.register_adapter(b, paths["exp-b"]))
        assert engine.has_adapter(a) and engine.has_adapter(b)
        first_id = engine._requests[a].lora_int_id
        assert engine._requests[a].lora_name == "exp-a@v1" and first_id != engine._requests[b].lora_int_id

        prompt = engine.tokenizer().encode("12+30=", add_special_tokens=False)
        sampling = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=3)
        results = await asyncio.gather(*(engine.generate(prompt, key, sampling) for key in (a, b, None)))
        for result, key in zip(results, (a, b, None)):
            assert result.adapter == key and len(result.samples) == 3
            for sample in result.samples:
                assert len(sample.token_ids) == len(sample.logprobs) >= 1
                assert all(lp <= 0.0 for lp in sample.logprobs)

        greedy = SamplingParams(n=1, temperature=0.0, max_tokens=12)
        outputs = [(await engine.generate(prompt, key, greedy)).samples[0].token_ids for key in (None, a, b)]
        assert outputs[1] != outputs[0] or outputs[2] != outputs[0]  # the adapters change the model

        await engine.retire_adapter(a)
        assert not engine.has_adapter(a)
        with pytest.raises(AdapterNotLoaded):
            await engine.generate(prompt, a, greedy)
        await engine.register_adapter(a, paths["exp-a"])
        assert engine._requests[a].lora_int_id > first_id  # never an id twice
    finally:
        await engine.close()
