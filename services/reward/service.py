"""The reward service: scores every completion with its experiment's reward.

Consumes ``completions`` (group ``reward``) and publishes one
``ScoredCompletion`` per completion to ``scored``, one ``PromptScore`` per
prompt result; when scoring a prompt fails (the reward failed, timed out, or
replied with something that is not a finite number) its score carries
``reward_error`` (zero rewards, not to be trained on) and one
``ExperimentEvent(code="reward_failed")`` per completion says why. The
service itself never stops over a reward.

Fair scoring. Every scoring call (one HTTP request per sample, one forward to
a reward worker, one built-in scoring of a prompt's samples) holds a slot of
``ScoringSlots``: at most ``max_inflight`` calls at once, at most
``max_inflight_per_experiment`` of one experiment, whose excess waits on the
experiment's own slots (see ``services.reward.limits``). Each call's
``timeout_s`` and ``max_attempts`` are clamped to the ``RewardLimits`` and the
whole call (retries and backoff included) to ``max_reward_budget_s``.

A handler waiting for its experiment's slots still occupies a consumer slot,
and the consumer reads an entry only when one is free. So the consumer reads
``READ_AHEAD_PER_SLOT`` times more completions than there are scoring slots:
a slow tenant's waiting completions fill at most ``max_inflight_per_experiment``
scoring slots while the read-ahead lets the completions behind them (other
tenants') be read and scored. The read-ahead bounds memory (waiting
completions are held decoded) and is the limit of the guarantee: a slow
tenant's backlog larger than the read-ahead, all of it ahead of another
tenant's completions on the stream, delays that tenant until the backlog
shrinks below it. Entries waiting here stay pending in Redis (their lease is
renewed), so a crash loses none.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import ResponseError

from services.reward.http_client import HttpReward, HttpRewardClient, request_body
from services.reward.limits import ScoringSlots, bounded_spec
from services.reward.scoring import (
    BUILTIN_TYPES,
    RewardError,
    SampleScore,
    apply_invert,
    score_builtin,
)
from services.reward.worker import WorkerReplies, combine_scores, failed_result, failed_score
from shared import metrics
from shared.bus import RETRYABLE_REDIS_ERRORS, is_redis_outage
from shared.config import RewardConfig
from shared.deployment import parse_allowlist, read_allowlist_async
from shared.messages import Completion, ExperimentEvent, PromptResult, PromptScore, RewardSpec, ScoredCompletion, now
from shared.runtime import Service, set_up

CONSUMER_GROUP = "reward"
READ_AHEAD_PER_SLOT = 8  # completions read (in flight or waiting) per scoring slot: see the module doc
ALLOWLIST_REFRESH_S = 2.0  # how soon `clora allowlist add|remove` takes effect
METRIC_REWARD_TYPES = (*BUILTIN_TYPES, "http", "worker")  # reward_type label values; anything else reads "other"


class RewardService(Service):
    name = "reward"
    config: RewardConfig

    def __init__(self, config: RewardConfig) -> None:
        super().__init__(config)
        self.configured_allowlist = parse_allowlist(config.http_allowlist)
        self._allowlist_logged = False  # the allow-list is logged once, then on every change
        self.slots = ScoringSlots(max(1, config.max_inflight), max(1, config.max_inflight_per_experiment))
        # as many pooled connections as scoring slots: a call holding a slot never waits for the pool
        self.http = HttpRewardClient(self.configured_allowlist, backoff_s=config.retry_backoff_s,
                                     max_connections=self.slots.total)
        self._worker_replies: WorkerReplies | None = None  # set in setup (needs the bus)

    async def setup(self) -> None:
        await super().setup()
        self._worker_replies = WorkerReplies(self.bus, consumer_name=self.consumer_name,
                                             max_entry_bytes=self.config.max_entry_bytes)
        await self.worker_replies.start()
        await self._refresh_allowlist()

    async def close(self) -> None:
        await self.http.aclose()
        await super().close()

    @property
    def worker_replies(self) -> WorkerReplies:
        return set_up(self._worker_replies, "reward: worker_replies")

    def consumers(self):
        read_ahead = self.slots.total * READ_AHEAD_PER_SLOT
        return [self.consumer("completions", CONSUMER_GROUP, self.on_completion, concurrency=read_ahead)]

    def background(self):
        return [self.worker_replies.run(self.stopping), self.watch_allowlist()]

    async def watch_allowlist(self) -> None:
        """Follow the operator's allow-list (``shared.deployment.allowlist_key``)
        while running; the configured prefixes always stay."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), ALLOWLIST_REFRESH_S)
                return
            except TimeoutError:
                pass
            try:
                await self._refresh_allowlist()
            except (*RETRYABLE_REDIS_ERRORS, ResponseError) as exc:
                if not is_redis_outage(exc):
                    raise
                self.log.warning("reward_allowlist_refresh_failed", error=repr(exc))  # keep the last one

    async def _refresh_allowlist(self) -> None:
        added = await read_allowlist_async(self.redis, self.config.stream_prefix)
        allowlist = [*self.configured_allowlist, *sorted(set(added) - set(self.configured_allowlist))]
        if allowlist != self.http.allowlist or not self._allowlist_logged:
            self.http.allowlist = allowlist
            self._allowlist_logged = True
            self.log.info("reward_allowlist", prefixes=allowlist)

    def status(self) -> dict[str, Any]:
        replies_dead_lettered = self._worker_replies.dead_lettered if self._worker_replies else 0
        return {"scoring_slots": self.slots.status(), "reward_replies_dead_lettered": replies_dead_lettered}

    async def on_completion(self, completion: Completion, entry) -> None:
        started = time.monotonic()
        scored = await self.score(completion)
        errors = [score.reward_error for score, result in zip(scored.scores, completion.results, strict=False)
                  if score.reward_error is not None and result.error is None]  # a rollout failure is not ours
        self._count_scoring(completion, len(errors), time.monotonic() - started)
        if errors and completion.error is None:
            await self._report_failure(completion, errors)
        await self.bus.publish(scored)

    def _count_scoring(self, completion: Completion, failed_prompts: int, took_s: float) -> None:
        if completion.error is not None:
            return  # nothing was scored: the generation failed
        reward_type = metrics.bounded(completion.reward.type, METRIC_REWARD_TYPES)
        metrics.SCORING_SECONDS.labels(reward_type).observe(took_s)
        if failed_prompts:
            metrics.SCORING_FAILURES.labels(reward_type).inc(failed_prompts)

    async def score(self, completion: Completion) -> ScoredCompletion:
        """Score every sample of every prompt of ``completion`` (never raises for a bad reward)."""
        if completion.error is not None:
            return failed_result(completion, f"generation failed: {completion.error}")
        spec = bounded_spec(completion.reward, self.config)
        if spec.type == "worker":
            scored = await self._score_worker(completion, spec)
        else:
            scored = ScoredCompletion(completion=completion, scores=list(await asyncio.gather(*(
                self._score_result(completion, spec, index) for index in range(len(completion.results))))))
        if not spec.invert:
            return scored
        return ScoredCompletion(completion=completion, scores=[_inverted(s) for s in scored.scores])

    async def _score_result(self, completion: Completion, spec: RewardSpec, index: int) -> PromptScore:
        result = completion.results[index]
        if result.error is not None:
            return failed_score(result, f"generation failed: {result.error}")
        if spec.type in BUILTIN_TYPES:
            return await self._score_builtin(completion, result)
        if spec.type == "http":
            return await self._score_http(completion, spec, index)
        return failed_score(result, f"unknown reward type {spec.type!r}")

    async def _score_builtin(self, completion: Completion, result: PromptResult) -> PromptScore:
        # A thread keeps the loop free for long completions; user regexes are
        # RE2 (linear time), so no pattern can hold the thread, or the GIL, for long.
        def score_all() -> list[SampleScore]:
            return [score_builtin(completion.reward, sample.text, result.prompt.answer)
                    for sample in result.samples]

        try:
            async with self.slots.hold(completion.experiment_id):
                return combine_scores(await asyncio.to_thread(score_all))
        except RewardError as exc:
            return failed_score(result, exc.reason)
        except Exception as exc:  # a verifier's bug or odd input: this group fails, never the service
            self.log.exception("builtin_scoring_raised", request_id=completion.request_id)
            return failed_score(result, f"scoring raised {type(exc).__name__}: {exc}")

    async def _score_http(self, completion: Completion, spec: RewardSpec, prompt_index: int) -> PromptScore:
        result = completion.results[prompt_index]
        outcomes = await asyncio.gather(*(
            self._score_http_sample(completion, spec, prompt_index, index) for index in range(len(result.samples))
        ))
        errors = [outcome for outcome in outcomes if isinstance(outcome, RewardError)]
        if errors:
            return failed_score(result, f"{len(errors)} of {len(outcomes)} samples unscored: {errors[0].reason}")
        return combine_scores([
            SampleScore(reward=o.reward, correct=o.correct, metrics=o.metrics)
            for o in outcomes if isinstance(o, HttpReward)  # all of them: no errors
        ])

    async def _score_http_sample(self, completion: Completion, spec: RewardSpec, prompt_index: int,
                                 index: int) -> HttpReward | RewardError:
        async with self.slots.hold(completion.experiment_id):
            try:
                async with asyncio.timeout(self.config.max_reward_budget_s):
                    return await self.http.score(spec, request_body(completion, prompt_index, index))
            except TimeoutError:  # the client turns its own per-attempt timeouts into RewardError
                return RewardError(self._over_budget(spec))
            except RewardError as exc:
                return exc

    async def _score_worker(self, completion: Completion, spec: RewardSpec) -> ScoredCompletion:
        if not spec.worker:
            return failed_result(completion, "reward type 'worker' needs reward.worker")
        async with self.slots.hold(completion.experiment_id):
            try:
                async with asyncio.timeout(self.config.max_reward_budget_s):
                    return await self.worker_replies.score(spec, completion)
            except TimeoutError:
                return failed_result(completion, self._over_budget(spec))

    def _over_budget(self, spec: RewardSpec) -> str:
        return (f"scoring took longer than the reward budget of {self.config.max_reward_budget_s:g}s "
                f"({spec.max_attempts} attempt(s) of {spec.timeout_s:g}s with backoff)")

    async def _report_failure(self, completion: Completion, errors: list[str]) -> None:
        """One event per completion, however many of its prompts failed."""
        failed = f"{len(errors)} of {len(completion.results)} prompts" if len(completion.results) > 1 else "prompt"
        reason = f"{failed} unscored: {errors[0]}"
        self.log.warning("reward_failed", experiment_id=completion.experiment_id,
                         request_id=completion.request_id, reason=reason)
        await self.bus.publish(ExperimentEvent(
            experiment_id=completion.experiment_id, level="error", code="reward_failed",
            message=f"request {completion.request_id}: {reason}", ts=now(),
        ))


def _inverted(score: PromptScore) -> PromptScore:
    if score.reward_error is not None:
        return score
    inverted = [apply_invert(SampleScore(reward=r, correct=c), True)
                for r, c in zip(score.rewards, score.correct or [None] * len(score.rewards), strict=False)]
    return PromptScore(rewards=[s.reward for s in inverted], correct=[s.correct for s in inverted],
                       reward_metrics=score.reward_metrics)
