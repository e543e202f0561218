"""The production engine: vLLM's async engine with multi-LoRA.

Written against vLLM's documented API (``AsyncLLMEngine`` / v1 ``AsyncLLM``:
``from_engine_args``, ``generate``, ``add_lora``, ``remove_lora``,
``shutdown``; ``LoRARequest``; ``SamplingParams``). vLLM is imported lazily,
only when the engine starts, so this module imports anywhere.

Adapters: every ``AdapterKey`` gets its own ``LoRARequest`` named ``key.name``
(``tenant@v7``) with a fresh integer id from a counter that never hands out
an id twice, loaded at runtime with ``add_lora`` from its PEFT directory and
removed with ``remove_lora`` once retired and idle. A name is never reloaded
in place: reloading under one name can serve stale prefix-cache entries
(vllm#42125), so a new version is always a new name and a new id.

Behaviour logprobs: ``SamplingParams.logprobs=0`` asks for the sampled
token's logprob only (vLLM returns that many top tokens *plus* the sampled
one). The engine is built with ``logprobs_mode="processed_logprobs"`` (where
vLLM has it) so they are taken after temperature, like the torch engine's;
vLLM's default ("raw_logprobs") is before temperature. With top-k/top-p set,
vLLM's processed logprobs are also after truncation.

The pure translation functions (sampling settings, adapter ids and names,
outputs) are module-level so that they are unit-tested without vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog
import torch

from shared.engine import (
    AdapterKey,
    AdapterNotLoaded,
    Engine,
    EngineError,
    EngineStats,
    GeneratedSample,
    GenerationResult,
    LoraSignature,
)
from shared.messages import SamplingParams

log = structlog.get_logger(__name__)

# vLLM's SamplingParams: top_k -1 disables top-k in every vLLM version (newer
# ones also accept 0; older ones reject 0).
VLLM_TOP_K_DISABLED = -1
# logprobs=N returns the N most likely tokens plus the sampled one: 0 gives
# exactly the sampled token's logprob.
SAMPLED_TOKEN_ONLY_LOGPROBS = 0
LOGPROBS_MODE = "processed_logprobs"


# ---------------------------------------------------------------- translation


def vllm_sampling_kwargs(sampling: SamplingParams) -> dict:
    """Our ``SamplingParams`` as keyword arguments of ``vllm.SamplingParams``."""
    if sampling.n < 1:
        raise EngineError(f"sampling.n must be >= 1, got {sampling.n}")
    if sampling.max_tokens < 1:
        raise EngineError(f"sampling.max_tokens must be >= 1, got {sampling.max_tokens}")
    return {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else VLLM_TOP_K_DISABLED,
        "max_tokens": sampling.max_tokens,
        "stop_token_ids": list(sampling.stop_token_ids),
        "seed": sampling.seed,
        "logprobs": SAMPLED_TOKEN_ONLY_LOGPROBS,
        "detokenize": False,  # the rollout service decodes; vLLM's text would be unused work
    }


class LoraIds:
    """Fresh ``lora_int_id``s: 1, 2, 3... never the same id twice (vLLM ids
    must be > 0 and globally unique per adapter)."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> int:
        return next(self._counter)


def lora_request_kwargs(key: AdapterKey, lora_id: int, path: str | Path) -> dict:
    """Keyword arguments of ``vllm.lora.request.LoRARequest`` for ``key``."""
    if lora_id < 1:
        raise ValueError(f"vLLM LoRA ids must be > 0, got {lora_id}")
    return {"lora_name": key.name, "lora_int_id": lora_id, "lora_path": str(path)}


def sampled_logprobs(token_ids: list[int], logprobs: Iterable[Mapping] | None) -> list[float]:
    """The sampled tokens' logprobs from vLLM's per-position ``{token_id:
    Logprob}`` maps (the map holds the sampled token whatever ``logprobs`` is)."""
    if logprobs is None:
        raise EngineError("vLLM returned no logprobs; SamplingParams.logprobs was not set")
    positions = list(logprobs)
    if len(positions) != len(token_ids):
        raise EngineError(f"vLLM returned {len(positions)} logprob positions for {len(token_ids)} tokens")
    values = []
    for token_id, position in zip(token_ids, positions):
        entry = position.get(token_id)
        if entry is None:
            raise EngineError(f"vLLM logprobs lack the sampled token {token_id}")
        values.append(float(getattr(entry, "logprob", entry)))
    return values


