"""The trainer service: one GRPO step per train job, one tenant at a time.

Consumes ``train_jobs:<shard>`` (group ``trainer``), two jobs in hand: the
next one is read and decoded while the current one trains, so the model never
waits for a Redis round trip between jobs. The model work runs in one
dedicated thread (``TrainerCore.train``), one job at a time in the order read;
a trained step's weights (and moments, when checkpointed) are copied out and
written by a second thread (``TrainerCore.write``: files only) while the model
thread trains the next job; the version is announced once it is durable, and
the tenant's next job waits until then. The event loop only moves messages.
For a job updating version v of tenant T to v+1:

- the experiment id is not one (it would name a directory): a dead letter.
- v+1 already complete in the store: a redelivery of a job already done;
  re-announce it (``AdapterPublished``) and ack. Nothing is trained twice.
  v+1 older than the store's newest version but pruned: a very late
  duplicate; ack it, announce nothing.
- a job that can never succeed: its LoRA shape (``lora_rank``,
  ``lora_alpha``, ``lora_targets``: the tenant's own) does not fit the
  deployment's (rank over it, alpha not finite > 0, targets not a subset)
  or differs from the shape the tenant's adapter already has
  (``rank_mismatch``); a token id outside the model's vocabulary, behaviour logprobs
  not one per completion token, completions without a prompt
  (``train_job_invalid``); more prompt + completion tokens than
  ``max_train_tokens``, or a group (its prompt + all its completions, one
  packed row) longer than ``max_packed_row_tokens``
  (``train_job_over_budget``); v behind the tenant's state although v+1 is
  missing (inconsistent): an ``ExperimentEvent`` (level error) and a dead
  letter (``PermanentError`` with the reason). The scheduler ends the
  experiment as ``failed`` when its train job is dead-lettered.
- v is ahead of the tenant's state (an earlier job is still being retried):
  an event and a retryable error, so the bus redelivers it after the earlier
  one succeeds rather than losing a step (dead-lettering it would leave a
  gap in the experiment's versions).
- otherwise: groups sampled by a version older than
  ``v - hyper.max_off_policy_steps`` and groups that failed generation or
  scoring are dropped, groups with identical rewards are skipped (all
  counted in ``TrainStats.skipped_groups``); swap the tenant in; clipped
  GRPO loss; gradient clipping; Adam step; write v+1 to the store;
  checkpoint every ``hyper.checkpoint_every`` versions (the version's
  ``adapter_config.json`` and tensors have the tenant's own shape); delete the tenant's
  versions older than its newest ``max(adapter_retain_versions,
  max_off_policy_steps + 2)``, except those its checkpoints belong to;
  announce; ack.

A NaN or inf loss or gradient norm skips the optimizer step, raises an
``ExperimentEvent(code="nan_loss")`` and still publishes v+1, with weights
equal to v's and ``stats.skipped_update`` set: versions stay contiguous and
the experiment keeps going. A job with no usable group (everything skipped)
does the same with ``skip_reason="no_signal"`` and no event.

Any error after the optimizer step but before v+1 is durable drops the
tenant from memory, so the retry restores it from the store instead of
applying the step twice. ``TrainStats.train_s`` is the model thread's time
for the step, ``write_s`` the writer's.

Each trainer also reads ``events`` in a private group: when the scheduler
says an experiment ended (finished, cancelled, failed), the tenant's adapter
and Adam state leave memory. Its versions and checkpoints stay on disk.

Shape suffixes as in ``services.trainer.grpo``: ``_K`` one value per
completion token of the batch, ``_N`` one per sample of a group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import structlog
import torch

from services.trainer import grpo, tinker_ops
from services.trainer.tenants import ShapeMismatch, TenantBank, cpu_copies
from shared import metrics
from shared.adapters import AdapterStore, AdapterStoreError, DirectoryAdapterStore, check_tenant_name
from shared.bus import Entry, PermanentError
from shared.config import DEFAULT_ADAPTER_RETAIN_VERSIONS, TrainBudget, TrainerConfig
from shared.deployment import check_lora_against_deployment_async
from shared.devices import resolve_device, resolve_dtype
from shared.engine import LoraSignature
from shared.messages import (
    TERMINAL_STATUSES,
    AdapterPublished,
    ExperimentEvent,
    PromptResult,
    TrainJob,
    TrainStats,
    now,
)
from shared.runtime import Service, set_up

CONSUMER_GROUP = "trainer"
MICRO_BATCH_TOKENS = 16384  # padded positions per forward/backward; gradients accumulate across micro-batches
PAD_TOKEN_ID = 0  # right padding: attends only to itself, never attended to, never a target

log = structlog.get_logger(__name__)
EventLevel = Literal["info", "warning", "error"]


class VersionGap(RuntimeError):
    """A job for a version the tenant has not reached yet: retry later."""


@dataclass
class JobOutcome:
    """What the model thread decided; the loop publishes it.

    ``kind``: "published" (trained, v+1 written), "republished" (v+1 was
    already complete), "superseded" (v+1 was done, then pruned: ack only),
    "rejected" (dead-letter with ``reason``), "gap" (retry later with
    ``reason``)."""

    kind: Literal["published", "republished", "superseded", "rejected", "gap"]
    version: int = 0
    path: str = ""
    digest: str = ""
    stats: TrainStats = field(default_factory=TrainStats)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (level, code, message)
    reason: str = ""


@dataclass
class PendingVersion:
    """A trained step whose version is not on disk yet: CPU copies of what
    ``TrainerCore.write`` stores (the tenant's weights in its own shape; the
    optimizer moments when this version is checkpointed), taken in the model
    thread, so the write can run beside the next job's training."""

    job: TrainJob
    target: int
    weights: dict[str, torch.Tensor]
    shape: LoraSignature
    moments: dict[str, torch.Tensor] | None
    adam_step: int
    stats: TrainStats
    events: list[tuple[str, str, str]]


