"""The README's protocol section, checked against a real cluster.

One ``LocalCluster`` (embedded Redis, the four services as processes, the
shipped tiny model) serves every test of this module; each test runs its own
small experiment (``add``: 2-3 steps, 4 prompts x group 4) and reads what a
client reads: the ``events``, ``metrics`` and ``adapters`` streams (one
``XREAD`` over the three, from their current end) and the experiment's record
through ``CloraClient``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.cli.local import LocalCluster
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.messages import (
    AdapterPublished,
    ExperimentEvent,
    Prompt,
    RolloutRequest,
    StepMetrics,
    decode,
)
from shared.tasks import get_family

MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]

RUN_TIMEOUT_S = 120.0
QUIET_S = 2.0  # after the end: long enough for a straggler to have been written
CLIENT_STREAMS = ("events", "metrics", "adapters")
END_CODES = ("finished", "cancelled", "failed", "invalid_spec")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


NOBODY_LISTENS = f"http://127.0.0.1:{_free_port()}/"  # an allow-listed reward URL that refuses every connection


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_HTTP_ALLOWLIST": NOBODY_LISTENS}
    with LocalCluster(tmp_path_factory.mktemp("protocol"), env=env) as running:
        running.wait_ready()
        yield running


@pytest.fixture
def client(cluster):
    with CloraClient.connect(cluster.url, cluster.stream_prefix) as connected:
        yield connected


def small_spec(experiment_id: str, **fields) -> dict:
    return {"experiment_id": experiment_id, "task": {"family": "add"}, "reward": {"type": "family", "family": "add"},
            "steps": 3, "prompts_per_step": 4, "group_size": 4, "max_tokens": 8, "eval_size": 8,
            "learning_rate": 0.003, **fields}


def entry_order(entry_id: bytes) -> tuple[int, int]:
    milliseconds, sequence = entry_id.decode().split("-")
    return int(milliseconds), int(sequence)


@dataclass
class Transcript:
    """Everything the client streams carried about one experiment, in order,
    with the entry id (ms, seq) of each message."""

    events: list[ExperimentEvent] = field(default_factory=list)
    metrics: list[StepMetrics] = field(default_factory=list)
    adapters: list[AdapterPublished] = field(default_factory=list)
    written_at: list[tuple[tuple[int, int], object]] = field(default_factory=list)
    after_end: list = field(default_factory=list)  # read in a later XREAD than the terminal event

    @property
    def codes(self) -> list[str]:
        return [e.code for e in self.events]

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].code in END_CODES

    def add(self, entry_id: bytes, message) -> None:
        self.written_at.append((entry_order(entry_id), message))
        if isinstance(message, ExperimentEvent):
            self.events.append(message)
        elif isinstance(message, StepMetrics):
            self.metrics.append(message)
        else:
            self.adapters.append(message)

    def nothing_after_end(self) -> bool:
        """Nothing about the experiment was written on a client stream after its terminal event."""
        return self.ended and self.after_end == [] and self.written_after_the_end() == []

    def written_after_the_end(self) -> list:
        """Messages whose entry id is later than the terminal event's."""
        end = max(order for order, message in self.written_at if message is self.events[-1])
        return [message for order, message in self.written_at if order > end]


class Reader:
    """Reads the client streams from where they end at creation, as the README says."""

    def __init__(self, client: CloraClient) -> None:
        self.redis = client.redis
        self.keys = {client.keys.stream(name): name for name in CLIENT_STREAMS}
        self.last = {}
        for key in self.keys:
            newest = self.redis.xrevrange(key, count=1)
            self.last[key] = newest[0][0] if newest else b"0-0"

    def read(self, experiment_id: str, block_ms: int) -> list[tuple[bytes, object]]:
        messages = []
        for key, entries in self.redis.xread(self.last, block=block_ms) or []:
            key = key.decode()
            for entry_id, fields in entries:
                self.last[key] = entry_id
                message = decode(fields[b"msg"], self.keys[key])
                if message.experiment_id == experiment_id:
                    messages.append((entry_id, message))
        return messages

    def until_end(self, experiment_id: str, cluster: LocalCluster) -> Transcript:
        """Read until the terminal event (the whole XREAD it came in), then
        ``QUIET_S`` more for stragglers."""
        transcript, deadline = Transcript(), time.monotonic() + RUN_TIMEOUT_S
        while not transcript.ended:
            assert time.monotonic() < deadline, f"{experiment_id} did not end: {transcript.codes}"
            cluster.check_alive()
            for entry_id, message in self.read(experiment_id, 1000):
                transcript.add(entry_id, message)
        quiet_until = time.monotonic() + QUIET_S
        while (left_ms := int((quiet_until - time.monotonic()) * 1000)) > 0:
            transcript.after_end += [message for _, message in self.read(experiment_id, left_ms)]
        return transcript