def to_generated_sample(output) -> GeneratedSample:
    """One vLLM ``CompletionOutput`` as a ``GeneratedSample``."""
    if output.finish_reason not in ("stop", "length"):
        raise EngineError(f"vLLM finished a sample with reason {output.finish_reason!r}")
    token_ids = list(output.token_ids)
    return GeneratedSample(token_ids=token_ids, logprobs=sampled_logprobs(token_ids, output.logprobs),
                           finish_reason=output.finish_reason)


def collect_samples(outputs_by_index: Mapping[int, object], n: int) -> list[GeneratedSample]:
    """The ``n`` final outputs, in sample order."""
    missing = sorted(set(range(n)) - set(outputs_by_index))
    if missing:
        raise EngineError(f"vLLM finished without samples {missing}")
    return [to_generated_sample(outputs_by_index[index]) for index in range(n)]


# ---------------------------------------------------------------- engine


class VLLMEngine(Engine):
    """``shared.engine.Engine`` on vLLM (NVIDIA GPUs)."""

    def __init__(
        self,
        model_dir: str | Path,
        signature: LoraSignature,
        *,
        max_rows: int = 256,
        max_loras: int = 16,
        max_cpu_loras: int = 64,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 4096,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> None:
        self.model_dir = str(model_dir)
        self.signature = signature
        self.max_rows = max_rows
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.seed = seed
        self.enforce_eager = enforce_eager
        # set in start()
        self._llm = None
        self._tokenizer = None
        # adapter bookkeeping
        self._lora_ids = LoraIds()
        self._requests: dict[AdapterKey, object] = {}  # key -> vllm LoRARequest
        self._registering: dict[AdapterKey, asyncio.Future] = {}
        self._rows_in_use: Counter[AdapterKey | None] = Counter()
        self._retire_when_idle: set[AdapterKey] = set()
        self._request_ids = itertools.count()
        self._stats = EngineStats()

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        # vLLM gates runtime adapter loading behind this variable in some versions.
        os.environ.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        args = AsyncEngineArgs(**self._engine_kwargs({f.name for f in dataclasses.fields(AsyncEngineArgs)}))
        self._llm = AsyncLLMEngine.from_engine_args(args)
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        log.info("vllm_engine_started", model_dir=self.model_dir, max_loras=self.max_loras,
                 max_lora_rank=self.signature.rank, max_rows=self.max_rows)

    def _engine_kwargs(self, supported: set[str]) -> dict:
        kwargs = {
            "model": self.model_dir,
            "enable_lora": True,
            "max_loras": self.max_loras,
            "max_lora_rank": self.signature.rank,
            "max_cpu_loras": self.max_cpu_loras,
            "max_num_seqs": self.max_rows,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "seed": self.seed,
            "enforce_eager": self.enforce_eager,
            "logprobs_mode": LOGPROBS_MODE,
        }
        return {name: value for name, value in kwargs.items() if name in supported}

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def failure(self) -> str | None:
        # AsyncLLM exposes `errored` / `dead_error` once its engine core died
        if self._llm is not None and getattr(self._llm, "errored", False):
            return repr(getattr(self._llm, "dead_error", "vLLM engine core died"))
        return None

    # -------------------------------------------------------------- adapters

    async def register_adapter(self, key: AdapterKey, path: Path | None = None,
                               tensors: dict[str, torch.Tensor] | None = None) -> None:
        if key in self._requests:
            return
        if path is None:
            raise EngineError(f"{key.name}: the vLLM engine loads adapters from a PEFT directory only")
        pending = self._registering.get(key)
        if pending is not None:  # another caller is loading this very key: share its outcome
            await asyncio.shield(pending)
            return
        future = asyncio.get_running_loop().create_future()
        self._registering[key] = future
        try:
            await self._add_lora(key, Path(path))
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters (if any) re-raise it
            raise
        finally:
            del self._registering[key]

    async def _add_lora(self, key: AdapterKey, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        if not (path / "adapter_config.json").is_file():
            raise EngineError(f"{key.name}: no PEFT adapter at {path} (adapter_config.json missing)")
        request = LoRARequest(**lora_request_kwargs(key, self._lora_ids.next(), path))
        loaded = await self._engine().add_lora(request)
        if loaded is False:  # v1 returns a bool; older engines return None on success
            raise EngineError(f"{key.name}: vLLM refused the adapter at {path}")
        self._requests[key] = request
        self._stats.adapter_loads += 1
        log.info("vllm_adapter_registered", adapter=key.name, lora_int_id=request.lora_int_id)

    async def retire_adapter(self, key: AdapterKey) -> None:
        if key not in self._requests:
            return
        if self._rows_in_use[key] > 0:
            self._retire_when_idle.add(key)
            return
        await self._remove(key)

    async def _remove(self, key: AdapterKey) -> None:
        self._retire_when_idle.discard(key)
        request = self._requests.pop(key)
        await self._engine().remove_lora(request.lora_int_id)
        self._stats.adapter_retires += 1
        log.info("vllm_adapter_retired", adapter=key.name, lora_int_id=request.lora_int_id)

    def has_adapter(self, key: AdapterKey) -> bool:
        return key in self._requests

    # -------------------------------------------------------------- generation

    async def generate(self, prompt_token_ids: list[int], adapter: AdapterKey | None,
                       sampling: SamplingParams) -> GenerationResult:
        from vllm import SamplingParams as VllmSamplingParams

        if adapter is not None and adapter not in self._requests:
            raise AdapterNotLoaded(f"adapter {adapter.name} is not registered")
        if not prompt_token_ids:
            raise EngineError("empty prompt")
        params = VllmSamplingParams(**vllm_sampling_kwargs(sampling))
        lora_request = self._requests[adapter] if adapter is not None else None
        self._acquire(adapter, sampling.n)
        try:
            return await self._run(prompt_token_ids, adapter, lora_request, params, sampling.n)
        finally:
            await self._release(adapter, sampling.n)

    async def _run(self, prompt_token_ids, adapter, lora_request, params, n) -> GenerationResult:
        request_id = f"clora-{next(self._request_ids)}"
        started = time.monotonic()
        first_token_at: float | None = None
        latest: dict[int, object] = {}
        # Cancelling this coroutine cancels vLLM's generator, which aborts the request.
        async for output in self._engine().generate({"prompt_token_ids": list(prompt_token_ids)}, params,
                                                    request_id, lora_request=lora_request):
            for completion in output.outputs:
                latest[completion.index] = completion  # cumulative outputs: the last one is complete
                if first_token_at is None and len(completion.token_ids) > 0:
                    first_token_at = time.monotonic()
        finished = time.monotonic()
        samples = collect_samples(latest, n)
        self._stats.generated_tokens += sum(len(s.token_ids) for s in samples)
        first_token_at = first_token_at or finished
        return GenerationResult(prompt_token_ids=list(prompt_token_ids), samples=samples, adapter=adapter,
                                time_to_first_token_s=first_token_at - started,
                                decode_s=finished - first_token_at)

    def _acquire(self, adapter: AdapterKey | None, rows: int) -> None:
        self._rows_in_use[adapter] += rows
        self._stats.running_rows += rows

    async def _release(self, adapter: AdapterKey | None, rows: int) -> None:
        self._rows_in_use[adapter] -= rows
        self._stats.running_rows -= rows
        if self._rows_in_use[adapter] <= 0:
            del self._rows_in_use[adapter]
            if adapter in self._retire_when_idle:
                await self._remove(adapter)

    # -------------------------------------------------------------- introspection

    @property
    def capacity_rows(self) -> int:
        return self.max_rows

    def stats(self) -> EngineStats:
        """Counters this wrapper sees (vLLM's scheduler steps are not exposed:
        ``decode_steps`` and ``step_tenants`` stay empty)."""
        return dataclasses.replace(self._stats, step_tenants=[])

    def tokenizer(self):
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return self._tokenizer

    def _engine(self):
        if self._llm is None:
            raise EngineError("vLLM engine not started or already closed")
        return self._llm
