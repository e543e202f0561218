"""Issue 12: thousands of malformed entries over every stream a service reads,
while a legitimate experiment runs on a cluster of the four services.

The corpus is seeded. Each entry is classified before it is sent:
- *refused*: the bus must dead-letter it in every consumer group that reads
  its stream (it does not decode here either, is not one ``msg`` field, or
  is over ``max_entry_bytes``);
- *hostile*: a valid message with hostile content (ids such as
  ``legit:s0``, ``../x``, ``a\\n``, 10,000 characters; unknown experiments;
  NaN rewards); a handler may ignore it or refuse it, but must survive it.

It asserts: every service process alive with a heartbeat, the legitimate
experiment finished with adapter versions 1..steps, every refused entry
dead-lettered (per group) with a non-empty reason, and every dead letter's
reason non-empty. It prints the figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import redis

from services.cli.local import LocalCluster
from services.reward.worker import REPLIES_READER, REPLIES_STREAM, reward_stream, serve_reward_worker, worker_group
from services.scheduler import outgoing
from services.scheduler.state import Keys
from shared import messages as m
from shared.bus import DEAD_LETTER_STREAM
from shared.config import DEFAULT_MODEL_DIR
from tests.integration.cluster_procs import (
    CLUSTER_ENV,
    log_lines,
    missing_heartbeats,
    small_spec,
    submit,
    trainer_versions,
    wait_finished,
)

MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]

SEED = 1212
LEGIT = "legit"
STEPS = 3
REWARD_WORKER = "fuzz"
MAX_ENTRY_BYTES = 1024 * 1024
RANDOM_ENTRIES_PER_STREAM = 250
RUN_TIMEOUT_S = 240.0
DEAD_LETTER_TIMEOUT_S = 60.0
FUZZ_ENV = {**CLUSTER_ENV, "CLORA_MAX_ENTRY_BYTES": str(MAX_ENTRY_BYTES)}
# Every stream a service (or a reward worker) reads.
STREAMS = ("experiments", "tasks", "rollout_requests", "completions", "scored", "train_jobs:0", "adapters", "events",
           REPLIES_STREAM, reward_stream(REWARD_WORKER))
HOSTILE_IDS = (f"{LEGIT}:s0", f"{LEGIT}:metrics", "../x", "a\n", "x" * 10_000, "", "UPPER", "a/b", "victim:s0")

# ---------------------------------------------------------------- valid messages to twist

PROMPT = m.Prompt(prompt_id="p0", text="1+2=", answer="3")
REWARD = m.RewardSpec(type="family", family="add")
SAMPLE = m.Sample(token_ids=[5, 6], logprobs=[-0.1, -0.2], text="3", finish_reason="stop")


def completion(experiment_id: str) -> m.Completion:
    results = [m.PromptResult(prompt=PROMPT, prompt_token_ids=[1, 2], samples=[SAMPLE]),
               m.PromptResult(prompt=PROMPT, error="generation failed")]
    return m.Completion(request_id=f"{experiment_id}:s0", experiment_id=experiment_id, step=0, purpose="train",
                        results=results, adapter_version=0, reward=REWARD)


def scored(experiment_id: str, reward: float = 1.0) -> m.ScoredCompletion:
    return m.ScoredCompletion(completion=completion(experiment_id),
                              scores=[m.PromptScore(rewards=[reward], correct=[True]), m.PromptScore()])


def valid_message(stream: str, experiment_id: str, rng: random.Random) -> m.Message:
    """A message that decodes on ``stream`` and names ``experiment_id``."""
    base = m.base_stream(stream)
    if base == "experiments":
        if rng.random() < 0.5:
            return m.ExperimentCancel(experiment_id=experiment_id)
        return m.ExperimentSubmit(spec=small_spec(experiment_id, steps=1))
    if base == "tasks":
        return m.TaskPush(experiment_id=experiment_id, prompts=[PROMPT])
    if base == "rollout_requests":
        return m.RolloutRequest(request_id=f"{experiment_id}:s0", experiment_id=experiment_id, step=0,
                                purpose="train", prompts=[PROMPT] * rng.choice([1, 3]),
                                adapter_version=rng.choice([0, 1]),
                                adapter_path=rng.choice([None, "../x", "/etc"]),
                                sampling=m.SamplingParams(n=1, max_tokens=4), reward=REWARD)
    if base in ("completions", "reward"):
        return completion(experiment_id)
    if base in ("scored", "reward_replies"):
        return scored(experiment_id, rng.choice([1.0, float("nan"), float("inf"), -float("inf")]))
    if base == "train_jobs":
        return m.TrainJob(job_id=f"{experiment_id}:s0", experiment_id=experiment_id, step=0, base_version=0,
                          lora_rank=8, groups=outgoing.scored_groups(scored(experiment_id)),
                          hyper=m.TrainHyper(learning_rate=1e-3))
    if base == "adapters":
        return m.AdapterPublished(experiment_id=experiment_id, version=rng.choice([1, 1000]), step=0,
                                  path=rng.choice(["../x", "/etc", "/tmp"]), digest="0" * 64, trainer="fuzz")
    if base == "events":
        return m.ExperimentEvent(experiment_id=experiment_id, level="error", code="cancelled", message="fuzz")
    raise AssertionError(stream)


# ---------------------------------------------------------------- the corpus


def deep_maps(levels: int = 100_000) -> bytes:
    return b"\x81\xa1a" * levels + b"\xc0"


def refused_entries(stream: str, rng: random.Random) -> list[tuple[str, dict]]:
    """(label, fields) of entries every consumer group must dead-letter."""
    kind = m.kind_of(valid_message(stream, "e", rng))
    other_stream = rng.choice([s for s in STREAMS if m.base_stream(s) != m.base_stream(stream)])
    wrong_kind = m.encode(valid_message(other_stream, "e", rng))
    valid = m.encode(valid_message(stream, "fuzz-extra-field", rng))
    entries = [("random_bytes", {"msg": rng.randbytes(rng.randrange(0, 200))})
               for _ in range(RANDOM_ENTRIES_PER_STREAM)]
    entries += [
        ("no_msg", {"x": "y"}),
        ("no_msg_binary_names", {rng.randbytes(8): rng.randbytes(8) for _ in range(3)}),
        ("extra_field", {"msg": valid, "trace": "1"}),
        ("empty_msg", {"msg": b""}),
        ("deep_nesting", {"msg": deep_maps()}),
        ("deep_nesting_in_kind", {"msg": b"\x81\xa4kind" + deep_maps()}),
        ("deep_nesting_in_field", {"msg": b"\x82\xa4kind" + msgpack.packb(kind) + b"\xa2id" + deep_maps()}),
        ("wrong_types", {"msg": msgpack.packb({"kind": kind, "schema": 1, "experiment_id": 7, "step": "x"})}),
        ("nan_schema", {"msg": msgpack.packb({"kind": kind, "schema": float("nan")})}),
        ("inf_int_field", {"msg": msgpack.packb({"kind": kind, "experiment_id": "e", "step": float("inf")})}),
        ("newer_schema", {"msg": msgpack.packb({"kind": kind, "schema": 99})}),
        ("wrong_kind", {"msg": wrong_kind}),
        ("unknown_kind", {"msg": msgpack.packb({"kind": "shutdown_everything", "schema": 1})}),
        ("not_a_map", {"msg": msgpack.packb([kind, 1, 2])}),
        ("huge_string_unknown_field", {"msg": msgpack.packb({"kind": kind, "pad": "z" * 200_000})}),
        ("over_max_entry_bytes", {"msg": valid + b"\x00" * MAX_ENTRY_BYTES}),
        ("over_max_entry_bytes_no_msg", {"pad": b"z" * (MAX_ENTRY_BYTES + 1)}),
    ]
    return [(label, fields) for label, fields in entries if _must_be_refused(stream, fields)]


def _must_be_refused(stream: str, fields: dict) -> bool:
    """Whether the bus must refuse ``fields`` (the classification is checked,
    not assumed: a random payload that happened to decode would be dropped)."""
    size = sum(len(k) + len(v) for k, v in ((_b(k), _b(v)) for k, v in fields.items()))
    if size > MAX_ENTRY_BYTES or set(fields) != {"msg"}:
        return True
    try:
        m.decode(_b(fields["msg"]), stream)
    except m.MessageDecodeError:
        return True
    return False


def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def hostile_entries(stream: str, rng: random.Random) -> list[tuple[str, dict]]:
    """(label, fields) of valid messages with hostile content."""
    return [(f"hostile_id_{i}", {"msg": m.encode(valid_message(stream, experiment_id, rng))})
            for i, experiment_id in enumerate(HOSTILE_IDS) for _ in range(2)]


# ---------------------------------------------------------------- the run


class RewardWorkerThread:
    """A reward worker (``serve_reward_worker``) on its own loop, so the fuzzer
    reaches ``reward:<worker>`` through the real worker-side consumer."""

    def __init__(self, url: str, prefix: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, prefix), name="fuzz-reward-worker", daemon=True)

    def _run(self, url: str, prefix: str) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(serve_reward_worker(
                lambda prompt, text, answer: 0.0, worker=REWARD_WORKER, redis_url=url, stream_prefix=prefix,
                stop=self._stop, consumer_name="fuzz-worker-0"))
        except BaseException as exc:  # reported by the test, which asserts the worker stayed up
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


def send(client: redis.Redis, keys: Keys, corpus: dict[str, list[tuple[str, dict]]]) -> dict[str, list[str]]:
    """XADD the whole corpus (pipelined, interleaved over the streams); the
    entry ids per stream, in the corpus order."""
    ids: dict[str, list[str]] = {stream: [] for stream in corpus}
    pipe = client.pipeline(transaction=False)
    order = []
    for index in range(max(len(entries) for entries in corpus.values())):
        for stream, entries in corpus.items():
            if index < len(entries):
                pipe.xadd(keys.stream(stream), entries[index][1])
                order.append(stream)
                if len(order) % 200 == 0:
                    for name, entry_id in zip(order[-200:], pipe.execute(), strict=True):
                        ids[name].append(entry_id.decode())
    tail = len(order) % 200
    if tail:
        for name, entry_id in zip(order[-tail:], pipe.execute(), strict=True):
            ids[name].append(entry_id.decode())
    return ids


def groups_of(client: redis.Redis, keys: Keys, stream: str) -> list[str]:
    return sorted(g["name"].decode() for g in client.xinfo_groups(keys.stream(stream)))


def dead_letters_by(client: redis.Redis, keys: Keys) -> dict[tuple[str, str], dict[str, str]]:
    """(stream, group) -> entry id -> reason, for every dead letter."""
    letters: dict[tuple[str, str], dict[str, str]] = {}
    for _, fields in client.xrange(keys.stream(DEAD_LETTER_STREAM)):
        text = {k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"payload"}
        letters.setdefault((text["stream"], text["group"]), {})[text["entry_id"]] = text["reason"]
    return letters


def test_fuzz_every_stream_while_a_legitimate_experiment_runs(tmp_path, capsys):
    rng = random.Random(SEED)
    corpus_refused = {stream: refused_entries(stream, rng) for stream in STREAMS}
    corpus_hostile = {stream: hostile_entries(stream, rng) for stream in STREAMS}
    corpus = {stream: corpus_refused[stream] + corpus_hostile[stream] for stream in STREAMS}
    rng.shuffle(corpus["experiments"])  # the hostile ones among the refused, not after them
    cluster = LocalCluster(tmp_path / "cluster", env=FUZZ_ENV)
    worker = None
    try:
        cluster.start()
        cluster.wait_ready()
        client = redis.Redis.from_url(cluster.url)
        keys = Keys(cluster.stream_prefix)
        worker = RewardWorkerThread(cluster.url, cluster.stream_prefix)
        worker.start()
        _wait_group(client, keys, reward_stream(REWARD_WORKER), worker_group(REWARD_WORKER))
        started = time.monotonic()
        # half of the corpus before the submission, half while it runs
        first = {stream: entries[:len(entries) // 2] for stream, entries in corpus.items()}
        second = {stream: entries[len(entries) // 2:] for stream, entries in corpus.items()}
        ids = send(client, keys, first)
        submit(client, keys, small_spec(LEGIT, steps=STEPS))
        for stream, more in send(client, keys, second).items():
            ids[stream] += more
        sent_s = time.monotonic() - started
        record = wait_finished(cluster, client, keys, LEGIT, RUN_TIMEOUT_S)
        refused_ids = {stream: {entry_id for entry_id, (label, _) in zip(ids[stream], corpus[stream], strict=True)
                                if not label.startswith("hostile")} for stream in STREAMS}
        labels = {entry_id: label for stream in STREAMS
                  for entry_id, (label, _) in zip(ids[stream], corpus[stream], strict=True)}
        letters = _wait_dead_letters(cluster, client, keys, refused_ids, labels)

        # -------------------------------------------------- the figures
        report = _report(cluster, client, keys, corpus, ids, refused_ids, letters, sent_s, time.monotonic() - started)
        with capsys.disabled():
            print(report)

        # -------------------------------------------------- the verdict
        assert not cluster.dead(), [p.name for p in cluster.dead()]
        assert all(p.starts == 1 for p in cluster.processes.values())  # nobody was restarted
        assert missing_heartbeats(cluster, client) == []
        assert worker.alive and worker.error is None, worker.error
        assert record.status == "finished"
        assert sorted(set(trainer_versions(client, keys, LEGIT))) == list(range(1, STEPS + 1))
        for (stream, group), reasons in letters.items():
            assert all(reason.strip() for reason in reasons.values()), (stream, group)
        client.close()
    finally:
        if worker is not None:
            worker.stop()
        cluster.stop()


def readers_of(client: redis.Redis, keys: Keys, stream: str) -> list[str]:
    """Who must dead-letter a refused entry of ``stream``: its consumer groups;
    for the replies stream (plain XREAD), the reward service's replies reader."""
    return [REPLIES_READER] if stream == REPLIES_STREAM else groups_of(client, keys, stream)