def rollout_requests(client: CloraClient, experiment_id: str) -> list[RolloutRequest]:
    entries = client.redis.xrange(client.keys.stream("rollout_requests"))
    requests = [decode(fields[b"msg"], "rollout_requests") for _, fields in entries]
    return [r for r in requests if r.experiment_id == experiment_id]


# ---------------------------------------------------------------- the README's example


def readme_example() -> str:
    text = README.read_text()
    assert "<!-- example:submit -->" in text
    block = text.split("<!-- example:submit -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_client_example_runs_as_written_and_stops_at_the_end(cluster, client, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {**os.environ, "REDIS_URL": cluster.url, "CLORA_STREAM_PREFIX": cluster.stream_prefix}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("info queued") and lines[-1].startswith("info finished"), lines
    assert sum(line.startswith("info queued") for line in lines) == 1, lines  # nothing read twice
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["0", "1", "2", "3"]
    # the last step's line came before `finished`, with the final held-out accuracy
    record = client.experiment("my-first-exp")
    assert record.status == "finished" and record.final_accuracy is not None
    assert steps[-1].endswith(f"held-out {record.final_accuracy}"), steps[-1]

    # run again: the id is taken, and the example stops at that, replaying nothing of the first run
    again = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-2000:]
    [line] = again.stdout.splitlines()
    assert line.startswith("error duplicate_experiment"), line


# ---------------------------------------------------------------- metrics and the end


def test_metrics_mean_what_the_table_says_and_the_end_is_the_last_message(cluster, client):
    reader = Reader(client)
    client.submit(small_spec("proto-metrics"))
    transcript = reader.until_end("proto-metrics", cluster)
    record = client.experiment("proto-metrics")

    assert transcript.codes[0] == "queued" and transcript.codes[-1] == "finished", transcript.codes
    assert transcript.nothing_after_end()  # nothing about it on any client stream after `finished`
    metrics = transcript.metrics
    assert [(m.step, m.adapter_version, m.produced_version) for m in metrics] == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]
    assert [a.version for a in transcript.adapters] == [1, 2, 3]
    assert all((m.groups, m.failed_groups) == (4, 0) and m.reward_mean is not None for m in metrics)
    # held-out: the final number on the last step, the start one once measured; both as in the record
    assert [m.eval_accuracy is None for m in metrics] == [True, True, False]
    assert metrics[-1].eval_accuracy == record.final_accuracy
    assert metrics[-1].start_eval_accuracy == record.start_accuracy is not None
    assert f"{record.start_accuracy:.3f} -> {record.final_accuracy:.3f}" in transcript.events[-1].message
    assert client.metrics("proto-metrics") == metrics  # the record's list is the stream's


def test_inline_prompts_get_a_held_out_split_never_trained_on(cluster, client):
    prompts = get_family("add").generate(7, 12, "train")
    spec = small_spec("proto-inline", task={"prompts": [{"prompt_id": p.prompt_id, "text": p.text,
                                                         "answer": p.answer} for p in prompts]},
                      steps=2, eval_size=4, seed=3)
    reader = Reader(client)
    client.submit(spec)
    transcript = reader.until_end("proto-inline", cluster)
    assert transcript.codes[-1] == "finished" and transcript.nothing_after_end()

    requests = rollout_requests(client, "proto-inline")
    held_out = {p.prompt_id for r in requests if r.purpose == "eval" for p in r.prompts}
    trained = {p.prompt_id for r in requests if r.purpose == "train" for p in r.prompts}
    assert len(held_out) == 4 and not held_out & trained
    record = client.experiment("proto-inline")
    assert record.start_accuracy is not None and transcript.metrics[-1].eval_accuracy == record.final_accuracy


