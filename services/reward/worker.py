"""External reward workers on Redis streams.

Protocol: for an experiment whose reward is ``{"type": "worker", "worker":
"NAME"}``, the reward service publishes each ``Completion`` to stream
``<prefix>reward:NAME``. A worker (consumer group ``reward-worker-NAME``, so
several worker processes share the load) scores every sample of every prompt
result and publishes a ``ScoredCompletion`` (same ``completion``; ``scores[i]``
one reward per sample of ``results[i]``) to ``<prefix>reward_replies``. The reward service matches replies by
experiment id and ``request_id`` and waits ``RewardSpec.timeout_s`` per
attempt, forwarding again up to ``RewardSpec.max_attempts`` times (both within
the operator's ``RewardLimits``). A reply whose rewards or metrics are not
finite numbers, or whose reward count is not the sample count, fails that
prompt's group with the reason (a reply without one score per result fails
them all).

A user turns a plain function into a worker in a few lines::

    from services.reward.worker import reward_worker

    @reward_worker("short-answers")
    def reward(prompt: str, completion: str, answer: str | None) -> float:
        return 1.0 if len(completion) <= 3 else 0.0

    if __name__ == "__main__":
        reward.run()  # REDIS_URL from the environment

The function may return a number, a bool (reward 0/1 and the verdict used
for accuracy) or a dict ``{"reward": float, "correct": bool?, "metrics":
{str: float}?}``; it may be ``async def``. A function that raises marks the
prompt's score with ``reward_error`` instead of crashing the worker.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import structlog

from services.reward.scoring import RewardError, SampleScore, check_reward_value
from shared.bus import EntryRejected, StreamBus, StreamEntry, StreamTail, decode_message_entry
from shared.messages import Completion, PromptResult, PromptScore, RewardSpec, ScoredCompletion

log = structlog.get_logger(__name__)

REPLIES_STREAM = "reward_replies"
REPLIES_READER = "reward-replies-reader"  # the dead letters' group: replies are tailed, not read by a group
DEFAULT_MAX_REPLY_BYTES = 16 * 1024 * 1024

RewardFn = Callable[[str, str, "str | None"], Any]


def reward_stream(worker: str) -> str:
    """The stream (without prefix) that worker ``worker`` reads."""
    return f"reward:{worker}"


def worker_group(worker: str) -> str:
    return f"reward-worker-{worker}"


# ---------------------------------------------------------------- worker side


def to_sample_score(value: object) -> SampleScore:
    """What a user's reward function returned, as a ``SampleScore``."""
    if isinstance(value, bool):
        return SampleScore(reward=float(value), correct=value)
    if isinstance(value, dict):
        if "reward" not in value:
            raise RewardError(f"reward function returned a dict without 'reward': {sorted(value)}")
        correct = value.get("correct")
        metrics = {str(k): check_reward_value(v) for k, v in (value.get("metrics") or {}).items()}
        return SampleScore(reward=check_reward_value(value["reward"]),
                           correct=correct if isinstance(correct, bool) else None, metrics=metrics)
    return SampleScore(reward=check_reward_value(value))


async def score_with_function(fn: RewardFn, completion: Completion) -> ScoredCompletion:
    """Apply ``fn`` to every sample of every prompt result."""
    return ScoredCompletion(completion=completion,
                            scores=[await _score_result(fn, result) for result in completion.results])


async def _score_result(fn: RewardFn, result: PromptResult) -> PromptScore:
    """One prompt's samples; a raising function marks this prompt's score."""
    if result.error is not None:
        return failed_score(result, f"generation failed: {result.error}")
    scores: list[SampleScore] = []
    try:
        for sample in result.samples:
            scores.append(to_sample_score(await _call(fn, result.prompt.text, sample.text, result.prompt.answer)))
    except RewardError as exc:
        return failed_score(result, exc.reason)
    except Exception as exc:  # the user's code: report any failure on the experiment, keep serving
        return failed_score(result, f"reward function raised {type(exc).__name__}: {exc}")
    return combine_scores(scores)


async def _call(fn: RewardFn, prompt: str, text: str, answer: str | None) -> object:
    if inspect.iscoroutinefunction(fn):
        return await fn(prompt, text, answer)
    return await asyncio.to_thread(fn, prompt, text, answer)  # user code may be slow: keep the loop free


def combine_scores(scores: list[SampleScore]) -> PromptScore:
    """One prompt's ``PromptScore`` from per-sample scores (metrics averaged)."""
    names = sorted({name for score in scores for name in score.metrics})
    metrics = {
        name: sum(s.metrics[name] for s in scores if name in s.metrics)
        / sum(1 for s in scores if name in s.metrics)
        for name in names
    }
    return PromptScore(rewards=[s.reward for s in scores], correct=[s.correct for s in scores],
                       reward_metrics=metrics)


