"""The reward service on the real Redis protocol, run in-process: built-in
verifiers, external HTTP reward services that work, are down, hang or answer
garbage, the URL allowlist, and external reward workers made with the helper."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading

import msgspec
import pytest

from services.reward import example_http
from services.reward.http_client import MAX_REPLY_BYTES, HttpRewardClient, request_body
from services.reward.scoring import RewardError
from services.reward.service import RewardService
from services.reward.worker import reward_worker
from shared.bus import StreamBus
from shared.config import RewardConfig
from shared.messages import (
    Completion,
    Prompt,
    PromptResult,
    PromptScore,
    RewardSpec,
    RewardTerm,
    Sample,
    ScoredCompletion,
    decode,
    encode,
)

RESULT_WAIT_S = 60.0  # a guard against hanging, never an assertion


# ---------------------------------------------------------------- helpers


def completion(experiment_id: str, reward: RewardSpec, texts: list[str], answer: str | None = "42",
               request_id: str | None = None) -> Completion:
    return Completion(
        request_id=request_id or f"{experiment_id}:s0:p0", experiment_id=experiment_id, step=0,
        purpose="train", results=[PromptResult(
            prompt=Prompt(prompt_id="p0", text="40+2=", answer=answer), prompt_token_ids=[1, 2],
            samples=[Sample(token_ids=[5] * len(t), logprobs=[-0.5] * len(t), text=t, finish_reason="stop")
                     for t in texts])],
        adapter_version=0, reward=reward,
    )


@dataclasses.dataclass
class OnePrompt:
    """A ``ScoredCompletion`` of a one-prompt completion, its score's fields at hand."""

    completion: Completion
    rewards: list[float]
    correct: list[bool | None]
    reward_metrics: dict[str, float]
    reward_error: str | None


def one_prompt(message):
    if not isinstance(message, ScoredCompletion):
        return message
    [score] = message.scores
    return OnePrompt(message.completion, score.rewards, score.correct, score.reward_metrics, score.reward_error)


async def read_messages(redis, key: str, count: int, where=lambda m: True) -> list:
    """The first ``count`` messages of ``key`` matching ``where`` (waits for them)."""
    deadline = asyncio.get_running_loop().time() + RESULT_WAIT_S
    while True:
        found = [one_prompt(decode(fields[b"msg"])) for _, fields in await redis.xrange(key)]
        found = [m for m in found if where(m)]
        if len(found) >= count:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(found)} of {count} messages on {key}: {found}")
        await asyncio.sleep(0.05)


def by_experiment(messages: list) -> dict:
    return {m.completion.experiment_id: m for m in messages}


@contextlib.asynccontextmanager
async def running(service):
    await service.setup()
    task = asyncio.create_task(service.run(), name="service-under-test")
    try:
        yield task
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)
        await service.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def example_reward_server():
    server = example_http.make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, name="example-reward", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.asynccontextmanager
async def raw_server(on_connection):
    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/score"
    finally:
        server.close()
        await server.wait_closed()


def config(redis_url: str, prefix: str, allow: list[str]) -> RewardConfig:
    return RewardConfig(redis_url=redis_url, stream_prefix=prefix, consumer_name="reward-test",
                        http_allowlist=",".join(allow), max_inflight=16, retry_backoff_s=0.05,
                        drain_timeout_s=5.0)


# ---------------------------------------------------------------- tests


async def test_builtin_verifiers_score_and_mark_correct(redis_url, stream_prefix, async_redis):
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(completion("exact", RewardSpec(type="exact_match"), ["42", " 41", "42\n"]))
        await bus.publish(completion("family", RewardSpec(type="family", family="add"), ["42", "7"]))
        await bus.publish(completion("regex", RewardSpec(type="regex", pattern=r"^4"), ["42", "7"]))
        await bus.publish(completion("inverted", RewardSpec(type="exact_match", invert=True), ["42", "7"]))
        scored = by_experiment(await read_messages(async_redis, stream_prefix + "scored", 4))
    assert scored["exact"].rewards == [1.0, 0.0, 1.0] and scored["exact"].correct == [True, False, True]
    assert scored["family"].rewards == [1.0, 0.0]
    assert scored["regex"].rewards == [1.0, 0.0]
    # invert rewards the opposite; `correct` still measures the task
    assert scored["inverted"].rewards == [0.0, 1.0] and scored["inverted"].correct == [True, False]
    assert all(s.reward_error is None for s in scored.values())