# ---------------------------------------------------------------- streamed prompts


def test_streamed_experiment_says_it_waits_and_holds_out_the_first_pushed_prompts(cluster, client):
    prompts: list[Prompt] = get_family("add").generate(11, 12, "train")  # 4 held out + 2 steps x 4
    reader = Reader(client)
    client.submit(small_spec("proto-stream", task={"stream": True}, steps=2, eval_size=4))
    client.push_prompts("proto-stream", prompts[:6])
    waits = wait_for_events(reader, "proto-stream", "waiting_for_prompts", cluster)
    client.push_prompts("proto-stream", prompts[6:7])  # still short for step 0: no second event
    client.push_prompts("proto-stream", prompts[:1])  # a prompt_id already given: ignored, with a warning
    client.push_prompts("proto-stream", prompts[7:])
    transcript = reader.until_end("proto-stream", cluster)
    events = waits + transcript.events

    waiting = [e for e in events if e.code == "waiting_for_prompts"]
    # once for the wait of step 0, whatever came in meanwhile; 0 or 6 pushed: the push may beat admission
    assert len(waiting) == 1, [e.message for e in waiting]
    assert waiting[0].message.split(":", 1)[1].split("(")[0].strip() in ("0 pushed, step 0 needs 8",
                                                                         "6 pushed, step 0 needs 8")
    assert any(e.code == "tasks_ignored" and repr(prompts[0].prompt_id) in e.message for e in events)
    assert events[-1].code == "finished" and transcript.nothing_after_end()
    requests = rollout_requests(client, "proto-stream")
    ids = [p.prompt_id for p in prompts]
    assert {p.prompt_id for r in requests if r.purpose == "eval" for p in r.prompts} == set(ids[:4])
    train = sorted((r.step, [p.prompt_id for p in r.prompts]) for r in requests if r.purpose == "train")
    assert [prompt_id for _, step_ids in train for prompt_id in step_ids] == ids[4:12]  # in order, each once
    assert transcript.metrics[-1].eval_accuracy is not None


def wait_for_events(reader: Reader, experiment_id: str, code: str, cluster: LocalCluster) -> list[ExperimentEvent]:
    """Events read until one with ``code`` came."""
    events, deadline = [], time.monotonic() + RUN_TIMEOUT_S
    while not any(e.code == code for e in events):
        assert time.monotonic() < deadline, f"no {code} event: {[e.code for e in events]}"
        cluster.check_alive()
        events += [m for _, m in reader.read(experiment_id, 1000) if isinstance(m, ExperimentEvent)]
    return events


# ---------------------------------------------------------------- failed scoring


def test_failed_scoring_shows_as_failed_groups_and_no_reward(cluster, client):
    spec = small_spec("proto-no-reward", reward={"type": "http", "url": NOBODY_LISTENS + "score", "timeout_s": 1,
                                                 "max_attempts": 1}, steps=1, eval_size=0)
    reader = Reader(client)
    client.submit(spec)
    transcript = reader.until_end("proto-no-reward", cluster)

    [metrics] = transcript.metrics
    assert (metrics.groups, metrics.failed_groups) == (4, 4)
    assert metrics.reward_mean is None and metrics.accuracy is None  # not a reward of 0.0
    assert transcript.codes.count("reward_failed") >= 4
    # no group could be trained on, so the adapter never changed: failed, not finished, and said last
    assert transcript.codes[-1] == "failed" and transcript.nothing_after_end()
    record = client.experiment("proto-no-reward")
    assert record.status == "failed" and record.reward_mean is None and record.errors == 4
