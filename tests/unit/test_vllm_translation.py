"""The vLLM engine's translations, without vLLM: sampling settings, adapter
ids and names, outputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from services.rollout.slots import SlotTable
from services.rollout.step_log import tenant_pairs
from services.rollout.vllm_engine import (
    GIB_BYTES,
    VLLM_TOP_K_DISABLED,
    StepTenants,
    VLLMEngine,
    collect_samples,
    cpu_kv_cache_bytes,
    lora_request_kwargs,
    model_max_len,
    resolve_dtype,
    resolve_max_model_len,
    sampled_logprobs,
    to_generated_sample,
    vllm_sampling_kwargs,
)
from shared.config import DEFAULT_MODEL_DIR
from shared.engine import AdapterKey, EngineError, LoraSignature
from shared.messages import SamplingParams


def test_sampling_translation_keeps_every_setting():
    kwargs = vllm_sampling_kwargs(SamplingParams(n=8, temperature=0.7, top_p=0.9, top_k=20, max_tokens=33,
                                                 stop_token_ids=[2, 5], seed=11))
    assert kwargs["n"] == 8
    assert kwargs["temperature"] == 0.7
    assert kwargs["top_p"] == 0.9
    assert kwargs["top_k"] == 20
    assert kwargs["max_tokens"] == 33
    assert kwargs["stop_token_ids"] == [2, 5]
    assert kwargs["seed"] == 11


def test_sampling_translation_asks_for_the_sampled_token_logprob_only():
    assert vllm_sampling_kwargs(SamplingParams())["logprobs"] == 0


def test_top_k_zero_means_disabled_in_vllm_terms():
    assert vllm_sampling_kwargs(SamplingParams(top_k=0))["top_k"] == VLLM_TOP_K_DISABLED == -1


def test_greedy_and_unseeded_pass_through():
    kwargs = vllm_sampling_kwargs(SamplingParams(temperature=0.0, seed=None))
    assert kwargs["temperature"] == 0.0 and kwargs["seed"] is None


@pytest.mark.parametrize("bad", [SamplingParams(n=0), SamplingParams(max_tokens=0)])
def test_invalid_sampling_is_refused(bad):
    with pytest.raises(EngineError):
        vllm_sampling_kwargs(bad)


def test_each_version_gets_its_own_name_and_id():
    ids = SlotTable(None)  # the vLLM engine's ids: an unbounded slot table's fresh numbers
    v1 = lora_request_kwargs(AdapterKey("exp-a", 1), ids.fresh_slot(), "/adapters/exp-a/v1")
    v2 = lora_request_kwargs(AdapterKey("exp-a", 2), ids.fresh_slot(), "/adapters/exp-a/v2")
    assert v1["lora_name"] == "exp-a@v1" and v2["lora_name"] == "exp-a@v2"
    assert v1["lora_int_id"] != v2["lora_int_id"]
    assert v2["lora_path"] == "/adapters/exp-a/v2"


def test_lora_id_zero_is_refused():
    with pytest.raises(ValueError):
        lora_request_kwargs(AdapterKey("exp-a", 1), 0, "/x")


def _logprob(value):
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def test_sampled_logprobs_pick_the_sampled_token_per_position():
    token_ids = [7, 3, 9]
    # With logprobs=0 vLLM still includes the sampled token; top-1 alternatives may appear too.
    positions = [{7: _logprob(-0.5)}, {4: _logprob(-0.1), 3: _logprob(-2.0)}, {9: _logprob(-1.25)}]
    assert sampled_logprobs(token_ids, positions) == [-0.5, -2.0, -1.25]


def test_sampled_logprobs_refuse_mismatched_lengths_and_missing_tokens():
    with pytest.raises(EngineError):
        sampled_logprobs([1, 2], [{1: _logprob(-1.0)}])
    with pytest.raises(EngineError):
        sampled_logprobs([1], [{2: _logprob(-1.0)}])
    with pytest.raises(EngineError):
        sampled_logprobs([1], None)


def _output(index, token_ids, finish_reason="stop"):
    return SimpleNamespace(index=index, token_ids=token_ids, finish_reason=finish_reason,
                           logprobs=[{t: _logprob(-0.1 * (i + 1))} for i, t in enumerate(token_ids)])


def test_output_translation():
    sample = to_generated_sample(_output(0, [5, 6, 2], "length"))
    assert sample.token_ids == [5, 6, 2]
    assert sample.finish_reason == "length"
    assert all(math.isclose(a, b) for a, b in zip(sample.logprobs, [-0.1, -0.2, -0.3], strict=True))


def test_aborted_output_is_an_error():
    with pytest.raises(EngineError):
        to_generated_sample(_output(0, [5], "abort"))


def test_collect_samples_orders_by_index_and_requires_all():
    outputs = {1: _output(1, [8]), 0: _output(0, [9])}
    assert [s.token_ids for s in collect_samples(outputs, 2)] == [[9], [8]]
    with pytest.raises(EngineError):
        collect_samples({0: _output(0, [9])}, 2)


def test_engine_configuration_maps_to_vllm_arguments():
    engine = VLLMEngine("/models/m", LoraSignature(rank=16), max_rows=64, max_loras=4, max_cpu_loras=32)
    every_field = {"model", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs",
                   "gpu_memory_utilization", "max_model_len", "dtype", "seed", "enforce_eager", "logprobs_mode"}
    kwargs = engine._engine_kwargs(every_field)
    assert kwargs["enable_lora"] is True
    assert kwargs["max_loras"] == 4 and kwargs["max_lora_rank"] == 16 and kwargs["max_cpu_loras"] == 32
    assert kwargs["max_num_seqs"] == 64 == engine.capacity_rows
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    # An older vLLM without logprobs_mode still gets every argument it knows.
    assert "logprobs_mode" not in engine._engine_kwargs(every_field - {"logprobs_mode"})


def test_engine_without_vllm_is_importable_and_refuses_unknown_adapters():
    engine = VLLMEngine("/models/m", LoraSignature())
    assert not engine.has_adapter(AdapterKey("exp-a", 1))
    with pytest.raises(EngineError):
        engine.tokenizer()


# ---------------------------------------------------------------- platform settings


def test_max_model_len_zero_lets_vllm_derive_it():
    assert resolve_max_model_len(0, 64) is None


def test_max_model_len_above_the_models_is_lowered_to_it():
    assert resolve_max_model_len(4096, 64) == 64
    assert resolve_max_model_len(32, 64) == 32
    assert resolve_max_model_len(4096, None) == 4096  # unknown: vLLM judges
    with pytest.raises(EngineError):
        resolve_max_model_len(-1, 64)


def test_model_max_len_reads_the_config(tmp_path):
    assert model_max_len(DEFAULT_MODEL_DIR) == 64  # the shipped tiny model
    (tmp_path / "config.json").write_text('{"text_config": {"max_position_embeddings": 8192}}')
    assert model_max_len(tmp_path) == 8192
    assert model_max_len(tmp_path / "missing") is None


def test_auto_dtype_is_float32_on_cpu_only():
    assert resolve_dtype("auto", on_cpu=True) == "float32"
    assert resolve_dtype("auto", on_cpu=False) == "auto"
    assert resolve_dtype("bfloat16", on_cpu=True) == "bfloat16"


def test_cpu_kv_cache_is_stated_in_gib():
    assert cpu_kv_cache_bytes(1.5) == int(1.5 * GIB_BYTES)
    with pytest.raises(EngineError):
        cpu_kv_cache_bytes(0)


EVERY_FIELD = {"model", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs",
               "gpu_memory_utilization", "max_model_len", "dtype", "seed", "enforce_eager", "logprobs_mode",
               "disable_log_stats", "kv_cache_memory_bytes"}


def test_engine_on_cpu_sizes_the_kv_cache_keeps_float32_and_fits_the_model():
    engine = VLLMEngine(DEFAULT_MODEL_DIR, LoraSignature(), max_model_len=4096, cpu_kv_cache_gib=2.0)
    engine._on_cpu = True  # what start() reads from vLLM's platform
    kwargs = engine._engine_kwargs(EVERY_FIELD)
    assert kwargs["kv_cache_memory_bytes"] == 2 * GIB_BYTES
    assert kwargs["dtype"] == "float32" and kwargs["max_model_len"] == 64
    engine._on_cpu = False
    gpu_kwargs = engine._engine_kwargs(EVERY_FIELD)
    assert "kv_cache_memory_bytes" not in gpu_kwargs and gpu_kwargs["dtype"] == "auto"


def test_tenant_pairs_are_sorted_and_distinct():
    assert tenant_pairs(["b", "a", "c", "a"]) == ["a|b", "a|c", "b|c"]
    assert tenant_pairs(["a"]) == []
    assert tenant_pairs(["a", None, "b"]) == ["a|b"]  # the base model pairs with no one


def test_step_tenants_count_steps_by_tenant_not_version():
    steps = StepTenants()
    for key in (AdapterKey("exp-a", 1), AdapterKey("exp-a", 2), AdapterKey("exp-b", 1)):
        steps.name_adapter(key)
    steps.record({"exp-a@v1": 3, "exp-b@v1": 2})
    steps.record({"exp-a@v1": 1, "exp-a@v2": 4})  # two versions of one tenant: not a shared step
    steps.record({"exp-b@v1": 0})  # idle: nothing ran
    count, recent, shared = steps.snapshot()
    assert count == 2
    assert recent == [frozenset({"exp-a", "exp-b"}), frozenset({"exp-a"})]
    assert shared == {"exp-a|exp-b": 1}


def test_step_log_counts_pairs_per_step_across_reads():
    from services.rollout.step_log import TenantStepLog

    log = TenantStepLog(kept=2)
    both, alone = frozenset({"a", "b", None}), frozenset({"a"})
    log.record(both)
    log.record(alone)
    assert log.shared_steps() == {"a|b": 1}
    log.record(both)
    log.record(both)
    assert log.shared_steps() == {"a|b": 3}  # counts since start, whatever was read in between
    assert log.steps == 4 and log.recent() == [both, both]
