"""Every example spec in ``deploy/examples/`` that uses the shipped model
learns: run as written (all at once on one LocalCluster, each through
``CloraClient.submit``), its held-out greedy accuracy rises. An HTTP reward
is served by the shipped example server (``services/reward/example_http.py``)
on a free local port; the spec's URL is pointed there and allow-listed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.cli.experiments import allowlist
from services.cli.local import DEMO_ENV, LocalCluster
from services.reward.example_http import make_server
from services.scheduler.spec import load_spec_file
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR, SchedulerConfig

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
RUN_TIMEOUT_S = 400.0
MIN_GAIN = 0.15  # held-out accuracy points gained, at least (the shipped runs gain 0.4 to 0.6)


def example_specs() -> list:
    specs = [load_spec_file(path) for path in sorted(EXAMPLES.glob("*.yaml"))]
    assert specs, f"no example specs in {EXAMPLES}"
    return specs


@pytest.fixture
def example_reward_url():
    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, name="example-reward", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def test_every_example_spec_on_the_shipped_model_learns(tmp_path, example_reward_url, capsys):
    from urllib.parse import urlsplit

    import msgspec

    specs = []
    shipped_rank = SchedulerConfig().lora_rank
    for spec in example_specs():
        if spec.lora_rank > shipped_rank:
            continue  # documentation for GPU deployments (a larger model and LoRA shape), not the shipped model
        if spec.reward.type == "http":
            path = urlsplit(spec.reward.url).path
            spec = msgspec.structs.replace(spec, reward=msgspec.structs.replace(spec.reward,
                                                                                url=example_reward_url + path))
        specs.append(spec)
    assert len(specs) >= 3, [s.experiment_id for s in specs]
    env = {**DEMO_ENV, "CLORA_HTTP_ALLOWLIST": example_reward_url + "/", "CLORA_MODEL_DIR": DEFAULT_MODEL_DIR,
           "CLORA_DATASETS_DIR": str(EXAMPLES / "data")}
    with LocalCluster(tmp_path / "cluster", env=env) as cluster:
        cluster.wait_ready()
        # the operator's command; the reward service also has it from its configuration
        assert allowlist(["add", example_reward_url + "/", "--redis-url", cluster.url,
                          "--stream-prefix", cluster.stream_prefix]) == 0
        with CloraClient.connect(cluster.url, cluster.stream_prefix) as client:
            ids = [client.submit(spec) for spec in specs]
            records = [client.wait(experiment_id, RUN_TIMEOUT_S) for experiment_id in ids]
        cluster.check_alive()
    with capsys.disabled():
        for spec, record in zip(specs, records, strict=True):
            print(f"\n{spec.experiment_id}: {record.status}, {record.step} steps, held-out "
                  f"{record.start_accuracy} -> {record.final_accuracy}, {record.errors} failed groups")
    for record in records:
        assert record.status == "finished", record
        assert record.errors == 0, record
        assert record.final_accuracy >= record.start_accuracy + MIN_GAIN, record
