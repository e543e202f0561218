"""The rollout service: every tenant's rollout requests in one decode stream.

Reads ``rollout_requests`` (group ``rollout``) with ``capacity_rows //
typical group size`` handlers in flight. A request carries every prompt of a
step (or of an evaluation); its handler splits it into its prompts, and each
prompt waits for its ``sampling.n`` rows at the ``RowGate``
(``services.rollout.rows``): that is the backpressure, the service never
hands the engine more rows than it has, a request larger than the engine runs
prompt by prompt, tenants take turns for the rows that free, and evaluation
prompts yield to training steps (with a bounded share, never starved). Each prompt
is tokenized and awaits ``engine.generate``; the engine batches the rows of
all prompts in flight, whatever their tenant, into the same decode steps. The
handler then publishes one ``Completion`` for the request, a ``PromptResult``
per prompt (token ids, behaviour logprobs, text; or the prompt's own
``error``), with the adapter version that produced it and timings.

Adapters: version 0 is the base model; version v is ``AdapterKey(experiment,
v)``, addressed by (experiment, version) only: its directory comes from the
adapter store (``AdapterStore(config.adapter_dir).path``), never from a
message, and it is registered only after its files hash to their ``DIGEST``
(``store.verify``), the first time it is needed. ``RolloutRequest.adapter_path``
is ignored. Announcements on ``adapters`` (a private consumer group per
worker, so every worker sees every announcement) preload new versions in the
background; an announcement whose ``path`` or ``digest`` is not the store's
for that (experiment, version) is refused with an
``ExperimentEvent(code="adapter_rejected", level="error")`` and changes
nothing (a forged one cannot make this worker serve another tenant's weights
under the victim's name). Loading never pauses decode (the engine loads
beside its decode loop) and only the requests that need that version wait
for it. A version is retired once no request uses it and it is not one of
the newest ``adapter_keep_versions`` of its tenant. A request whose version
cannot be loaded gets a ``Completion`` with ``error`` and an
``ExperimentEvent(code="rollout_failed")``; the service carries on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.rollout import tinker_sampling
from services.rollout.rows import RowGate
from services.rollout.slots import SlotTable
from shared import metrics
from shared.adapters import AdapterStore, AdapterStoreError, DirectoryAdapterStore, check_tenant_name
from shared.config import RolloutConfig
from shared.deployment import check_lora_against_deployment_async
from shared.engine import AdapterKey, AdapterNotLoaded, Engine, EngineError, GeneratedSample, GenerationResult
from shared.messages import (
    AdapterPublished,
    Completion,
    ExperimentEvent,
    Prompt,
    PromptResult,
    RolloutRequest,
    RolloutTimings,
    Sample,
    now,
)
from shared.runtime import Service, set_up

REQUEST_GROUP = "rollout"
ENGINE_WATCH_INTERVAL_S = 1.0
MAX_REPORTED_PAIRS = 200  # tenant pairs kept in the heartbeat status
ADAPTER_NOT_LOADED_RETRIES = 2  # reloads after the engine evicted a version we had just loaded
PROMPT_CACHE_ENTRIES = 1024  # distinct prompts whose token ids are kept (evaluations repeat theirs)
PROMPT_CACHE_MAX_CHARS = 2048  # longer prompts are encoded every time (bounds the cache's memory)


class AdapterLoadError(Exception):
    """A version that cannot be made usable; ``reason`` says why."""

    def __init__(self, key: AdapterKey, reason: str) -> None:
        super().__init__(f"{key.name}: {reason}")
        self.key = key
        self.reason = reason


def forget_when_done(tasks: dict[AdapterKey, asyncio.Task], key: AdapterKey) -> Callable[[asyncio.Task], object]:
    """A done callback that drops ``key`` from ``tasks`` (``key`` bound now, not when it runs)."""
    return lambda _task: tasks.pop(key, None)


def adapter_key(experiment_id: str, version: int) -> AdapterKey | None:
    """Version 0 is the base model (no adapter)."""
    return None if version == 0 else AdapterKey(experiment_id, version)


class AdapterSet:
    """Which adapter versions this worker has in the engine, which requests
    use them, and which can go. All bookkeeping happens on the event loop; the
    engine does the loading off it.

    ``table`` is the slot table both engines use too: its live keys are the
    versions registered in the engine, its holds the requests using a version
    (counted before the version loads). Its slot numbers mean nothing here
    (unbounded): the engine owns the real slots and may evict an idle version,
    which ``ensure_loaded`` notices and loads again."""

    def __init__(self, engine: Engine, store: AdapterStore, keep_versions: int, log) -> None:
        self.engine = engine
        self.store = store
        self.keep_versions = max(1, keep_versions)
        self.log = log
        self.table: SlotTable[AdapterKey] = SlotTable(None)
        self.newest: dict[str, int] = {}
        self._loading: dict[AdapterKey, asyncio.Task] = {}
        self._retiring: dict[AdapterKey, asyncio.Task] = {}

    @asynccontextmanager
    async def use(self, key: AdapterKey | None):
        """Hold ``key`` loaded for the duration of the block (None: base)."""
        if key is None:
            yield
            return
        self.table.hold(key)  # counted before loading, so no retirement can slip in after it
        try:
            await self.ensure_loaded(key)
            yield
        finally:
            self.table.release(key)
            await self.retire_stale(key.tenant)

    async def ensure_loaded(self, key: AdapterKey) -> None:
        """Register ``key`` from the store unless it is; concurrent callers
        share one load."""
        while key in self._retiring:  # let a retirement in progress finish, then load again
            await asyncio.shield(self._retiring[key])
        if key in self.table:
            if self.engine.has_adapter(key):
                return
            self.table.drop(key)  # the engine evicted it to make room: load it again
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._register(key), name=f"adapter-load:{key.name}")
            self._loading[key] = task
            task.add_done_callback(forget_when_done(self._loading, key))
        await asyncio.shield(task)  # one caller cancelled must not cancel the others' load

    async def _register(self, key: AdapterKey) -> None:
        started = time.monotonic()
        path = await asyncio.to_thread(self.verified_path, key)
        self.note_version(key)  # only a version that exists counts towards retiring older ones
        try:
            await self.engine.register_adapter(key, path=path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a file, format or capacity problem: the request reports it
            raise AdapterLoadError(key, f"cannot load adapter from {path}: {type(exc).__name__}: {exc}") from exc
        self.table.place(key, self.table.fresh_slot())
        metrics.ADAPTER_LOADS.inc()
        metrics.ADAPTER_LOAD_SECONDS.observe(time.monotonic() - started)
        self.log.info("adapter_ready", adapter=key.name, path=str(path),
                      took_s=round(time.monotonic() - started, 4))

    def verified_path(self, key: AdapterKey) -> Path:
        """The store's directory of ``key`` once its files match its DIGEST
        (hashes the files: call it off the event loop)."""
        try:
            path = self.store.path(key.tenant, key.version)
            self.store.verify(path)
        except (AdapterStoreError, OSError) as exc:
            raise AdapterLoadError(key, f"not loadable from the adapter store: {exc}") from exc
        return path

    def note_version(self, key: AdapterKey) -> None:
        self.newest[key.tenant] = max(self.newest.get(key.tenant, 0), key.version)

    def stale(self, tenant: str) -> list[AdapterKey]:
        """Registered, idle versions of ``tenant`` older than its newest few."""
        cutoff = self.newest.get(tenant, 0) - self.keep_versions
        return sorted(k for k in self.table.idle_keys() if k.tenant == tenant and k.version <= cutoff)

    async def retire_stale(self, tenant: str) -> None:
        for key in self.stale(tenant):
            if key in self._retiring or key not in self.table or self.table.holds(key) > 0:
                continue  # changed while an earlier retirement of this loop was awaited
            self.table.retire(key)  # idle, so gone at once: new users reload instead of racing
            task = asyncio.create_task(self._retire(key), name=f"adapter-retire:{key.name}")
            self._retiring[key] = task
            task.add_done_callback(forget_when_done(self._retiring, key))
            await asyncio.shield(task)

    async def _retire(self, key: AdapterKey) -> None:
        try:
            await self.engine.retire_adapter(key)
        except EngineError as exc:
            self.log.warning("adapter_retire_failed", adapter=key.name, error=str(exc))
            return
        metrics.ADAPTER_RETIRES.inc()
        self.log.info("adapter_retired", adapter=key.name)


def decode_text(tokenizer, token_ids: list[int], stop_token_ids: set[int]) -> str:
    """Completion text: up to (not including) the first stop token, special
    tokens skipped."""
    cut = next((i for i, token in enumerate(token_ids) if token in stop_token_ids), len(token_ids))
    return tokenizer.decode(token_ids[:cut], skip_special_tokens=True)


def to_sample(tokenizer, generated: GeneratedSample, stop_ids: set[int], stop_strings: list[str]) -> Sample:
    """A generated sample as the completion carries it, ended at its first
    stop string (``SamplingParams.stop``): the tokens up to the one that
    completes it, the text before it, finish_reason "stop". The engines
    generate on to a stop token or ``max_tokens``; the cut is made here, once,
    the same for every engine."""
    token_ids, logprobs = list(generated.token_ids), [float(x) for x in generated.logprobs]
    text = decode_text(tokenizer, token_ids, stop_ids)
    stop_at = first_stop_string(text, stop_strings)
    if stop_at is None:
        return Sample(token_ids=token_ids, logprobs=logprobs, text=text, finish_reason=generated.finish_reason)
    kept = tokens_through_stop(tokenizer, token_ids, stop_ids, stop_strings)
    return Sample(token_ids=token_ids[:kept], logprobs=logprobs[:kept], text=text[:stop_at], finish_reason="stop")


def first_stop_string(text: str, stop_strings: list[str]) -> int | None:
    """Where the first stop string in ``text`` starts, None when none is in it."""
    found = [at for at in (text.find(stop) for stop in stop_strings if stop) if at >= 0]
    return min(found) if found else None


def tokens_through_stop(tokenizer, token_ids: list[int], stop_ids: set[int], stop_strings: list[str]) -> int:
    """The fewest leading tokens whose text holds a stop string (the whole
    sequence's does): a binary search, as a longer prefix's text extends a shorter one's."""
    low, high = 1, len(token_ids)
    while low < high:
        middle = (low + high) // 2
        if first_stop_string(decode_text(tokenizer, token_ids[:middle], stop_ids), stop_strings) is None:
            low = middle + 1
        else:
            high = middle
    return high


def stop_tokens(tokenizer, request_stop_ids: list[int]) -> set[int]:
    stops = set(request_stop_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        stops.add(eos)
    return stops


def prompt_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The token ids of ``prompt``: its text as it is, or its chat turns
    rendered with the model's own template (``render_chat``); no special
    tokens added beyond what the template writes. These ids travel with the
    completion (``prompt_token_ids``) and the trainer trains on them: nothing
    encodes the prompt again."""
    text = prompt.text if prompt.messages is None else render_chat(tokenizer, prompt)
    return tokenizer.encode(text, add_special_tokens=False)


class PromptIdCache:
    """Token ids of recently seen prompts (least recently used out first):
    an evaluation sends the same held-out prompts every time, and encoding is
    deterministic, so each distinct prompt is encoded once. Only prompts of
    at most ``max_chars`` characters are kept, so the cache stays small
    whatever the requests carry."""

    def __init__(self, entries: int = PROMPT_CACHE_ENTRIES, max_chars: int = PROMPT_CACHE_MAX_CHARS) -> None:
        self.entries = entries
        self.max_chars = max_chars
        self._ids: collections.OrderedDict[tuple, tuple[int, ...]] = collections.OrderedDict()

    def token_ids(self, tokenizer, prompt: Prompt) -> list[int]:
        key = self._key(prompt)
        if key is None:
            return prompt_token_ids(tokenizer, prompt)
        cached = self._ids.get(key)
        if cached is None:
            cached = self._ids[key] = tuple(prompt_token_ids(tokenizer, prompt))
            if len(self._ids) > self.entries:
                self._ids.popitem(last=False)
        else:
            self._ids.move_to_end(key)
        return list(cached)

    def _key(self, prompt: Prompt) -> tuple | None:
        turns = tuple((m.role, m.content) for m in prompt.messages) if prompt.messages is not None else None
        size = len(prompt.text) + sum(len(role) + len(content) for role, content in turns or ())
        return None if size > self.max_chars else (prompt.text, turns, prompt.enable_thinking)


def render_chat(tokenizer, prompt: Prompt) -> str:
    """``prompt.messages`` through the tokenizer's chat template, with the
    generation prompt and, when the prompt sets it, the template's thinking
    switch ``enable_thinking`` (a template without one ignores it)."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise EngineError("the prompt is chat messages but the model's tokenizer has no chat template")
    turns = [{"role": m.role, "content": m.content} for m in prompt.messages or []]
    switches = {} if prompt.enable_thinking is None else {"enable_thinking": prompt.enable_thinking}
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, **switches)
    except (TemplateError, ValueError, TypeError) as exc:
        raise EngineError(f"the model's chat template refused the messages: {str(exc)[:200]}") from exc


class RolloutService(Service):
    name = "rollout"
    config: RolloutConfig

    def __init__(self, config: RolloutConfig, engine: Engine | None = None) -> None:
        super().__init__(config)
        self._engine = engine  # built in setup() from config.engine unless given (tests)
        # Where every adapter version comes from: messages name (experiment, version), never a path.
        self.store = DirectoryAdapterStore(Path(config.adapter_dir).resolve())
        self._adapters: AdapterSet | None = None  # set in setup
        self._rows: RowGate | None = None  # set in setup: the engine's rows, shared fairly by tenants
        self._preloads: dict[str, asyncio.Task] = {}
        self._preload_wanted: dict[str, AdapterPublished] = {}
        self._watch_group = ""
        self._engine_counters = metrics.CounterFollower()  # engine stats totals -> Prometheus counters
        self._prompt_ids = PromptIdCache()

    # -------------------------------------------------------------- lifecycle

    async def setup(self) -> None:
        await super().setup()
        await check_lora_against_deployment_async(self.redis, self.config.stream_prefix, self.name, self.config)
        if self._engine is None:
            from services.rollout.engines import build_engine

            self._engine = build_engine(self.config)
        await self._engine.start()
        keep = self.config.adapter_keep_versions
        self._adapters = AdapterSet(self._engine, self.store, keep, self.log)
        self._rows = RowGate(self._engine.capacity_rows)
        # This worker's private announcement group, from the stream's end:
        # versions announced before it started are loaded on demand instead.
        self._watch_group = f"rollout-watch-{self.consumer_name}"
        await self.bus.ensure_group("adapters", self._watch_group, start_id="$")
        self.log.info("rollout_ready", capacity_rows=self.engine.capacity_rows,
                      request_concurrency=self.request_concurrency(), keep_versions=keep,
                      adapter_dir=str(self.store.root))

    @property
    def engine(self) -> Engine:
        return set_up(self._engine, "rollout: engine")

    @property
    def adapters(self) -> AdapterSet:
        return set_up(self._adapters, "rollout: adapters")

    @property
    def rows(self) -> RowGate:
        return set_up(self._rows, "rollout: rows")

    def request_concurrency(self) -> int:
        typical_n = self.config.typical_group_size
        return max(1, self.engine.capacity_rows // max(1, typical_n))

    def consumers(self):
        concurrency = self.request_concurrency()
        return [
            self.consumer("rollout_requests", REQUEST_GROUP, self.on_request,
                          concurrency=concurrency, batch_size=concurrency),
            self.consumer("adapters", self._watch_group, self.on_adapter_published),
            # Tinker API sampling: the same engine and adapters, so the same decode batches
            self.consumer("tinker_sample_requests", tinker_sampling.REQUEST_GROUP, self.on_tinker_sample_request,
                          concurrency=concurrency, batch_size=concurrency),
        ]

    async def on_tinker_sample_request(self, request, entry) -> None:
        await tinker_sampling.on_tinker_sample_request(self, request, entry)

    def background(self):
        return [self._watch_engine()]

    async def _watch_engine(self) -> None:
        """A dead engine ends the service (exit 1, requests left for redelivery)
        instead of turning every request into an error completion."""
        while not self.stopping.is_set():
            failure = self.engine.failure()
            if failure is not None:
                raise EngineError(f"engine died: {failure}")
            try:
                await asyncio.wait_for(self.stopping.wait(), ENGINE_WATCH_INTERVAL_S)
            except TimeoutError:
                pass  # not stopping yet: look again

    def status(self) -> dict:
        """Engine counters for the heartbeat; ``shared_steps`` counts the decode
        steps each tenant pair ``"a|b"`` spent in one batch (most shared first)."""
        stats = self.engine.stats()
        return {"decode_steps": stats.decode_steps, "generated_tokens": stats.generated_tokens,
                "adapter_loads": stats.adapter_loads, "running_rows": stats.running_rows,
                "shared_steps": dict(stats.shared_steps.most_common(MAX_REPORTED_PAIRS))}

    def update_metrics(self) -> None:
        stats = self.engine.stats()
        metrics.ENGINE_ROWS.labels("running").set(stats.running_rows)
        metrics.ENGINE_ROWS.labels("waiting").set(stats.waiting_rows)
        metrics.ENGINE_CAPACITY_ROWS.set(self.engine.capacity_rows)
        self._engine_counters.follow(metrics.DECODE_STEPS, stats.decode_steps)
        metrics.ADAPTER_SLOTS_IN_USE.set(len(self.adapters.table))
        metrics.ADAPTER_SLOTS.set(self.config.max_loras)

    def _count_completion(self, completion: Completion, received: float) -> None:
        tokens = sum(len(sample.token_ids) for result in completion.results for sample in result.samples)
        metrics.GENERATED_TOKENS.labels(metrics.experiment_labels.label(completion.experiment_id)).inc(tokens)
        metrics.ROLLOUT_REQUEST_SECONDS.observe(max(0.0, time.time() - received))

    async def close(self) -> None:
        for task in list(self._preloads.values()):
            task.cancel()
        if self._preloads:
            await asyncio.wait(list(self._preloads.values()), timeout=5.0)
        if self._watch_group and self._redis is not None:
            try:  # the group is private to this worker name: do not leave it behind
                await self.redis.xgroup_destroy(self.bus.key("adapters"), self._watch_group)
            except (ResponseError, RedisConnectionError, OSError) as exc:
                self.log.warning("watch_group_cleanup_skipped", error=repr(exc))
        if self._engine is not None:
            await self._engine.close()
        await super().close()

    # -------------------------------------------------------------- requests

    async def on_request(self, request: RolloutRequest, entry) -> None:
        received = time.time()
        key = adapter_key(request.experiment_id, request.adapter_version)
        if request.sampling.n > self.engine.capacity_rows:
            await self._fail(request, f"n={request.sampling.n} exceeds the engine's {self.engine.capacity_rows} rows")
            return
        try:
            async with self.adapters.use(key):  # loaded once for all the prompts; from the store, not the message
                outcomes = await asyncio.gather(*(self._prompt_result(request, key, prompt)
                                                  for prompt in request.prompts), return_exceptions=True)
        except AdapterLoadError as exc:
            await self._fail(request, f"adapter version {request.adapter_version} unavailable: {exc.reason}")
            return
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if any(isinstance(f, AdapterLoadError) for f in failures):
            reason = next(f.reason for f in failures if isinstance(f, AdapterLoadError))
            await self._fail(request, f"adapter version {request.adapter_version} unavailable: {reason}")
            return
        if failures:
            raise failures[0]  # the engine is closing or dead: leave the request for redelivery
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        completion = self._completion(request, results, received)
        await self.bus.publish(completion)
        self._count_completion(completion, received)

    async def _prompt_result(self, request: RolloutRequest, key: AdapterKey | None,
                             prompt: Prompt) -> tuple[PromptResult, float, GenerationResult | None]:
        """One prompt of ``request`` under its fair share of rows: (result,
        submission time, engine result). A prompt that cannot be generated gets
        its own ``error``; the others go on."""
        try:
            prompt_ids = self._encode(prompt)
            # an evaluation's prompts yield to training steps (the trainer waits on those)
            async with self.rows.rows(request.experiment_id, request.sampling.n,
                                      background=request.purpose == "eval"):
                submitted, generated = await self._generate(request, key, prompt_ids)
        except EngineError as exc:
            if self.stopping.is_set() or self.engine.failure() is not None:
                raise  # the engine is closing or dead: the whole request is redelivered
            return PromptResult(prompt=prompt, error=f"generation failed: {exc}"), time.time(), None
        return self._prompt_samples(request, prompt, prompt_ids, generated), submitted, generated

    async def _generate(self, request: RolloutRequest, key: AdapterKey | None,
                        prompt_ids: list[int]) -> tuple[float, GenerationResult]:
        """Generate under ``key``; (submission time, result). The engine may
        evict an idle adapter between our load and the submission: load again."""
        for attempt in range(1, ADAPTER_NOT_LOADED_RETRIES + 2):
            async with self.adapters.use(key):  # from the store: request.adapter_path is not trusted
                submitted = time.time()
                try:
                    return submitted, await self.engine.generate(prompt_ids, key, request.sampling)
                except AdapterNotLoaded:
                    if attempt > ADAPTER_NOT_LOADED_RETRIES:
                        raise
                    self.log.info("adapter_evicted_reloading", adapter=key and key.name)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _encode(self, prompt: Prompt) -> list[int]:
        prompt_ids = self._prompt_ids.token_ids(self.engine.tokenizer(), prompt)
        if not prompt_ids:
            raise EngineError("the prompt is empty after tokenization")
        return prompt_ids

    def _prompt_samples(self, request: RolloutRequest, prompt: Prompt, prompt_ids: list[int],
                        generated: GenerationResult) -> PromptResult:
        tokenizer = self.engine.tokenizer()
        stops = stop_tokens(tokenizer, request.sampling.stop_token_ids)
        samples = [to_sample(tokenizer, sample, stops, request.sampling.stop) for sample in generated.samples]
        return PromptResult(prompt=prompt, prompt_token_ids=list(prompt_ids), samples=samples)

    def _completion(self, request: RolloutRequest,
                    outcomes: list[tuple[PromptResult, float, GenerationResult | None]],
                    received: float) -> Completion:
        """The request's results. Timings: from the request's queueing to its
        first prompt reaching the engine, that prompt's first token, and from
        then to now (the last prompt done): first token + decode spans the
        request's time in the engine."""
        generated = [(submitted, g) for _, submitted, g in outcomes if g is not None]
        queued_since = request.ts if request.ts > 0 else received
        first_submitted = min((submitted for submitted, _ in generated), default=received)
        first_token_s = min((g.time_to_first_token_s for _, g in generated), default=0.0)
        timings = RolloutTimings(
            queue_wait_s=max(0.0, first_submitted - queued_since) + min((g.queue_wait_s for _, g in generated),
                                                                         default=0.0),
            time_to_first_token_s=first_token_s,
            decode_s=max(0.0, time.time() - first_submitted - first_token_s) if generated else 0.0,
        )
        versions = [g.adapter.version if g.adapter is not None else 0 for _, g in generated]
        return Completion(
            request_id=request.request_id, experiment_id=request.experiment_id, step=request.step,
            purpose=request.purpose, results=[result for result, _, _ in outcomes],
            adapter_version=versions[0] if versions else request.adapter_version,
            reward=request.reward, timings=timings, worker=self.consumer_name,
        )

    async def _fail(self, request: RolloutRequest, reason: str) -> None:
        self.log.warning("rollout_failed", request_id=request.request_id,
                         experiment_id=request.experiment_id, reason=reason)
        await self.bus.publish(Completion(
            request_id=request.request_id, experiment_id=request.experiment_id, step=request.step,
            purpose=request.purpose, results=[PromptResult(prompt=p, error=reason) for p in request.prompts],
            adapter_version=request.adapter_version, reward=request.reward, worker=self.consumer_name,
            error=reason,
        ))
        await self.bus.publish(ExperimentEvent(
            experiment_id=request.experiment_id, level="error", code="rollout_failed",
            message=f"request {request.request_id}: {reason}", ts=now(),
        ))

    # -------------------------------------------------------------- announcements

    async def on_adapter_published(self, announcement: AdapterPublished, entry) -> None:
        """Check the announcement against the store, note the new version and
        preload it in the background; the newest announcement per tenant wins
        if several arrive during one load."""
        refusal = await asyncio.to_thread(self._announcement_problem, announcement)
        if refusal is not None:
            await self._reject_announcement(announcement, refusal)
            return
        key = AdapterKey(announcement.experiment_id, announcement.version)
        self.adapters.note_version(key)
        self._preload_wanted[key.tenant] = announcement
        running = self._preloads.get(key.tenant)
        # A task that has returned may not have run its done callback yet: it
        # will not see this announcement, so start a new one.
        if running is None or running.done():
            task = asyncio.create_task(self._preload(key.tenant), name=f"adapter-preload:{key.tenant}")
            self._preloads[key.tenant] = task
            task.add_done_callback(self._forget_preload)

    def _announcement_problem(self, announcement: AdapterPublished) -> str | None:
        """Why the announcement is not the store's version, None if it is.
        Reads the recorded DIGEST only: the files are hashed when loaded."""
        tenant, version = announcement.experiment_id, announcement.version
        try:
            expected_path = self.store.path(tenant, version)
        except AdapterStoreError as exc:
            return f"no such version in the adapter store: {exc}"
        if Path(announcement.path) != expected_path:
            return (f"announced path {announcement.path!r} is not the store's {str(expected_path)!r} "
                    f"for version {version}")
        try:
            recorded = self.store.digest(tenant, version)
        except AdapterStoreError as exc:
            return f"version {version} is not in the adapter store: {exc}"
        if announcement.digest != recorded:
            return f"announced digest {announcement.digest[:16]!r} differs from the store's {recorded[:16]!r}"
        return None

    async def _reject_announcement(self, announcement: AdapterPublished, reason: str) -> None:
        self.log.warning("adapter_rejected", experiment_id=announcement.experiment_id,
                         version=announcement.version, reason=reason)
        try:
            check_tenant_name(announcement.experiment_id)
        except AdapterStoreError:
            return  # not an experiment id: there is no experiment to tell
        await self.bus.publish(ExperimentEvent(
            experiment_id=announcement.experiment_id, level="error", code="adapter_rejected",
            message=f"adapter_published for version {announcement.version} refused: {reason}", ts=now(),
        ))

    def _forget_preload(self, task: asyncio.Task) -> None:
        tenant = task.get_name().removeprefix("adapter-preload:")
        if self._preloads.get(tenant) is task:
            del self._preloads[tenant]

    async def _preload(self, tenant: str) -> None:
        while tenant in self._preload_wanted:
            announcement = self._preload_wanted.pop(tenant)
            key = AdapterKey(tenant, announcement.version)
            if key.version < self.adapters.newest.get(tenant, 0) - self.adapters.keep_versions + 1:
                continue  # already superseded: loading it would only be retired again
            try:
                await self.adapters.ensure_loaded(key)
            except AdapterLoadError as exc:
                # Requests for this version will try again and report it on the experiment.
                self.log.warning("adapter_preload_failed", adapter=key.name, reason=exc.reason)
                continue
            await self.adapters.retire_stale(tenant)