async def test_math_format_and_weighted_sums_score_over_redis(redis_url, stream_prefix, async_redis):
    gsm8k_reference = "He buys 3 packs of 4: 3 * 4 = <<3*4=12>>12 pens.\n#### 1,200"
    texts = ["3 packs... so 1200 pens. #### 1,200", "The answer is \\boxed{1200}", "1200", "#### 12", "no idea"]
    math_and_format = RewardSpec(type="sum", terms=[RewardTerm(type="math", weight=1.0),
                                                    RewardTerm(type="format", weight=0.25)])
    format_only = RewardSpec(type="sum", terms=[RewardTerm(type="format", weight=0.5),
                                                RewardTerm(type="regex", pattern="pens", weight=0.5)])
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        bus = StreamBus(async_redis, prefix=stream_prefix)
        for experiment_id, reward in (("math", RewardSpec(type="math")), ("format", RewardSpec(type="format")),
                                      ("math-and-format", math_and_format), ("format-only", format_only)):
            await bus.publish(completion(experiment_id, reward, texts, answer=gsm8k_reference))
        await bus.publish(completion("unanswered", math_and_format, texts, answer=None))
        scored = by_experiment(await read_messages(async_redis, stream_prefix + "scored", 5))
        events = await read_messages(async_redis, stream_prefix + "events", 1)
    assert scored["math"].rewards == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert scored["math"].correct == [True, True, True, False, False]
    assert scored["math"].reward_metrics == {"answer_found": 0.8}
    assert scored["format"].rewards == [1.0, 1.0, 0.0, 1.0, 0.0] and scored["format"].correct == [None] * 5
    # the sum: weighted terms, the verdict of its math term, each term's mean as a metric
    assert scored["math-and-format"].rewards == [1.25, 1.25, 1.0, 0.25, 0.0]
    assert scored["math-and-format"].correct == [True, True, True, False, False]
    assert scored["math-and-format"].reward_metrics == {"term0_math": 0.6, "term1_format": 0.6}
    assert scored["format-only"].rewards == [1.0, 0.5, 0.0, 0.5, 0.0] and scored["format-only"].correct == [None] * 5
    # no answer to check against: the group fails with the reason, nothing else does
    assert "math needs the prompt's answer" in scored["unanswered"].reward_error
    assert [e.experiment_id for e in events] == ["unanswered"] and events[0].code == "reward_failed"
    assert all(scored[k].reward_error is None for k in ("math", "format", "math-and-format", "format-only"))