def _wait_group(client: redis.Redis, keys: Keys, stream: str, group: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (client.exists(keys.stream(stream)) and group in groups_of(client, keys, stream)):
        assert time.monotonic() < deadline, f"group {group} never appeared on {stream}"
        time.sleep(0.05)


def _wait_dead_letters(cluster, client, keys, refused_ids, labels) -> dict[tuple[str, str], dict[str, str]]:
    """Wait until every group of every stream dead-lettered every refused entry."""
    deadline = time.monotonic() + DEAD_LETTER_TIMEOUT_S
    while True:
        cluster.check_alive()
        letters = dead_letters_by(client, keys)
        missing = {
            (stream, group): sorted(f"{i} ({labels[i]})" for i in wanted - letters.get((stream, group), {}).keys())
            for stream, wanted in refused_ids.items()
            for group in readers_of(client, keys, stream)
        }
        missing = {where: count for where, count in missing.items() if count}
        if not missing:
            return letters
        assert time.monotonic() < deadline, f"refused entries not dead-lettered: {missing}"
        time.sleep(0.5)


def _report(cluster, client, keys, corpus, ids, refused_ids, letters, sent_s, total_s) -> str:
    lines = [f"\nfuzz (seed {SEED}): {sum(len(v) for v in ids.values())} entries sent in {sent_s:.1f}s; "
             f"legit experiment finished after {total_s:.1f}s",
             f"{'stream':<22}{'sent':>6}{'refused':>9}{'hostile':>9}  dead letters per group (refused / hostile)"]
    for stream in STREAMS:
        hostile = set(ids[stream]) - refused_ids[stream]
        per_group = []
        for group in readers_of(client, keys, stream):
            dl = letters.get((stream, group), {})
            per_group.append(f"{group}: {len(refused_ids[stream] & dl.keys())}/{len(hostile & dl.keys())}")
        shown = ", ".join(per_group)
        lines.append(f"{stream:<22}{len(ids[stream]):>6}{len(refused_ids[stream]):>9}{len(hostile):>9}  {shown}")
    labels = Counter(label for entries in corpus.values() for label, _ in entries)
    lines.append("corpus: " + ", ".join(f"{label} {count}" for label, count in sorted(labels.items())))
    crashes = {p.name: p.starts - 1 + (0 if p.alive() else 1) for p in cluster.processes.values()}
    lines.append(f"service crashes/restarts: {crashes}")
    lines.append(f"handler_failed log lines: {log_lines(cluster, 'handler_failed')}")
    lines.append(f"total dead letters: {client.xlen(keys.stream(DEAD_LETTER_STREAM))}")
    return "\n".join(lines)
