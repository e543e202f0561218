"""The embedded multi-LoRA engine (the ``shared.engine.Engine`` for CPUs,
tests, the demo and small GPUs): one continuous decode batch for all tenants.

An engine thread runs schedule (apply slot writes, aborts, admit) -> execute
(prefill newcomers, one batched decode step for every running row, both on
the ``ModelRunner`` of ``services.rollout.torch_runner``) -> update
(vectorized sampling from ``services.rollout.sampling``, append, retire
finished rows, resolve futures on the asyncio loop thread-safely).

Adapters sit in the slots of one ``SlotTable`` (``services.rollout.slots``),
shared by the asyncio side (register, retire, submit) and the engine thread
(write slots, release finished requests) under one lock.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
import torch

from services.rollout.lora_layers import PreparedAdapter
from services.rollout.sampling import RowSampling, SamplingFlags, flags_for, row_seeds, sample_tokens
from services.rollout.slots import SlotMissing, SlotTable
from services.rollout.step_log import TenantStepLog
from services.rollout.torch_runner import ModelRunner
from shared.engine import (
    AdapterKey,
    AdapterNotLoaded,
    Engine,
    EngineError,
    EngineStats,
    FinishReason,
    GeneratedSample,
    GenerationResult,
    LoraSignature,
)
from shared.messages import SamplingParams

log = structlog.get_logger(__name__)

CLOSE_JOIN_TIMEOUT_S = 30.0


@dataclass(eq=False)
class _Request:
    prompt_token_ids: list[int]
    adapter: AdapterKey | None
    slot: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    future: asyncio.Future
    submitted_at: float
    seeds: list[int]
    samples: list[GeneratedSample | None] = field(default_factory=list)
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    rows_left: int = 0
    done: bool = False  # finished, aborted or failed: its adapter reference is released


@dataclass(eq=False)
class _Row:
    request: _Request
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Abort:
    request: _Request


@dataclass(eq=False)
class _SlotWrite:
    key: AdapterKey
    adapter: PreparedAdapter
    future: asyncio.Future


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    """Settle an asyncio future from any thread (no-op if already done)."""

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    loop = future.get_loop()
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(settle)


# ================================================================ engine


class TorchEngine(Engine):
    """Continuous-batching multi-LoRA engine on a Hugging Face causal LM.

    Slots: ``max_loras`` adapter slots plus slot 0 (base). A registered key
    keeps its slot until retired; a retired key's slot frees once no waiting
    or running row uses it. When a registration finds every slot taken, it
    evicts the least-recently-used key that no row uses (``has_adapter`` then
    turns False for it; the rollout service re-registers on
    ``AdapterNotLoaded``); when every slot is in use by rows, the write waits
    until one frees, while decode goes on.

    ``torch_threads`` > 0 sets the engine thread's intra-op threads (OpenMP
    counts are per thread: setting them in the caller does not reach the
    engine thread); on a small shared CPU box 1 or 2 avoids oversubscription,
    which costs far more than it gains. ``ignore_eos`` (benchmarks) stops rows
    only on ``stop_token_ids`` and ``max_tokens``. A stop token is kept as the last completion token (its
    logprob matters to the trainer).
    """

    def __init__(
        self,
        model_dir: str | Path,
        signature: LoraSignature,
        max_rows: int = 256,
        max_loras: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int = 0,
        ignore_eos: bool = False,
    ) -> None:
        if max_rows < 1 or max_loras < 1:
            raise EngineError("max_rows and max_loras must be >= 1")
        self.model_dir = Path(model_dir)
        self.signature = signature
        self.max_rows = max_rows
        self.max_loras = max_loras
        self._device_name, self._dtype_name = device, dtype
        self._torch_threads = torch_threads
        self._ignore_eos = ignore_eos
        # set by start()
        self._runner: ModelRunner | None = None
        self._tokenizer: Any = None  # a transformers tokenizer
        self._thread: threading.Thread | None = None
        # shared between the asyncio thread and the engine thread (under _lock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: collections.deque = collections.deque()
        self._slots: SlotTable[AdapterKey] = SlotTable(max_loras)  # slot 0, the base, is never in it
        self._stopping = False
        self._failure: str | None = None
        self._stats = EngineStats()
        self._step_log = TenantStepLog()
        # asyncio-thread only
        self._loading: dict[AdapterKey, asyncio.Task] = {}
        # engine-thread only
        self._waiting: collections.deque[_Request] = collections.deque()
        self._pending_writes: list[_SlotWrite] = []
        self._rows: list[_Row] = []
        self._row_sampling: RowSampling | None = None
        self._flags = SamplingFlags()
        self._last_tokens_B: torch.Tensor | None = None
        self._tenants: frozenset[str | None] = frozenset()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._runner = await asyncio.to_thread(self._load_runner)
        self._row_sampling = RowSampling.empty(self._runner.device)
        self._last_tokens_B = torch.zeros(0, dtype=torch.long, device=self._runner.device)
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()
        log.info("torch_engine_started", model_dir=str(self.model_dir), device=str(self._runner.device),
                 dtype=str(self._runner.dtype), max_rows=self.max_rows, max_loras=self.max_loras)

    def _load_runner(self) -> ModelRunner:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return ModelRunner(self.model_dir, self.signature, self.max_rows, self.max_loras,
                           self._device_name, self._dtype_name)

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._lock:
            self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join, CLOSE_JOIN_TIMEOUT_S)
        self._fail_everything("engine closed")
        log.info("torch_engine_closed", decode_steps=self._stats.decode_steps, prefill_steps=self._stats.prefill_steps,
                 generated_tokens=self._stats.generated_tokens)

    def failure(self) -> str | None:
        return self._failure

    @property
    def runner(self) -> ModelRunner:
        """The model runner ``start()`` loaded (an error before it)."""
        if self._runner is None:
            raise EngineError("engine is not started")
        return self._runner

    def _batch_state(self) -> tuple[RowSampling, torch.Tensor]:
        """The running rows' sampling parameters and last tokens (set by ``start()``)."""
        if self._row_sampling is None or self._last_tokens_B is None:
            raise EngineError("engine is not started")
        return self._row_sampling, self._last_tokens_B

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineError(f"engine failed: {self._failure}")
        if self._thread is None or self._stopping:
            raise EngineError("engine is not running")

    # ---------------------------------------------------------------- adapters

    async def register_adapter(
        self, key: AdapterKey, path: Path | None = None, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        self._check_alive()
        with self._lock:
            if self._slots.revive(key) or key in self._slots:  # a retiring key: same immutable contents
                self._slots.touch(key)
                return
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load_adapter(key, path, tensors), name=f"load_adapter:{key.name}")
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        await asyncio.shield(task)

    async def _load_adapter(self, key: AdapterKey, path, tensors) -> None:
        started = time.monotonic()
        adapter = await asyncio.to_thread(self.runner.prepare, None if path is None else Path(path), tensors)
        written = asyncio.get_running_loop().create_future()
        self._post(_SlotWrite(key, adapter, written))
        await written
        log.info("adapter_registered", adapter=key.name, rank=adapter.rank,
                 load_s=round(time.monotonic() - started, 4))

    async def retire_adapter(self, key: AdapterKey) -> None:
        with self._lock:
            if self._slots.retire(key) is not None:  # idle: freed now, else on its last release
                self._stats.adapter_retires += 1

    def has_adapter(self, key: AdapterKey) -> bool:
        with self._lock:
            return key in self._slots

    # ---------------------------------------------------------------- generate

    async def generate(
        self, prompt_token_ids: list[int], adapter: AdapterKey | None, sampling: SamplingParams
    ) -> GenerationResult:
        self._check_alive()
        self._validate(prompt_token_ids, sampling)
        request = self._new_request(list(prompt_token_ids), adapter, sampling)
        self._post(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            self._post(_Abort(request))
            raise

    def _validate(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        runner = self.runner
        if not prompt_token_ids:
            raise EngineError("empty prompt")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= runner.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {runner.vocab_size})")
        if not 1 <= sampling.n <= self.max_rows:
            raise EngineError(f"n must be in 1..{self.max_rows} (the engine's rows)")
        if sampling.max_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise EngineError("need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if len(prompt_token_ids) + sampling.max_tokens > runner.max_positions:
            raise EngineError(f"prompt + max_tokens exceeds the model's {runner.max_positions} positions")

    def _new_request(self, prompt, adapter, sampling) -> _Request:
        with self._lock:
            if adapter is None:
                slot = 0
            else:
                try:
                    slot = self._slots.acquire(adapter)
                except SlotMissing:
                    raise AdapterNotLoaded(f"adapter {adapter.name} is not loaded") from None
        stop_ids = frozenset(sampling.stop_token_ids)
        if not self._ignore_eos:
            stop_ids |= self.runner.eos_token_ids
        return _Request(
            prompt_token_ids=prompt, adapter=adapter, slot=slot, sampling=sampling, stop_ids=stop_ids,
            future=asyncio.get_running_loop().create_future(), submitted_at=time.monotonic(),
            seeds=row_seeds(sampling), samples=[None] * sampling.n, rows_left=sampling.n,
        )

    @property
    def capacity_rows(self) -> int:
        return self.max_rows

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
            return EngineStats(
                decode_steps=s.decode_steps, prefill_steps=s.prefill_steps,
                generated_tokens=s.generated_tokens, adapter_loads=s.adapter_loads,
                adapter_retires=s.adapter_retires, running_rows=len(self._rows),
                waiting_rows=sum(r.sampling.n for r in list(self._waiting)),
                step_tenants=self._step_log.recent(),
                shared_steps=self._step_log.shared_steps(),
            )

    def tokenizer(self):
        return self._tokenizer

    def _post(self, command) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wake.set()

    # ================================================================ engine thread

    def _run(self) -> None:
        if self._torch_threads > 0:  # OpenMP thread counts are per calling thread
            torch.set_num_threads(self._torch_threads)
        try:
            with torch.inference_mode():
                while True:
                    self._wake.clear()
                    self._take_inbox()
                    if self._stopping:
                        return
                    self._apply_slot_writes()
                    admitted = self._admit()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                    elif not admitted:
                        self._wake.wait()
        except BaseException as exc:  # the loop is dead: every waiter must hear it
            log.exception("torch_engine_failed")
            self._failure = repr(exc)
            self._fail_everything(f"engine failed: {exc!r}")

    def _take_inbox(self) -> None:
        if not self._inbox:
            return
        with self._lock:
            commands = list(self._inbox)
            self._inbox.clear()
        for command in commands:
            if isinstance(command, _Request):
                self._waiting.append(command)
            elif isinstance(command, _Abort):
                self._abort(command.request)
            else:
                self._pending_writes.append(command)

    # ---------------------------------------------------------------- slots

    def _apply_slot_writes(self) -> None:
        """Copy loaded adapters into free slots; runs between two steps, so no
        row ever sees a half-written slot."""
        still_waiting = []
        for write in self._pending_writes:
            with self._lock:
                claim = self._slots.claim()  # a free slot, or the least recently used idle one
            if claim is None:  # every slot is in use by rows: try again after the next step
                still_waiting.append(write)
                continue
            slot, evicted = claim
            if evicted is not None:
                log.info("adapter_evicted", adapter=evicted.name)
            self.runner.write_slot(slot, write.adapter)
            with self._lock:
                self._slots.place(write.key, slot)
                self._stats.adapter_loads += 1
            _resolve(write.future)
        self._pending_writes = still_waiting

    def _release(self, request: _Request) -> None:
        """Drop a finished request's hold on its adapter (once)."""
        if request.done:
            return
        request.done = True
        key = request.adapter
        if key is None:
            return
        with self._lock:
            if self._slots.release(key) is not None:  # the last user of a retired key: its slot frees
                self._stats.adapter_retires += 1

    # ---------------------------------------------------------------- schedule

    def _admit(self) -> list[_Request]:
        free_rows = self.max_rows - len(self._rows)
        admitted = []
        while self._waiting and self._waiting[0].sampling.n <= free_rows:
            request = self._waiting.popleft()
            free_rows -= request.sampling.n
            request.admitted_at = time.monotonic()
            admitted.append(request)
        return admitted

    def _abort(self, request: _Request) -> None:
        if request.done:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        indices = [i for i, row in enumerate(self._rows) if row.request is request]
        if indices:
            self._remove_rows(indices)
        self._release(request)

    # ---------------------------------------------------------------- execute + update

    def _prefill(self, requests: list[_Request]) -> None:
        runner = self.runner
        row_sampling, last_tokens_B = self._batch_state()
        B0 = len(self._rows)
        logits_N_V = runner.prefill(
            [r.prompt_token_ids for r in requests], [r.slot for r in requests],
            [r.sampling.n for r in requests],
            reserve_len=max(len(r.prompt_token_ids) + r.sampling.max_tokens for r in requests),
        )
        params = [r.sampling for r in requests for _ in range(r.sampling.n)]
        seeds = [seed for r in requests for seed in r.seeds]
        new_sampling = RowSampling.build(params, seeds, runner.vocab_size, runner.device)
        self._row_sampling = row_sampling.cat(new_sampling)
        self._rows.extend(_Row(r, i) for r in requests for i in range(r.sampling.n))
        flags = flags_for(params)
        tokens_N, logprobs_N = sample_tokens(logits_N_V, new_sampling, flags, runner.pos_B[B0:])
        self._last_tokens_B = torch.cat([last_tokens_B, tokens_N])
        now = time.monotonic()
        for request in requests:
            request.first_token_at = now
        with self._lock:
            self._stats.prefill_steps += 1
        self._rows_changed()
        self._record(B0, tokens_N.tolist(), logprobs_N.tolist())

    def _decode(self) -> None:
        runner = self.runner
        row_sampling, last_tokens_B = self._batch_state()
        logits_B_V = runner.decode(last_tokens_B)
        tokens_B, logprobs_B = sample_tokens(logits_B_V, row_sampling, self._flags, runner.pos_B)
        self._last_tokens_B = tokens_B
        with self._lock:
            self._stats.decode_steps += 1
            self._stats.generated_tokens += len(self._rows)
            self._step_log.record(self._tenants)
        self._record(0, tokens_B.tolist(), logprobs_B.tolist())

    def _record(self, start: int, tokens: list[int], logprobs: list[float]) -> None:
        """Append each row's new token; retire rows that stopped."""
        finished = []
        rows = self._rows
        for offset, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            row = rows[start + offset]
            row.token_ids.append(token)
            row.logprobs.append(logprob)
            if token in row.request.stop_ids or len(row.token_ids) >= row.request.sampling.max_tokens:
                finished.append(start + offset)
        if finished:
            self._finish(finished)

    def _finish(self, indices: list[int]) -> None:
        now = time.monotonic()
        finished_rows = [self._rows[i] for i in indices]
        self._remove_rows(indices)  # before resolving: a caller's next stats() no longer sees them
        for row in finished_rows:
            request = row.request
            reason: FinishReason = "stop" if row.token_ids[-1] in request.stop_ids else "length"
            request.samples[row.sample_index] = GeneratedSample(row.token_ids, row.logprobs, reason)
            request.rows_left -= 1
            if request.rows_left == 0:
                self._complete(request, now)

    def _complete(self, request: _Request, now: float) -> None:
        self._release(request)
        _resolve(request.future, GenerationResult(
            prompt_token_ids=request.prompt_token_ids,
            samples=cast(list[GeneratedSample], request.samples),  # rows_left == 0: every sample is set
            adapter=request.adapter,
            queue_wait_s=request.admitted_at - request.submitted_at,
            time_to_first_token_s=request.first_token_at - request.submitted_at,
            decode_s=now - request.first_token_at,
        ))

    def _remove_rows(self, indices: list[int]) -> None:
        row_sampling, last_tokens_B = self._batch_state()
        order_B = self.runner.remove_rows(indices)
        order = order_B.tolist()
        self._rows = [self._rows[i] for i in order]
        self._row_sampling = row_sampling.select(order_B)
        self._last_tokens_B = last_tokens_B.index_select(0, order_B)
        self._rows_changed()

    def _rows_changed(self) -> None:
        self._flags = flags_for([row.request.sampling for row in self._rows])
        # the step log records this set once per decode step: computed here, when the rows change
        self._tenants = frozenset(
            None if row.request.adapter is None else row.request.adapter.tenant for row in self._rows
        )

    def _fail_everything(self, reason: str) -> None:
        """Fail every request and pending write (the loop is gone)."""
        with self._lock:
            commands = list(self._inbox)
            self._inbox.clear()
        requests = {id(r.request): r.request for r in self._rows}
        requests.update({id(r): r for r in self._waiting})
        requests.update({id(c): c for c in commands if isinstance(c, _Request)})
        for request in requests.values():
            self._release(request)
            _resolve(request.future, error=EngineError(reason))
        writes = self._pending_writes + [c for c in commands if isinstance(c, _SlotWrite)]
        for write in writes:
            _resolve(write.future, error=EngineError(reason))
        self._pending_writes, self._waiting, self._rows = [], collections.deque(), []


