"""Engine factory: ``config.engine`` -> an ``Engine`` (imports lazily, so the
torch engine never imports vLLM and the reverse)."""

from __future__ import annotations

from shared.config import RolloutConfig
from shared.engine import Engine

ENGINES = ("torch", "vllm")


def build_engine(config: RolloutConfig) -> Engine:
    if config.engine == "torch":
        from services.rollout.torch_engine import TorchEngine

        return TorchEngine(config.model_dir, config.signature, max_rows=config.max_rows,
                           max_loras=config.max_loras, device=config.device, dtype=config.dtype,
                           torch_threads=config.torch_threads)
    if config.engine == "vllm":
        from services.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(config.model_dir, config.signature, max_rows=config.max_rows,
                          max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras,
                          gpu_memory_utilization=config.gpu_memory_utilization,
                          max_model_len=config.max_model_len, dtype=config.dtype,
                          cpu_kv_cache_gib=config.cpu_kv_cache_gib)
    raise ValueError(f"unknown engine {config.engine!r}; expected one of {ENGINES}")
