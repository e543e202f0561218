"""``services/reward/README.md`` is enough for a stranger: its tables list
exactly the fields of ``completion`` and ``scored_completion``, and its two
examples (an HTTP reward server, a plain redis + msgpack worker), extracted
from the doc and run as written, score completions for a real reward service
(``clora reward`` as a process, on the real streams)."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from services.cli.local import LocalCluster
from shared import messages as m

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "services" / "reward" / "README.md"
WAIT_S = 60.0
PLAIN_CLIENT_MODULES = {"os", "socket", "json", "http", "msgpack", "redis"}


def doc_example(marker: str) -> str:
    text = DOC.read_text()
    start = text.index(f"<!-- example:{marker} -->")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"{DOC}: no python block after the {marker} marker"
    return match.group(1)


def doc_table(anchor: str) -> dict[str, bool]:
    """Field -> required, from the first table after the line starting with ``anchor``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(anchor))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
        elif rows:
            break
    return {row[0]: row[2] == "required" for row in rows[2:]}


@pytest.mark.parametrize("struct, anchor", [(m.Completion, "`completion`: "),
                                            (m.ScoredCompletion, "`scored_completion`: ")])
def test_the_doc_lists_exactly_the_fields_of_both_messages(struct, anchor):
    fields = {f.encode_name: f.required for f in msgspec.structs.fields(struct) if f.encode_name != "schema"}
    assert doc_table(anchor) == fields


@pytest.mark.parametrize("marker", ["http-server", "worker"])
def test_examples_need_no_clora_code(marker):
    imported = set()
    for node in ast.walk(ast.parse(doc_example(marker))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= PLAIN_CLIENT_MODULES, imported - PLAIN_CLIENT_MODULES


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def completion(request_id: str, reward: m.RewardSpec) -> m.Completion:
    """Two samples: a short one (reward 1.0 under both examples) and a long one (0.0)."""
    samples = [m.Sample(token_ids=[1, 2], logprobs=[-0.1, -0.2], text=text, finish_reason="stop")
               for text in ("42", "12345678")]
    result = m.PromptResult(prompt=m.Prompt(prompt_id="p0", text="40+2=", answer="42"), prompt_token_ids=[5, 6],
                            samples=samples)
    return m.Completion(request_id=request_id, experiment_id="docs", step=0, purpose="train", results=[result],
                        adapter_version=0, reward=reward)


def wait_scored(sync_redis, prefix: str, request_id: str) -> m.ScoredCompletion:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for _, fields in sync_redis.xrange(f"{prefix}scored"):
            scored = m.decode(fields[b"msg"], "scored")
            if scored.completion.request_id == request_id:
                return scored
        time.sleep(0.1)
    raise AssertionError(f"no scored_completion for {request_id} within {WAIT_S} s")


def run_example(marker: str, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    script = tmp_path / f"{marker}.py"
    script.write_text(doc_example(marker))
    return subprocess.Popen([sys.executable, str(script)], env={**os.environ, **env}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def reward_cluster(redis_url, stream_prefix, tmp_path):
    port = free_port()
    cluster = LocalCluster(tmp_path / "cluster", redis_url=redis_url, stream_prefix=stream_prefix,
                           services=("reward",), env={"CLORA_HTTP_ALLOWLIST": f"http://127.0.0.1:{port}/",
                                                      "CLORA_LOG_LEVEL": "warning"})
    with cluster:
        cluster.wait_ready(WAIT_S)
        yield cluster, port


def test_the_http_server_example_scores_for_the_reward_service(reward_cluster, sync_redis, stream_prefix, tmp_path):
    cluster, port = reward_cluster
    server = run_example("http-server", tmp_path, {"PORT": str(port)})
    try:
        wait_listening(port, server)
        reward = m.RewardSpec(type="http", url=f"http://127.0.0.1:{port}/score")
        sync_redis.xadd(f"{stream_prefix}completions", {"msg": m.encode(completion("docs:http", reward))})
        scored = wait_scored(sync_redis, stream_prefix, "docs:http")
    finally:
        server.kill()
        server.wait()
    [score] = scored.scores
    assert score.reward_error is None, score.reward_error
    assert score.rewards == [1.0, 0.0] and score.correct == [True, False]
    cluster.check_alive()


def test_the_plain_worker_example_scores_for_the_reward_service(reward_cluster, sync_redis, stream_prefix, redis_url,
                                                                tmp_path):
    cluster, _ = reward_cluster
    worker = run_example("worker", tmp_path, {"REDIS_URL": redis_url, "CLORA_STREAM_PREFIX": stream_prefix})
    try:
        reward = m.RewardSpec(type="worker", worker="short-answers", timeout_s=20.0, max_attempts=2)
        sync_redis.xadd(f"{stream_prefix}completions", {"msg": m.encode(completion("docs:worker", reward))})
        scored = wait_scored(sync_redis, stream_prefix, "docs:worker")
        assert worker.poll() is None, worker.stderr.read()
    finally:
        worker.kill()
        worker.wait()
    [score] = scored.scores
    assert score.reward_error is None, score.reward_error
    assert score.rewards == [1.0, 0.0] and score.correct == [True, False]
    cluster.check_alive()