def failed_score(result: PromptResult, reason: str) -> PromptScore:
    """A score the scheduler must not train on: zero rewards, ``reward_error`` set."""
    count = len(result.samples)
    return PromptScore(rewards=[0.0] * count, correct=[None] * count, reward_error=reason)


def failed_result(completion: Completion, reason: str) -> ScoredCompletion:
    """Every prompt of ``completion`` failed with ``reason``."""
    return ScoredCompletion(completion=completion,
                            scores=[failed_score(result, reason) for result in completion.results])


def reward_errors(scored: ScoredCompletion) -> list[str]:
    """The ``reward_error`` of each prompt whose scoring failed."""
    return [score.reward_error for score in scored.scores if score.reward_error is not None]


async def serve_reward_worker(
    fn: RewardFn,
    *,
    worker: str,
    redis_url: str,
    stream_prefix: str = "clora:",
    stop: asyncio.Event | None = None,
    consumer_name: str | None = None,
    concurrency: int = 8,
) -> None:
    """Serve ``fn`` as reward worker ``worker`` until ``stop`` is set."""
    import redis.asyncio as aioredis

    stop = stop or asyncio.Event()
    client = aioredis.Redis.from_url(redis_url)
    bus = StreamBus(client, prefix=stream_prefix)

    async def handle(completion: Completion, entry) -> None:
        scored = await score_with_function(fn, completion)
        await bus.publish(scored, stream=REPLIES_STREAM)
        log.debug("reward_worker_scored", worker=worker, request_id=completion.request_id,
                  errors=reward_errors(scored))

    consumer = bus.consumer(
        reward_stream(worker), worker_group(worker), handle,
        consumer_name=consumer_name or f"{worker}-{socket.gethostname()}-{os.getpid()}",
        concurrency=concurrency,
    )
    log.info("reward_worker_started", worker=worker, stream=bus.key(reward_stream(worker)))
    try:
        await consumer.run(stop)
    finally:
        await client.aclose()


def run_reward_worker(fn: RewardFn, *, worker: str, redis_url: str | None = None,
                      stream_prefix: str | None = None) -> int:
    """Blocking entry point: serve until SIGINT/SIGTERM. ``redis_url`` and
    ``stream_prefix`` default to ``REDIS_URL`` and ``CLORA_STREAM_PREFIX``."""
    redis_url = redis_url or os.environ.get("REDIS_URL")
    if not redis_url:
        raise SystemExit("run_reward_worker: set REDIS_URL or pass redis_url=")
    prefix = stream_prefix or os.environ.get("CLORA_STREAM_PREFIX", "clora:")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve_reward_worker(fn, worker=worker, redis_url=redis_url, stream_prefix=prefix, stop=stop)

    asyncio.run(main())
    return 0


class RewardWorker:
    """A reward function plus the means to serve it; still callable as the function."""

    def __init__(self, fn: RewardFn, worker: str) -> None:
        self.fn = fn
        self.worker = worker

    def __call__(self, prompt: str, completion: str, answer: str | None):
        return self.fn(prompt, completion, answer)

    def run(self, **kwargs) -> int:
        return run_reward_worker(self.fn, worker=self.worker, **kwargs)

    async def serve(self, **kwargs) -> None:
        await serve_reward_worker(self.fn, worker=self.worker, **kwargs)


def reward_worker(worker: str) -> Callable[[RewardFn], RewardWorker]:
    """Decorator: ``@reward_worker("name")`` over ``def f(prompt, completion, answer)``."""
    return lambda fn: RewardWorker(fn, worker)


# ---------------------------------------------------------------- service side


