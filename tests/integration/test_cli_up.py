"""Where Redis is: a ``clora up`` cluster (``LocalCluster`` with its embedded
Redis) keeps its port across restarts of the same data dir, and ``clora env``,
``clora check`` and the client find it through the data dir alone."""

from __future__ import annotations

import pytest

from services.cli import check, experiments
from services.cli.local import LocalCluster
from shared.client import CloraClient, find_redis_url

WAIT_S = 60.0


@pytest.fixture
def no_address_in_env(monkeypatch, tmp_path):
    for name in ("REDIS_URL", "CLORA_STREAM_PREFIX", "CLORA_CONSUMER_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLORA_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_the_port_is_kept_and_every_command_finds_the_cluster(no_address_in_env, capsys):
    data_dir = no_address_in_env
    cluster = LocalCluster(data_dir, services=("scheduler",), stream_prefix="mine:",
                           env={"CLORA_LOG_LEVEL": "warning"})
    with cluster:
        first_url = cluster.url
        cluster.wait_ready(WAIT_S)
        assert experiments.env([]) == 0
        assert capsys.readouterr().out.splitlines() == [f"export REDIS_URL={first_url}",
                                                        "export CLORA_STREAM_PREFIX=mine:"]
        assert check.main(["scheduler"]) == 0  # no REDIS_URL, no --any: the data dir's cluster
        assert "scheduler alive" in capsys.readouterr().out
        assert check.main(["trainer"]) == 1  # not started here
        with CloraClient.connect() as client:
            assert client.prefix == "mine:" and client.experiments() == []
    assert not (data_dir / "redis_url").exists()  # a stopped cluster is not found
    with pytest.raises(Exception, match="start `clora up`"):
        find_redis_url()

    with LocalCluster(data_dir, services=(), stream_prefix="mine:") as again:
        assert again.url == first_url
        assert find_redis_url() == first_url
