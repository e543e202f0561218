"""``clora submit`` and ``CloraClient.submit`` refuse every invalid spec
before sending it: a non-zero exit (or ``SpecRefused``) with the reason, and
nothing on the experiments stream. Also ``clora watch`` on an unknown id and
``clora allowlist``. A real scheduler runs in-process (see test_client.py)."""

from __future__ import annotations

import asyncio
import re

import msgspec
import pytest
import yaml

from services.cli import experiments as cli
from shared.client import SpecRefused
from tests.integration.test_client import WAIT_S, bus, client, cluster, config  # noqa: F401 (fixtures)
from tests.integration.test_scheduler import make_spec

EXAMPLE_URL = "http://127.0.0.1:8088/score"


SERVICE_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")  # the cluster fixture logs to stdout


def valid(experiment_id: str) -> dict:
    return msgspec.to_builtins(make_spec(experiment_id, steps=1, eval_size=0))


INVALID = {
    "negative-steps": ({"steps": -2}, "steps: must be between 1"),
    "slash-id": ({"experiment_id": "team/exp1"}, "experiment_id: 'team/exp1' must match"),
    "family-and-stream": ({"task": {"family": "add", "stream": True}},
                          "task: give exactly one of family, prompts, stream, dataset (got family and stream)"),
    "rank-over-deployment": ({"lora_rank": 16}, "lora_rank: 16 is over the deployment's rank 8"),
    "unknown-family": ({"task": {"family": "poetry"}, "reward": {"type": "family", "family": "poetry"}},
                       "task.family: unknown family 'poetry'"),
    "http-off-allowlist": ({"reward": {"type": "http", "url": EXAMPLE_URL}},
                           f"reward.url: reward url '{EXAMPLE_URL}' is not on the reward service's allowlist"),
    "duplicate-id": ({"experiment_id": "taken"}, "experiment_id: 'taken' already exists"),
}


@pytest.fixture
async def taken(cluster, client):  # noqa: F811 (fixture)
    """An experiment that exists, so its id is taken; an allow-list without the example URL."""
    client.redis.sadd(f"{client.prefix}reward_allowlist", "http://127.0.0.1:9999/other")
    client.submit(valid("taken"))
    await asyncio.to_thread(client.wait, "taken", WAIT_S)


def connection(redis_url: str, stream_prefix: str) -> list[str]:
    return ["--redis-url", redis_url, "--stream-prefix", stream_prefix]


@pytest.mark.parametrize("case", list(INVALID))
async def test_clora_submit_refuses_with_the_reason_and_sends_nothing(case, taken, sync_redis, stream_prefix,
                                                                      redis_url, tmp_path, capsys):
    overrides, reason = INVALID[case]
    spec_file = tmp_path / f"{case}.yaml"
    spec_file.write_text(yaml.safe_dump({**valid(f"exp-{case}"), **overrides}))
    sent_before = sync_redis.xlen(f"{stream_prefix}experiments")

    assert cli.submit([str(spec_file), *connection(redis_url, stream_prefix)]) == 2

    output = capsys.readouterr()
    assert "refused, nothing sent" in output.err and reason in output.err, output.err
    # nothing printed but the in-process services' own log lines
    assert [line for line in output.out.splitlines() if not SERVICE_LOG_LINE.match(line)] == []
    assert sync_redis.xlen(f"{stream_prefix}experiments") == sent_before


@pytest.mark.parametrize("case", list(INVALID))
async def test_client_submit_raises_with_the_reason_and_sends_nothing(case, taken, client, sync_redis,  # noqa: F811
                                                                      stream_prefix):
    overrides, reason = INVALID[case]
    sent_before = sync_redis.xlen(f"{stream_prefix}experiments")
    with pytest.raises(SpecRefused) as refused:
        client.submit({**valid(f"exp-{case}"), **overrides})
    assert any(reason in r for r in refused.value.reasons), refused.value.reasons
    assert sync_redis.xlen(f"{stream_prefix}experiments") == sent_before


async def test_a_valid_spec_file_is_sent_and_runs(cluster, client, redis_url, stream_prefix, tmp_path,  # noqa: F811
                                                 capsys):
    spec_file = tmp_path / "good.json"
    spec_file.write_text(msgspec.json.encode(valid("from-file")).decode())
    assert cli.submit([str(spec_file), *connection(redis_url, stream_prefix)]) == 0
    assert capsys.readouterr().out.splitlines() == ["from-file"]
    record = await asyncio.to_thread(client.wait, "from-file", WAIT_S)
    assert record.status == "finished"


async def test_allowlist_changes_take_effect_for_submissions(cluster, client, redis_url, stream_prefix,  # noqa: F811
                                                             tmp_path, capsys):
    args = connection(redis_url, stream_prefix)
    http_spec = {**valid("http-scored"), "reward": {"type": "http", "url": EXAMPLE_URL + "/v2"}}
    assert client.validate(http_spec)  # refused: the allow-list is empty

    assert cli.allowlist(["add", EXAMPLE_URL, *args]) == 0
    assert EXAMPLE_URL in capsys.readouterr().out.splitlines()
    assert sync_redis_members(client, stream_prefix) == {EXAMPLE_URL}
    assert client.validate(http_spec) == []

    assert cli.allowlist(["remove", EXAMPLE_URL, *args]) == 0
    assert cli.allowlist(["list", *args]) == 0
    assert EXAMPLE_URL not in capsys.readouterr().out
    assert client.validate(http_spec)
    assert cli.allowlist(["remove", EXAMPLE_URL, *args]) == 1  # not on it any more
    assert cli.allowlist(["add", "ftp://files/", *args]) == 2
    assert "http:// or https://" in capsys.readouterr().err


def sync_redis_members(client, stream_prefix) -> set[str]:
    return {m.decode() for m in client.redis.smembers(f"{stream_prefix}reward_allowlist")}


async def test_watch_of_an_unknown_id_fails_at_once(cluster, redis_url, stream_prefix, capsys):  # noqa: F811
    code = await asyncio.wait_for(asyncio.to_thread(cli.watch, ["nosuch-id", *connection(redis_url, stream_prefix)]),
                                  WAIT_S)
    assert code == 1
    assert "unknown experiment(s): 'nosuch-id'" in capsys.readouterr().err
