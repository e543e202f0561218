"""The reward service: scores every completion with its experiment's reward.

Consumes ``completions`` (group ``reward``) with up to ``max_inflight``
completions scored at once, so one experiment's slow or failing reward
(per-call timeouts, bounded retries) never delays another's. Publishes one
``ScoredCompletion`` per completion to ``scored``; when scoring fails the
result carries ``reward_error`` (zero rewards, not to be trained on) and an
``ExperimentEvent(code="reward_failed")`` says why. The service itself never
stops over a reward.
"""

from __future__ import annotations

import asyncio

from services.reward.http_client import HttpReward, HttpRewardClient, parse_allowlist, request_body
from services.reward.scoring import (
    BUILTIN_TYPES,
    RewardError,
    SampleScore,
    apply_invert,
    score_builtin,
)
from services.reward.worker import WorkerReplies, combine_scores, failed_result
from shared.config import RewardConfig
from shared.messages import Completion, ExperimentEvent, ScoredCompletion, now
from shared.runtime import Service

CONSUMER_GROUP = "reward"


class RewardService(Service):
    name = "reward"

    def __init__(self, config: RewardConfig) -> None:
        super().__init__(config)
        self.http = HttpRewardClient(parse_allowlist(config.http_allowlist), backoff_s=config.retry_backoff_s)
        self.worker_replies: WorkerReplies | None = None  # set in setup (needs the bus)

    async def setup(self) -> None:
        await super().setup()
        self.worker_replies = WorkerReplies(self.bus, self.redis)
        await self.worker_replies.start()
        self.log.info("reward_allowlist", prefixes=self.http.allowlist)

    def consumers(self):
        return [self.consumer("completions", CONSUMER_GROUP, self.on_completion,
                              concurrency=max(1, self.config.max_inflight))]

    def background(self):
        return [self.worker_replies.run(self.stopping)]

    async def on_completion(self, completion: Completion, entry) -> None:
        scored = await self.score(completion)
        if scored.reward_error is not None and completion.error is None:
            await self._report_failure(completion, scored.reward_error)
        await self.bus.publish(scored)
        self.log.debug("completion_scored", request_id=completion.request_id,
                       rewards=scored.rewards, error=scored.reward_error)

    async def score(self, completion: Completion) -> ScoredCompletion:
        """Score every sample of ``completion`` (never raises for a bad reward)."""
        if completion.error is not None:
            return failed_result(completion, f"generation failed: {completion.error}")
        spec = completion.reward
        if spec.type in BUILTIN_TYPES:
            scored = await self._score_builtin(completion)
        elif spec.type == "http":
            scored = await self._score_http(completion)
        elif spec.type == "worker":
            scored = await self._score_worker(completion)
        else:
            scored = failed_result(completion, f"unknown reward type {spec.type!r}")
        return _inverted(scored) if spec.invert and scored.reward_error is None else scored

    async def _score_builtin(self, completion: Completion) -> ScoredCompletion:
        # A thread, because a user's regex may backtrack for a long time.
        def score_all() -> list[SampleScore]:
            return [score_builtin(completion.reward, sample.text, completion.prompt.answer)
                    for sample in completion.samples]

        try:
            return combine_scores(completion, await asyncio.to_thread(score_all))
        except RewardError as exc:
            return failed_result(completion, exc.reason)

    async def _score_http(self, completion: Completion) -> ScoredCompletion:
        outcomes = await asyncio.gather(*(
            self._score_http_sample(completion, index) for index in range(len(completion.samples))
        ))
        errors = [outcome for outcome in outcomes if isinstance(outcome, RewardError)]
        if errors:
            return failed_result(completion, f"{len(errors)} of {len(outcomes)} samples unscored: "
                                             f"{errors[0].reason}")
        return combine_scores(completion, [
            SampleScore(reward=o.reward, correct=o.correct, metrics=o.metrics) for o in outcomes
        ])

    async def _score_http_sample(self, completion: Completion, index: int) -> HttpReward | RewardError:
        try:
            return await self.http.score(completion.reward, request_body(completion, index))
        except RewardError as exc:
            return exc

    async def _score_worker(self, completion: Completion) -> ScoredCompletion:
        if not completion.reward.worker:
            return failed_result(completion, "reward type 'worker' needs reward.worker")
        return await self.worker_replies.score(completion.reward, completion)

    async def _report_failure(self, completion: Completion, reason: str) -> None:
        self.log.warning("reward_failed", experiment_id=completion.experiment_id,
                         request_id=completion.request_id, reason=reason)
        await self.bus.publish(ExperimentEvent(
            experiment_id=completion.experiment_id, level="error", code="reward_failed",
            message=f"request {completion.request_id}: {reason}", ts=now(),
        ))


def _inverted(scored: ScoredCompletion) -> ScoredCompletion:
    scores = [apply_invert(SampleScore(reward=r, correct=c), True)
              for r, c in zip(scored.rewards, scored.correct or [None] * len(scored.rewards))]
    return ScoredCompletion(completion=scored.completion, rewards=[s.reward for s in scores],
                            correct=[s.correct for s in scores], reward_metrics=scored.reward_metrics,
                            reward_error=None)