# ---------------------------------------------------------------- model side


def load_policy_model(model_dir: str, signature: LoraSignature, device: str = "auto", dtype: str = "auto"):
    """The base model with one trainable LoRA (dropout 0) of ``signature``.
    LoRA parameters stay fp32 on a bf16 base (PEFT's adapter autocast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    # sdpa takes the packed batches' custom 4D masks (flash-attention kernels would not).
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, torch_device),
                                                attn_implementation="sdpa")
    base.to(torch_device)  # type: ignore[arg-type]  # transformers' typing of the wrapped `to`
    lora_config = LoraConfig(  # peft types lora_alpha as int; it takes a float scale too
        r=signature.rank, lora_alpha=signature.alpha,  # type: ignore[arg-type]
        target_modules=list(signature.target_modules),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora_config)
    return model.eval()  # no dropout anywhere; gradients flow in eval mode too


class TrainerCore:
    """The model, the tenants and the store. Every method runs in the model
    thread except ``write``, which only touches files (one writer thread)."""

    def __init__(self, model, store: AdapterStore, checkpoint_root: Path, signature: LoraSignature,
                 base_model: str, micro_batch_tokens: int = MICRO_BATCH_TOKENS, budget: TrainBudget | None = None,
                 retain_versions: int = DEFAULT_ADAPTER_RETAIN_VERSIONS) -> None:
        self.model = model
        self.store = store
        self.signature = signature
        self.base_model = base_model
        self.micro_batch_tokens = micro_batch_tokens
        self.budget = budget if budget is not None else TrainBudget()
        self.retain_versions = max(1, retain_versions)
        self.vocab_size = model_vocab_size(model)
        self.bank = TenantBank(model, store, checkpoint_root)
        self.device = self.bank.device
        # tenant -> the version being written: its jobs wait (retry) until it is on disk
        self.writing: dict[str, int] = {}

    @classmethod
    def load(cls, config: TrainerConfig, store: AdapterStore) -> "TrainerCore":
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        model = load_policy_model(config.model_dir, config.signature, config.device, config.dtype)
        checkpoint_root = Path(config.data_dir) / "checkpoints"
        budget = TrainBudget(max_train_tokens=config.max_train_tokens,
                             max_packed_row_tokens=config.max_packed_row_tokens)
        return cls(model, store, checkpoint_root, config.signature, config.model_dir, budget=budget,
                   retain_versions=config.adapter_retain_versions)

    # ------------------------------------------------------------ one job

    def handle(self, job: TrainJob) -> JobOutcome:
        """Train and write, in this thread (the service splits the two)."""
        trained = self.train(job)
        if isinstance(trained, JobOutcome):
            return trained
        try:
            return self.write(trained)
        except BaseException:
            self.abandon(trained)
            raise

    def train(self, job: TrainJob) -> JobOutcome | PendingVersion:
        """The job's outcome when it trains nothing; else its step, trained
        and copied out, for ``write``."""
        tenant, target = job.experiment_id, job.base_version + 1
        try:  # before any path is built from it
            check_tenant_name(tenant)
        except AdapterStoreError as exc:
            return JobOutcome("rejected", reason=f"train_job_invalid: {exc}")  # no event: no experiment to tell
        if tenant in self.writing:  # checked before the store: the write ends by leaving this map
            return JobOutcome("gap", reason=f"version {self.writing[tenant]} of {tenant} is still being written")
        if self.store.is_complete(tenant, target):
            path = self.store.path(tenant, target)
            return JobOutcome("republished", target, str(path), self.store.digest(tenant, target))
        shape = self.signature.tenant_shape(job.lora_rank, job.lora_alpha, job.lora_targets)
        if problems := self.signature.shape_problems(shape):
            return _rejected("; ".join(problems), "rank_mismatch")
        problem = job_problem(job, self.vocab_size, self.budget)
        if problem is not None:
            return _rejected(problem[1], problem[0])
        if target < self.store.latest_version(tenant):
            # Done long ago (the scheduler moved on) and since pruned by retention: nothing to redo or announce.
            return JobOutcome("superseded", target, reason=f"version {target} was superseded and pruned")
        try:
            state = self.bank.ensure(tenant, job.hyper.seed, shape)
        except ShapeMismatch as exc:
            return _rejected(str(exc), "rank_mismatch")
        if job.base_version > state.version:
            reason = f"job updates version {job.base_version} but {tenant} is at version {state.version}"
            return JobOutcome("gap", reason=reason, events=[("warning", "train_job_out_of_order", reason)])
        if job.base_version < state.version:
            return _rejected(f"job updates version {job.base_version} but {tenant} is already at version "
                             f"{state.version} and version {target} is missing from the store", "train_job_stale")
        try:
            return self._train_and_copy(job, target)
        except BaseException:
            # The in-memory state may be ahead of the store now: rebuild it from there on retry.
            self.bank.forget(tenant)
            raise

    def _train_and_copy(self, job: TrainJob, target: int) -> PendingVersion:
        tenant = job.experiment_id
        started = time.perf_counter()
        stats, events = self.train_step(job)
        state = self.bank.get(tenant)
        weights = cpu_copies(self.bank.adapter_tensors(tenant))
        moments, adam_step = None, 0
        if target % max(job.hyper.checkpoint_every, 1) == 0:
            live_moments, adam_step = self.bank.optimizer_tensors(tenant)
            moments = cpu_copies(live_moments)
        self.bank.set_version(tenant, target)
        self.writing[tenant] = target
        stats.train_s = time.perf_counter() - started
        return PendingVersion(job, target, weights, state.shape, moments, adam_step, stats, events)

    def write(self, pending: PendingVersion) -> JobOutcome:
        """Make the version durable (adapter files; its checkpoint when due),
        prune old ones; files only, so it may run beside the next ``train``.
        On failure the caller calls ``abandon`` in the model thread."""
        tenant, target = pending.job.experiment_id, pending.target
        started = time.perf_counter()
        path, digest = self.store.write_version(tenant, target, pending.weights, pending.shape, self.base_model)
        if pending.moments is not None:
            self.bank.write_checkpoint(tenant, target, pending.moments, pending.adam_step)
        self._prune_versions(tenant, pending.job.hyper.max_off_policy_steps)
        del self.writing[tenant]  # on disk: the tenant's next job may train (a failure keeps it until abandon)
        pending.stats.write_s = time.perf_counter() - started
        return JobOutcome("published", target, str(path), digest, pending.stats, pending.events)

    def abandon(self, pending: PendingVersion) -> None:
        """After a failed write: the tenant's memory is ahead of the store,
        so drop it; the retried job restores it from the store."""
        self.bank.forget(pending.job.experiment_id)
        self.writing.pop(pending.job.experiment_id, None)

    def _prune_versions(self, tenant: str, max_off_policy_steps: int) -> None:
        """Delete old versions; the new one is durable already, so a failure
        here is logged, never a reason to redo the step."""
        # Off-policy rollouts may still ask for the versions they were sampled from, plus one in flight.
        keep_newest = max(self.retain_versions, max(0, max_off_policy_steps) + 2)
        try:
            removed = self.store.prune(tenant, keep_newest, keep=self.bank.checkpoint_versions(tenant))
        except (OSError, AdapterStoreError) as exc:
            log.warning("adapter_prune_failed", experiment_id=tenant, error=f"{type(exc).__name__}: {exc}")
            return
        if removed:
            log.debug("adapter_versions_pruned", experiment_id=tenant, versions=removed)

    def train_step(self, job: TrainJob) -> tuple[TrainStats, list[tuple[str, str, str]]]:
        """One GRPO update of the job's tenant (swapped in), unless there is no
        signal or the loss is not finite."""
        examples, skipped_groups, stale_groups = job_examples(job)
        events = []
        if stale_groups:
            events.append(("warning", "stale_samples_dropped",
                           f"{stale_groups} groups older than version "
                           f"{job.base_version - job.hyper.max_off_policy_steps} dropped"))
        stats = TrainStats(skipped_groups=skipped_groups + stale_groups)
        if not examples:
            stats.skipped_update, stats.skip_reason = True, "no_signal"
            return stats, events
        self.bank.swap_in(job.experiment_id)
        self.bank.set_learning_rate(job.hyper.learning_rate)
        batch = grpo.build_batch(examples, PAD_TOKEN_ID)
        self._update(batch, job, stats)
        if stats.skipped_update:
            events.append(("warning", "nan_loss", f"step {job.step}: {stats.skip_reason}; update skipped, "
                                                  f"version {job.base_version + 1} equals version {job.base_version}"))
        return stats, events

    def _update(self, batch: grpo.TrainBatch, job: TrainJob, stats: TrainStats) -> None:
        optimizer = self.bank.optimizer
        optimizer.zero_grad(set_to_none=True)
        finite = self._accumulate_gradients(batch, job, stats)
        if finite:
            params = list(self.bank.params.values())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, job.hyper.max_grad_norm)
            stats.grad_norm = float(grad_norm)
            finite = grpo.is_finite(stats.grad_norm)
            if not finite:
                stats.skip_reason = "non-finite gradient norm"
        else:
            stats.skip_reason = "non-finite loss"
        if finite:
            optimizer.step()
        else:
            stats.skipped_update = True
        optimizer.zero_grad(set_to_none=True)

    def _accumulate_gradients(self, batch: grpo.TrainBatch, job: TrainJob, stats: TrainStats) -> bool:
        """Backward over micro-batches; False (and stop) at a non-finite loss."""
        hyper = job.hyper
        # greedy samples report logprobs of the unscaled distribution (temperature 1)
        temperature = hyper.temperature if hyper.temperature > 0 else 1.0
        total_tokens = max(batch.num_tokens, 1)
        for micro in batch.micro_batches(self.micro_batch_tokens):
            micro = micro.to(self.device)
            ref_logprobs_K = None
            if hyper.kl_coef > 0:
                ref_logprobs_K = grpo.reference_logprobs(self.model, micro, temperature)
            logprobs_K = grpo.model_logprobs(self.model, micro, temperature)
            terms = grpo.policy_loss(
                logprobs_K, micro.behaviour_logprobs_K, micro.advantages_K, hyper.clip_eps,
                ref_logprobs_K, hyper.kl_coef, total_tokens=total_tokens,
            )
            stats.loss += terms.loss.item()
            stats.kl += terms.kl
            stats.clip_fraction += terms.clip_fraction
            stats.num_tokens += terms.num_tokens
            if not grpo.is_finite(terms.loss):
                return False
            terms.loss.backward()
        return True


def _rejected(reason: str, code: str) -> JobOutcome:
    """A refusal for good: the event tells the experiment, the dead letter keeps ``code: reason``."""
    return JobOutcome("rejected", reason=f"{code}: {reason}", events=[("error", code, reason)])


def model_vocab_size(model) -> int:
    """The number of token ids the model can embed and predict."""
    sizes = [model.get_input_embeddings().weight.shape[0]]
    output = model.get_output_embeddings()
    if output is not None:
        sizes.append(output.weight.shape[0])
    return min(sizes)


def job_problem(job: TrainJob, vocab_size: int, budget: TrainBudget) -> tuple[str, str] | None:
    """Why ``job`` can never be trained, as ``(event code, reason)``; None
    when it can. Checks every group, used or not: the job is refused whole.
    Token costs: each group is one packed row, its prompt once plus all its
    completion tokens; the job costs the sum of its rows."""
    if job.base_version < 0:
        return "train_job_invalid", f"base_version {job.base_version} is negative"
    total_tokens = 0
    for index, group in enumerate(job.groups):
        problem = _group_problem(group.result, vocab_size)
        if problem is not None:
            return "train_job_invalid", f"group {index}: {problem}"
        row_tokens = len(group.result.prompt_token_ids) + sum(
            len(sample.token_ids) for sample in group.result.samples)
        if row_tokens > budget.max_packed_row_tokens:
            return "train_job_over_budget", (
                f"group {index} packs {row_tokens} tokens (prompt + all its completions) in one row, over the "
                f"trainer's max_packed_row_tokens {budget.max_packed_row_tokens}")
        total_tokens += row_tokens
    if total_tokens > budget.max_train_tokens:
        return "train_job_over_budget", (
            f"the job has {total_tokens} prompt + completion tokens, over the trainer's max_train_tokens "
            f"{budget.max_train_tokens}")
    return None


def _group_problem(result: PromptResult, vocab_size: int) -> str | None:
    if bad := _out_of_vocabulary(result.prompt_token_ids, vocab_size):
        return f"prompt token id {bad} outside the model's vocabulary [0, {vocab_size})"
    for number, sample in enumerate(result.samples):
        if bad := _out_of_vocabulary(sample.token_ids, vocab_size):
            return f"sample {number}: token id {bad} outside the model's vocabulary [0, {vocab_size})"
        if len(sample.logprobs) != len(sample.token_ids):
            return (f"sample {number}: {len(sample.logprobs)} behaviour logprobs for "
                    f"{len(sample.token_ids)} completion tokens")
        if sample.token_ids and not result.prompt_token_ids:
            return f"sample {number} has completion tokens but the group has no prompt tokens"
    return None


def _out_of_vocabulary(token_ids: list[int], vocab_size: int) -> str:
    """The first token id outside ``[0, vocab_size)`` as text, '' if none."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        return str(next(t for t in token_ids if not 0 <= t < vocab_size))
    return ""