class WorkerReplies:
    """The reward service's side: forward a completion to a worker stream and
    await the reply with the same experiment and ``request_id``.

    Replies are tailed (``shared.bus.StreamTail``) from the stream's end at
    start-up, so every reward service replica sees every reply and keeps the
    ones it waits for (a replica that restarts forwards again: its completions
    were not acked).

    Anyone who can write ``reward_replies`` can write garbage there, so the
    reader never dies of an entry: one without ``msg``, too large or that does
    not decode is logged and written to the dead-letter stream with the reason
    (group ``REPLIES_READER``: there is no consumer group, nothing is acked);
    a reply nobody here waits for is skipped (another replica may wait for it).
    An unreachable Redis is retried with capped backoff for as long as the
    service runs; the reader resumes after the last entry it handled.
    """

    def __init__(self, bus: StreamBus, *, consumer_name: str = "reward",
                 max_entry_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self.bus = bus
        self.consumer_name = consumer_name
        self.max_entry_bytes = max_entry_bytes
        self._waiters: dict[tuple[str, str], set[asyncio.Future]] = {}  # (experiment, request) -> futures
        self._tail = StreamTail(bus, [REPLIES_STREAM], retry_event="reward_replies_read_retrying")
        self.dead_lettered = 0  # for status

    async def start(self) -> None:
        """Remember where the replies stream ends now (before any forward)."""
        await self._tail.start_at_end()

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch replies to waiters until ``stop`` is set and nobody waits
        (handlers still draining after a stop keep getting their replies).
        While Redis is away, waiters time out on their own; once it is back
        the tail resumes after the last entry handled, so no reply is skipped."""
        await self._tail.follow(self._dispatch, until=lambda: stop.is_set() and not self._waiters)

    async def _dispatch(self, entry: StreamEntry) -> None:
        try:
            reply, payload = decode_message_entry(entry, self.max_entry_bytes)
        except EntryRejected as rejected:
            await self._dead_letter(entry.entry_id, rejected.reason, rejected.payload)
            return
        if not isinstance(reply, ScoredCompletion):  # the stream carries nothing else; typed for the checker
            await self._dead_letter(entry.entry_id, f"{type(reply).__name__} is not a reply", payload)
            return
        echo = reply.completion
        waiters = self._waiters.pop((echo.experiment_id, echo.request_id), set())
        if not waiters:
            log.debug("reward_reply_unclaimed", experiment_id=echo.experiment_id, request_id=echo.request_id)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(reply)

    async def _dead_letter(self, entry_id: str, reason: str, payload: bytes) -> None:
        log.warning("reward_reply_invalid", entry_id=entry_id, reason=reason)
        await self.bus.dead_letter(REPLIES_STREAM, entry_id, REPLIES_READER, self.consumer_name, 1, reason, payload)
        self.dead_lettered += 1

    async def score(self, spec: RewardSpec, completion: Completion) -> ScoredCompletion:
        """The worker's result, or a failed result after ``max_attempts`` timeouts."""
        if not spec.worker:
            return failed_result(completion, "reward spec of type 'worker' names no worker")
        attempts = max(1, spec.max_attempts)
        for attempt in range(1, attempts + 1):
            reply = await self._forward_once(spec.worker, spec.timeout_s, completion)
            if reply is not None:
                return self._checked(reply, completion, spec.worker)
            log.info("reward_worker_timeout", worker=spec.worker, request_id=completion.request_id,
                     attempt=attempt)
        return failed_result(completion, f"reward worker {spec.worker!r} did not reply within "
                                         f"{spec.timeout_s:g}s ({attempts} attempt(s))")

    async def _forward_once(self, worker: str, timeout_s: float, completion: Completion) -> ScoredCompletion | None:
        waiter: asyncio.Future[ScoredCompletion] = asyncio.get_running_loop().create_future()
        key = (completion.experiment_id, completion.request_id)
        self._waiters.setdefault(key, set()).add(waiter)
        try:
            await self.bus.publish(completion, stream=reward_stream(worker))
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    @staticmethod
    def _checked(reply: ScoredCompletion, completion: Completion, worker: str | None) -> ScoredCompletion:
        """The reply's scores on our own copy of the completion (the reply's
        is the worker's echo), each prompt's failed with what is wrong with it."""
        if len(reply.scores) != len(completion.results):
            return failed_result(completion, f"reward worker {worker!r} replied with {len(reply.scores)} "
                                             f"scores for {len(completion.results)} prompts")
        return ScoredCompletion(completion=completion, scores=[
            _checked_score(score, result, worker) for score, result in zip(reply.scores, completion.results,
                                                                           strict=True)])


def _checked_score(score: PromptScore, result: PromptResult, worker: str | None) -> PromptScore:
    if result.error is not None:
        return failed_score(result, f"generation failed: {result.error}")
    if score.reward_error is not None:
        return failed_score(result, score.reward_error)
    problem = _reply_problem(score, len(result.samples))
    if problem is not None:
        return failed_score(result, f"reward worker {worker!r} {problem}")
    correct: list[bool | None] = (list(score.correct) if len(score.correct) == len(score.rewards)
                                  else [None] * len(score.rewards))
    return PromptScore(rewards=list(score.rewards), correct=correct, reward_metrics=dict(score.reward_metrics))


def _reply_problem(reply: PromptScore, sample_count: int) -> str | None:
    """None for a usable score, else what the worker got wrong."""
    if len(reply.rewards) != sample_count:
        return f"replied with {len(reply.rewards)} rewards for {sample_count} samples"
    values = [(f"sample {index}", reward) for index, reward in enumerate(reply.rewards)]
    values += [(f"metric {name!r}", value) for name, value in reply.reward_metrics.items()]
    for where, value in values:
        try:
            check_reward_value(value)
        except RewardError as exc:
            return f"replied with an unusable value for {where}: {exc.reason}"
    return None