async def test_failing_http_rewards_are_reported_and_isolated(redis_url, stream_prefix, async_redis):
    release_hanging = asyncio.Event()

    async def hang(reader, writer):  # accepts, reads, never answers until released
        await reader.read(65536)
        await release_hanging.wait()
        writer.close()

    async def garbage(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")
        await writer.drain()
        writer.close()

    down_url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    with example_reward_server() as good_url:
        async with raw_server(hang) as hang_url, raw_server(garbage) as garbage_url:
            allow = [good_url, down_url, hang_url, garbage_url]
            service = RewardService(config(redis_url, stream_prefix, allow))
            async with running(service) as service_task:
                bus = StreamBus(async_redis, prefix=stream_prefix)
                http = lambda url, **kw: RewardSpec(type="http", url=url, **kw)  # noqa: E731
                # The hanging one first, with a long timeout: it must not hold up the others.
                await bus.publish(completion("waits", http(hang_url, timeout_s=120, max_attempts=1), ["42"]))
                await bus.publish(completion("slow", http(hang_url, timeout_s=0.2, max_attempts=2), ["42"]))
                await bus.publish(completion("down", http(down_url, max_attempts=3), ["42"]))
                await bus.publish(completion("garbage", http(garbage_url), ["42"]))
                await bus.publish(completion("refused", http("http://127.0.0.1:9/score"), ["42"]))
                await bus.publish(completion("good", http(good_url), ["42", "x 42 y", "7"]))
                others = ["slow", "down", "garbage", "refused", "good"]
                scored = by_experiment(await read_messages(
                    async_redis, stream_prefix + "scored", len(others),
                    where=lambda m: m.completion.experiment_id in others))
                events = await read_messages(async_redis, stream_prefix + "events", 4)
                # every other experiment is done while "waits" still waits on its service
                assert not await read_messages_now(async_redis, stream_prefix + "scored", "waits")
                assert not service_task.done()
                release_hanging.set()
                waited = await read_messages(async_redis, stream_prefix + "scored", 1,
                                             where=lambda m: m.completion.experiment_id == "waits")
    assert scored["good"].reward_error is None
    assert scored["good"].rewards == [1.0, 1.0, 0.0] and scored["good"].correct == [True, True, False]
    assert scored["good"].reward_metrics == {"length": pytest.approx((2 + 6 + 1) / 3)}
    reasons = {name: scored[name].reward_error for name in ("slow", "down", "garbage", "refused")}
    assert "timeout" in reasons["slow"] and "attempt 2 of 2" in reasons["slow"]
    assert "cannot connect" in reasons["down"] and "attempt 3 of 3" in reasons["down"]
    assert "not JSON" in reasons["garbage"] and "attempt 1 of" in reasons["garbage"]  # garbage is not retried
    assert "allowlist" in reasons["refused"]
    for name in reasons:
        assert scored[name].rewards == [0.0]  # marked: not to be trained on
    event_by_experiment = {e.experiment_id: e for e in events}
    assert set(event_by_experiment) == set(reasons)
    assert all(e.code == "reward_failed" and e.level == "error" for e in events)
    assert "timeout" in event_by_experiment["slow"].message
    # the hanging service was released by closing the connection: that is a failure too, with a reason
    assert waited[0].reward_error is not None


async def read_messages_now(redis, key: str, experiment_id: str) -> list:
    return [m for m in (decode(f[b"msg"]) for _, f in await redis.xrange(key))
            if m.completion.experiment_id == experiment_id]


async def test_generation_errors_pass_through_without_a_reward_event(redis_url, stream_prefix, async_redis):
    failed = completion("broken", RewardSpec(type="exact_match"), [])
    failed = Completion(**{**{f: getattr(failed, f) for f in failed.__struct_fields__}, "error": "no adapter"})
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        await StreamBus(async_redis, prefix=stream_prefix).publish(failed)
        scored = await read_messages(async_redis, stream_prefix + "scored", 1)
    assert "no adapter" in scored[0].reward_error and scored[0].rewards == []
    assert await async_redis.xlen(stream_prefix + "events") == 0


async def test_every_prompt_of_a_completion_is_scored_on_its_own(redis_url, stream_prefix, async_redis):
    """One completion of three prompts: each gets its own score, a prompt whose
    generation failed stays failed without failing the others, and a prompt
    whose reward fails (no answer for exact_match) gives one event."""
    def result(prompt_id: str, answer: str | None, texts: list[str], error: str | None = None) -> PromptResult:
        return PromptResult(prompt=Prompt(prompt_id=prompt_id, text="40+2=", answer=answer), prompt_token_ids=[1],
                            samples=[Sample(token_ids=[5], logprobs=[-0.5], text=t, finish_reason="stop")
                                     for t in texts], error=error)

    request = Completion(request_id="multi:s0", experiment_id="multi", step=0, purpose="train", results=[
        result("p0", "42", ["42", "7"]), result("p1", "42", [], error="empty after tokenization"),
        result("p2", None, ["1"]), result("p3", "7", ["7"])], adapter_version=0,
        reward=RewardSpec(type="exact_match"))
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        await StreamBus(async_redis, prefix=stream_prefix).publish(request)
        [scored] = [decode(f[b"msg"]) for _, f in await read_raw(async_redis, stream_prefix + "scored", 1)]
        events = [decode(f[b"msg"]) for _, f in await read_raw(async_redis, stream_prefix + "events", 1)]
    first, failed, unanswered, last = scored.scores
    assert first.rewards == [1.0, 0.0] and first.reward_error is None and last.rewards == [1.0]
    assert "generation failed: empty after tokenization" in failed.reward_error
    assert "exact_match needs the prompt's answer" in unanswered.reward_error
    [event] = events
    assert event.code == "reward_failed" and "1 of 4 prompts" in event.message


async def read_raw(redis, key: str, count: int) -> list:
    deadline = asyncio.get_running_loop().time() + RESULT_WAIT_S
    while len(entries := await redis.xrange(key)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"only {len(entries)} of {count} entries on {key}"
        await asyncio.sleep(0.05)
    return entries


async def test_reward_worker_written_with_the_helper(redis_url, stream_prefix, async_redis):
    # ---- a user's reward worker: the whole thing (under 15 lines) ----
    @reward_worker("short-answers")
    def reward(prompt: str, completion: str, answer: str | None) -> float:
        return 1.0 if len(completion) <= 2 else 0.0

    stop_worker = asyncio.Event()
    worker_task = asyncio.create_task(
        reward.serve(redis_url=redis_url, stream_prefix=stream_prefix, stop=stop_worker))
    # ------------------------------------------------------------------

    @reward_worker("broken")
    def broken(prompt, completion, answer):
        raise ValueError("model judge unavailable")

    broken_task = asyncio.create_task(broken.serve(redis_url=redis_url, stream_prefix=stream_prefix,
                                                   stop=stop_worker))
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        bus = StreamBus(async_redis, prefix=stream_prefix)
        await bus.publish(completion("short", RewardSpec(type="worker", worker="short-answers"),
                                     ["42", "4242", "7"]))
        await bus.publish(completion("broken", RewardSpec(type="worker", worker="broken"), ["42"]))
        await bus.publish(completion("nobody", RewardSpec(type="worker", worker="nobody-listens",
                                                          timeout_s=0.3, max_attempts=2), ["42"]))
        scored = by_experiment(await read_messages(async_redis, stream_prefix + "scored", 3))
        events = await read_messages(async_redis, stream_prefix + "events", 2)
    stop_worker.set()
    await asyncio.wait_for(asyncio.gather(worker_task, broken_task), 30)
    assert scored["short"].reward_error is None and scored["short"].rewards == [1.0, 0.0, 1.0]
    assert "model judge unavailable" in scored["broken"].reward_error
    assert "did not reply" in scored["nobody"].reward_error
    assert {e.experiment_id for e in events} == {"broken", "nobody"}
    assert reward("p", "ab", None) == 1.0  # still a plain function


# ---------------------------------------------------------------- hostile input


async def test_backtracking_regex_does_not_stop_a_bystander(redis_url, stream_prefix, async_redis):
    # (\w+\s?)+$ on 64 word characters and a '!' backtracks for ages in Python's
    # re (27 characters took 24 s with the GIL held, freezing every tenant).
    hostile = RewardSpec(type="regex", pattern=r"(\w+\s?)+$")
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        bus = StreamBus(async_redis, prefix=stream_prefix)
        for index in range(3):
            await bus.publish(completion("hostile", hostile, ["a" * 64 + "!"] * 4 + ["a" * 64 + " b"],
                                         request_id=f"hostile:s0:p{index}"))
        for index in range(5):
            await bus.publish(completion("bystander", RewardSpec(type="exact_match"), ["42", "7"],
                                         request_id=f"bystander:s0:p{index}"))
        scored = await read_messages(async_redis, stream_prefix + "scored", 8)
    hostile_results = [s for s in scored if s.completion.experiment_id == "hostile"]
    bystander_results = [s for s in scored if s.completion.experiment_id == "bystander"]
    assert len(hostile_results) == 3 and len(bystander_results) == 5
    assert all(s.rewards == [0.0, 0.0, 0.0, 0.0, 1.0] and s.reward_error is None for s in hostile_results)
    assert all(s.rewards == [1.0, 0.0] for s in bystander_results)


async def test_a_pattern_re2_refuses_fails_the_group_with_the_reason(redis_url, stream_prefix, async_redis):
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        await StreamBus(async_redis, prefix=stream_prefix).publish(
            completion("backref", RewardSpec(type="regex", pattern=r"(a)\1"), ["aa"]))
        scored = await read_messages(async_redis, stream_prefix + "scored", 1)
        events = await read_messages(async_redis, stream_prefix + "events", 1)
    assert "RE2" in scored[0].reward_error and scored[0].rewards == [0.0]
    assert events[0].code == "reward_failed" and "RE2" in events[0].message


async def test_http_rewards_that_are_not_finite_numbers_fail_the_group(redis_url, stream_prefix, async_redis):
    replies = {b"/nan": b'{"reward": NaN}', b"/inf-text": b'{"reward": "inf"}',
               b"/infinity": b'{"reward": Infinity}', b"/nan-metric": b'{"reward": 1.0, "metrics": {"m": NaN}}'}

    async def answer_by_path(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1]
        body = replies.get(path, b'{"reward": 0.5}')
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async with raw_server(answer_by_path) as base_url:
        root = base_url.removesuffix("/score")
        service = RewardService(config(redis_url, stream_prefix, [root + "/"]))
        async with running(service):
            bus = StreamBus(async_redis, prefix=stream_prefix)
            for name in ("nan", "inf-text", "infinity", "nan-metric", "fine"):
                await bus.publish(completion(name, RewardSpec(type="http", url=f"{root}/{name}"), ["42", "7"]))
            scored = by_experiment(await read_messages(async_redis, stream_prefix + "scored", 5))
            events = await read_messages(async_redis, stream_prefix + "events", 4)
    assert scored["fine"].reward_error is None and scored["fine"].rewards == [0.5, 0.5]
    failed = ("nan", "inf-text", "infinity", "nan-metric")
    for name in failed:
        assert scored[name].rewards == [0.0, 0.0] and scored[name].reward_error is not None, name
    assert "finite" in scored["nan"].reward_error and "finite" in scored["infinity"].reward_error
    assert "number" in scored["inf-text"].reward_error and "metrics" in scored["nan-metric"].reward_error
    assert {e.experiment_id for e in events} == set(failed)
    assert all(e.code == "reward_failed" for e in events)


async def _serve_raw_worker(bus: StreamBus, worker: str, reply_for, stop: asyncio.Event) -> None:
    """A reward worker written against the protocol, without the helper (which
    would refuse NaN itself): ``reply_for(completion)`` -> ScoredCompletion."""
    async def handle(message: Completion, entry) -> None:
        await bus.publish(reply_for(message), stream="reward_replies")

    await bus.consumer(f"reward:{worker}", f"reward-worker-{worker}", handle, consumer_name=worker).run(stop)


async def test_worker_replies_that_are_not_finite_numbers_fail_the_group(redis_url, stream_prefix, async_redis):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    nan = float("nan")
    replies = {
        "nan": lambda c: ScoredCompletion(completion=c, scores=[PromptScore(rewards=[1.0, nan])]),
        "inf": lambda c: ScoredCompletion(completion=c, scores=[PromptScore(rewards=[float("inf"), 0.0])]),
        "nan-metric": lambda c: ScoredCompletion(completion=c, scores=[
            PromptScore(rewards=[1.0, 0.0], reward_metrics={"m": nan})]),
        "fine": lambda c: ScoredCompletion(completion=c, scores=[
            PromptScore(rewards=[1.0, 0.25], reward_metrics={"m": 2.0})]),
    }
    stop_workers = asyncio.Event()
    workers = [asyncio.create_task(_serve_raw_worker(bus, name, reply, stop_workers))
               for name, reply in replies.items()]
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service):
        for name in replies:
            await bus.publish(completion(name, RewardSpec(type="worker", worker=name), ["42", "7"]))
        scored = by_experiment(await read_messages(async_redis, stream_prefix + "scored", 4))
        events = await read_messages(async_redis, stream_prefix + "events", 3)
    stop_workers.set()
    await asyncio.wait_for(asyncio.gather(*workers), 30)
    assert scored["fine"].reward_error is None and scored["fine"].rewards == [1.0, 0.25]
    assert scored["fine"].reward_metrics == {"m": 2.0}
    assert "finite" in scored["nan"].reward_error and "sample 1" in scored["nan"].reward_error
    assert "finite" in scored["inf"].reward_error and "sample 0" in scored["inf"].reward_error
    assert "metric 'm'" in scored["nan-metric"].reward_error
    for name in ("nan", "inf", "nan-metric"):
        assert scored[name].rewards == [0.0, 0.0]
    assert {e.experiment_id for e in events} == {"nan", "inf", "nan-metric"}
    assert all(e.code == "reward_failed" and "finite" in e.message for e in events)


async def test_malformed_worker_replies_are_dead_lettered_and_replies_keep_flowing(
        redis_url, stream_prefix, async_redis):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    replies_key = stream_prefix + "reward_replies"
    deep = b"\x81\xa1k" * 100_000 + b"\xc0"  # 100,000 nested maps

    async def handle(message: Completion, entry) -> None:  # garbage first, then the reply
        await async_redis.xadd(replies_key, {"x": "y"})  # no msg
        await async_redis.xadd(replies_key, {"msg": b"\xff\x00 not msgpack"})
        await async_redis.xadd(replies_key, {"msg": deep})
        await async_redis.xadd(replies_key, {"msg": encode(message)})  # a kind this stream does not carry
        # the same request id under another experiment: nobody here waits for it
        forged = msgspec.structs.replace(message, experiment_id="intruder")
        await bus.publish(ScoredCompletion(completion=forged, scores=[PromptScore(rewards=[1.0, 1.0])]),
                          stream="reward_replies")
        await bus.publish(ScoredCompletion(completion=message, scores=[PromptScore(rewards=[0.25, 0.75])]),
                          stream="reward_replies")

    stop_worker = asyncio.Event()
    worker = asyncio.create_task(
        bus.consumer("reward:echo", "reward-worker-echo", handle, consumer_name="echo").run(stop_worker))
    service = RewardService(config(redis_url, stream_prefix, []))
    async with running(service) as service_task:
        for index in range(2):
            await bus.publish(completion("victim", RewardSpec(type="worker", worker="echo"), ["42", "7"],
                                         request_id=f"victim:s0:p{index}"))
        scored = await read_messages(async_redis, stream_prefix + "scored", 2)
        dead = await bus.dead_letters("reward_replies")
        assert not service_task.done()
    stop_worker.set()
    await asyncio.wait_for(worker, 30)
    assert [s.rewards for s in scored] == [[0.25, 0.75], [0.25, 0.75]]
    assert all(s.reward_error is None for s in scored)
    assert len(dead) == 8  # four bad entries before each reply
    reasons = [d.reason for d in dead]
    assert sum("no 'msg' field" in r for r in reasons) == 2
    assert sum("cannot decode" in r for r in reasons) == 6
    assert all(d.payload for d in dead if "no 'msg'" not in d.reason)  # the bytes are kept for inspection


# ---------------------------------------------------------------- the HTTP client's guarantees


@dataclasses.dataclass
class KeepAliveServer:
    """Answers every request on a connection (HTTP/1.1 keep-alive) with ``reply``;
    counts the connections it accepted and the most open at once."""

    reply: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"reward\": 0.5}"
    accepted: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: int = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                await asyncio.sleep(0.01)  # let the other calls pile up on the pool
                writer.write(self.reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            self.open_now -= 1
            writer.close()


def sample_body() -> dict:
    return request_body(completion("client", RewardSpec(type="http"), ["42"]), 0, 0)


async def test_the_http_client_pools_at_most_max_connections():
    server = KeepAliveServer()
    async with raw_server(server) as url:
        client = HttpRewardClient([url], max_connections=2)
        try:
            spec = RewardSpec(type="http", url=url, timeout_s=30, max_attempts=1)
            first = await asyncio.gather(*(client.score(spec, sample_body()) for _ in range(10)))
            second = await asyncio.gather(*(client.score(spec, sample_body()) for _ in range(10)))
        finally:
            await client.aclose()
    assert [r.reward for r in first + second] == [0.5] * 20
    assert server.requests == 20
    assert server.most_open <= 2 and server.accepted <= 2  # bounded, and kept alive across calls


async def test_the_http_client_does_not_follow_redirects():
    elsewhere = KeepAliveServer()
    async with raw_server(elsewhere) as elsewhere_url:
        redirect = KeepAliveServer(reply=(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                                          % elsewhere_url.encode()))
        async with raw_server(redirect) as url:
            client = HttpRewardClient([url, elsewhere_url])  # even an allowlisted target is not followed
            try:
                with pytest.raises(RewardError) as refused:
                    await client.score(RewardSpec(type="http", url=url, max_attempts=3), sample_body())
            finally:
                await client.aclose()
    assert "HTTP 302" in refused.value.reason and "attempt 1 of 3" in refused.value.reason
    assert redirect.requests == 1 and elsewhere.requests == 0


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n{}" % (MAX_REPLY_BYTES + 1),  # declared too large
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"  # chunked, past the cap without a length
    + b"%x\r\n%s\r\n" % (MAX_REPLY_BYTES, b" " * MAX_REPLY_BYTES) + b"2\r\n  \r\n0\r\n\r\n",
])
async def test_the_http_client_caps_the_reply_size(reply):
    server = KeepAliveServer(reply=reply)
    async with raw_server(server) as url:
        client = HttpRewardClient([url])
        try:
            with pytest.raises(RewardError) as too_large:
                await client.score(RewardSpec(type="http", url=url, max_attempts=2), sample_body())
        finally:
            await client.aclose()
    assert "larger than" in too_large.value.reason and "attempt 1 of 2" in too_large.value.reason


async def test_the_http_client_decodes_chunked_replies():
    chunks = [b'{"reward": ', b'0.75, "correct": ', b"true}"]
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    async with raw_server(KeepAliveServer(reply=reply)) as url:
        client = HttpRewardClient([url])
        try:
            scored = await client.score(RewardSpec(type="http", url=url), sample_body())
        finally:
            await client.aclose()
    assert (scored.reward, scored.correct) == (0.75, True)