def job_examples(job: TrainJob) -> tuple[list[grpo.SequenceExample], int, int]:
    """The sequences to learn from, the number of groups skipped (failed,
    malformed, identical rewards) and of groups dropped as too stale."""
    oldest_version = job.base_version - job.hyper.max_off_policy_steps
    examples: list[grpo.SequenceExample] = []
    skipped = stale = 0
    for group_index, group in enumerate(job.groups):
        result, score = group.result, group.score
        if group.adapter_version < oldest_version:
            stale += 1
            continue
        usable = (score.reward_error is None and result.error is None and result.samples
                  and len(score.rewards) == len(result.samples))
        advantages_N = grpo.group_advantage(torch.tensor(score.rewards, dtype=torch.float32),
                                            job.hyper.normalize_advantage_std) if usable else None
        if advantages_N is None:
            skipped += 1
            continue
        for sample, advantage in zip(result.samples, advantages_N.tolist(), strict=True):
            if sample.token_ids:  # one packed row per group (see ``job_problem``'s row budget)
                examples.append(grpo.SequenceExample(
                    result.prompt_token_ids, sample.token_ids, sample.logprobs, advantage, group=group_index))
    return examples, skipped, stale


# ---------------------------------------------------------------- the service


class TrainerService(Service):
    name = "trainer"
    config: TrainerConfig

    def __init__(self, config: TrainerConfig) -> None:
        super().__init__(config)
        self.store = DirectoryAdapterStore(Path(config.adapter_dir).resolve())
        self.stream = f"train_jobs:{config.shard}"
        # One thread owns the model: torch work never runs on the event loop.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-model")
        # One thread writes versions, in the order trained, while the model trains the next job.
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-writer")
        self._steps: dict[str, asyncio.Future[None]] = {}  # tenant -> its job in hand (trained and written: done)
        self._core: TrainerCore | None = None  # set in setup
        # This trainer's private view of the events stream (from its first start on): ended experiments leave memory.
        self.events_group = f"trainer-watch-{self.consumer_name}"
        self.jobs_trained = 0
        self.jobs_republished = 0

    async def setup(self) -> None:
        await super().setup()
        await check_lora_against_deployment_async(self.redis, self.config.stream_prefix, self.name, self.config)
        self._core = await self._in_model_thread(TrainerCore.load, self.config, self.store)
        self.tinker = tinker_ops.TinkerRuns(self._core, Path(self.config.data_dir) / tinker_ops.STATES_DIR)
        await self.bus.ensure_group("events", self.events_group, start_id="$")
        self.log.info("trainer_ready", model_dir=self.config.model_dir, device=str(self.core.device),
                      stream=self.stream, adapter_dir=str(self.store.root))

    @property
    def core(self) -> TrainerCore:
        return set_up(self._core, "trainer: core")

    def consumers(self):
        return [
            # two jobs in hand: the next one is read while this one trains, and the
            # model thread (one worker) still trains one at a time, in the order read
            self.consumer(self.stream, CONSUMER_GROUP, self.on_train_job, batch_size=1, concurrency=2),
            self.consumer("events", self.events_group, self.on_event),
            # Tinker API runs (shard 0 holds them all): one op at a time, in order
            *([self.consumer("tinker_ops", tinker_ops.CONSUMER_GROUP, self.on_tinker_op, batch_size=1, concurrency=1)]
              if self.config.shard == 0 else []),
        ]

    async def on_tinker_op(self, op, entry: Entry) -> None:
        await tinker_ops.on_tinker_op(self, op, entry)

    def status(self) -> dict:
        tenants = len(self._core.bank.tenants) if self._core else 0
        return {"tenants": tenants, "jobs_trained": self.jobs_trained, "jobs_republished": self.jobs_republished}

    async def on_train_job(self, job: TrainJob, entry: Entry) -> None:
        with structlog.contextvars.bound_contextvars(experiment_id=job.experiment_id, job_id=job.job_id):
            outcome, swapped = await self._train(job)
            self._count_metrics(outcome, swapped)
            for level, code, message in outcome.events:
                await self.bus.publish(ExperimentEvent(
                    experiment_id=job.experiment_id, level=cast(EventLevel, level), code=code, message=message,
                    ts=now()))
            if outcome.kind == "rejected":
                raise PermanentError(outcome.reason)
            if outcome.kind == "gap":
                raise VersionGap(outcome.reason)
            if outcome.kind == "superseded":
                self.log.info("train_job_superseded", version=outcome.version, reason=outcome.reason)
                return
            self._count(outcome)
            await self.bus.publish(AdapterPublished(
                experiment_id=job.experiment_id, version=outcome.version, step=job.step, path=outcome.path,
                digest=outcome.digest, stats=outcome.stats, trainer=self.consumer_name, ts=now()))

    async def _train(self, job: TrainJob) -> tuple[JobOutcome, bool]:
        """The job's outcome, and whether it swapped tenants: trained in the
        model thread, then written in the writer thread while the model
        thread goes on with the next job. A job of the same tenant right
        behind (read in the same batch) starts once this one is done."""
        tenant = job.experiment_id
        previous, done = self._steps.get(tenant), asyncio.get_running_loop().create_future()
        self._steps[tenant] = done  # handlers start in the order read: the next one of this tenant waits for us
        try:
            if previous is not None:
                await previous
            trained, swapped = await self._in_model_thread(self._train_in_model_thread, job)
            if isinstance(trained, JobOutcome):
                return trained, swapped
            # shielded: a handler cancelled now (stopping, Redis away) leaves the write to finish; the
            # redelivered job then finds the version complete and republishes it
            return await asyncio.shield(asyncio.wrap_future(trained)), swapped
        finally:
            done.set_result(None)
            if self._steps.get(tenant) is done:
                del self._steps[tenant]

    def _train_in_model_thread(self, job: TrainJob) -> tuple[JobOutcome | concurrent.futures.Future[JobOutcome], bool]:
        """In the model thread: the outcome of a job that trains nothing, else
        its write, handed to the writer from here so that no step is left
        unwritten whatever happens to its handler."""
        active_before = self.core.bank.active
        trained = self.core.train(job)
        swapped = self.core.bank.active != active_before
        if isinstance(trained, JobOutcome):
            return trained, swapped
        written = self.writer.submit(self.core.write, trained)
        written.add_done_callback(functools.partial(self._abandon_if_failed, trained))
        return written, swapped

    def _abandon_if_failed(self, pending: PendingVersion, written: concurrent.futures.Future[JobOutcome]) -> None:
        """A failed write: the tenant's memory is ahead of the store; the model
        thread drops it (queued before the job's retry), which restores it."""
        if written.exception() is None:
            return
        try:
            self.executor.submit(self.core.abandon, pending)
        except RuntimeError:  # the model thread is shut down: this process's memory goes with it
            pass

    async def on_event(self, event: ExperimentEvent, entry: Entry) -> None:
        """An experiment that ended releases its adapter and Adam state from
        memory (its versions and checkpoints stay on disk: a late job for it
        restores them, as after a restart)."""
        if event.code in TERMINAL_STATUSES and self.core.bank.has(event.experiment_id):
            await self._in_model_thread(self.core.bank.forget, event.experiment_id)
            self.log.info("tenant_released", experiment_id=event.experiment_id, reason=event.code)

    def _count(self, outcome: JobOutcome) -> None:
        if outcome.kind == "republished":
            self.jobs_republished += 1
            self.log.info("adapter_republished", version=outcome.version)
            return
        self.jobs_trained += 1
        stats = outcome.stats
        self.log.info("adapter_published", version=outcome.version, loss=round(stats.loss, 5),
                      grad_norm=round(stats.grad_norm, 5), tokens=stats.num_tokens,
                      skipped_groups=stats.skipped_groups, skipped_update=stats.skipped_update,
                      train_s=round(stats.train_s, 4), write_s=round(stats.write_s, 4))

    def _count_metrics(self, outcome: JobOutcome, swapped: bool) -> None:
        metrics.TRAIN_JOBS.labels(outcome.kind).inc()
        if swapped:
            metrics.TRAINER_TENANT_SWAPS.inc()
        if outcome.kind == "published":
            metrics.TRAIN_STEP_SECONDS.observe(outcome.stats.train_s)

    async def close(self) -> None:
        # A cancelled handler leaves its step running in the thread: let it finish (bounded by one step),
        # then the writes of the steps trained so far.
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        await asyncio.to_thread(self.writer.shutdown, wait=True)
        await super().close()

    async def _in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


__all__ = ["TrainerService", "TrainerCore", "JobOutcome", "PendingVersion", "VersionGap", "load_policy_model",
           "job_examples", "job_problem", "model_vocab_size", "CONSUMER_GROUP", "MICRO_BATCH_TOKENS"]
