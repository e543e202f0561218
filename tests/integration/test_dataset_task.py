"""A dataset task on the shipped tiny model, as separate processes on one
embedded Redis: the CPU twin of the reference spec
(``deploy/examples/gsm8k-tiny.yaml``, a GSM8K-format JSONL file with a
seeded held-out split) learns, and its held-out accuracy is measured on
exactly that split, never trained on. Hostile dataset paths are refused: in
the spec (at the client and, sent past it, at the scheduler) and on disk (a
symlink out of the datasets directory fails its experiment with the reason)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import pytest

from services.cli.local import DEMO_ENV, LocalCluster
from services.scheduler.spec import load_spec_file
from shared import messages
from shared.client import CloraClient, SpecRefused
from shared.datasets import read_rows, row_prompt, split_dataset
from shared.messages import Completion, DatasetSource, ExperimentSubmit, decode

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TWIN_SPEC = ROOT / "deploy" / "examples" / "gsm8k-tiny.yaml"
EXAMPLE_DATA = ROOT / "deploy" / "examples" / "data"
RUN_TIMEOUT_S = 400.0
MIN_GAIN = 0.15  # held-out accuracy points gained, at least


def completions_of(client: CloraClient, experiment_id: str) -> list[Completion]:
    entries = client.redis.xrange(client.keys.stream("completions"))
    found = [decode(fields[b"msg"], "completions") for _, fields in entries]
    return [c for c in found if isinstance(c, Completion) and c.experiment_id == experiment_id]


def with_dataset(spec, experiment_id: str, **source):
    dataset = msgspec.structs.replace(spec.task.dataset, **source)
    return msgspec.structs.replace(spec, experiment_id=experiment_id, steps=1,
                                   task=msgspec.structs.replace(spec.task, dataset=dataset))


def test_the_tiny_twin_of_the_reference_spec_learns_on_its_held_out_split(tmp_path, capsys):
    datasets_dir, private = tmp_path / "datasets", tmp_path / "private"
    datasets_dir.mkdir()
    private.mkdir()
    twin = load_spec_file(TWIN_SPEC)
    shutil.copy(EXAMPLE_DATA / twin.task.dataset.path, datasets_dir / twin.task.dataset.path)
    shutil.copy(EXAMPLE_DATA / twin.task.dataset.path, private / "secret.jsonl")
    os.symlink(private / "secret.jsonl", datasets_dir / "escape.jsonl")
    env = {**DEMO_ENV, "CLORA_DATASETS_DIR": str(datasets_dir)}
    with LocalCluster(tmp_path / "cluster", env=env) as cluster:
        cluster.wait_ready()
        with CloraClient.connect(cluster.url, cluster.stream_prefix) as client:
            client.submit(twin)
            client.submit(with_dataset(twin, "escape", path="escape.jsonl"))
            with pytest.raises(SpecRefused, match="task.dataset.path: '/etc/passwd' is absolute"):
                client.submit(with_dataset(twin, "absolute", path="/etc/passwd"))
            sneaked = with_dataset(twin, "sneaked", path="../private/secret.jsonl")  # past the client's check
            client.redis.xadd(client.keys.stream("experiments"),
                              {"msg": messages.encode(ExperimentSubmit(spec=sneaked))})
            escaped = client.wait("escape", RUN_TIMEOUT_S)
            sneaked_record = client.wait("sneaked", RUN_TIMEOUT_S)
            record = client.wait(twin.experiment_id, RUN_TIMEOUT_S)
            completions = completions_of(client, twin.experiment_id)
        cluster.check_alive()
    with capsys.disabled():
        print(f"\n{twin.experiment_id}: {record.status}, {record.step} steps, held-out accuracy "
              f"{record.start_accuracy} -> {record.final_accuracy}")

    assert escaped.status == "failed" and "leads out of the datasets directory" in escaped.error, escaped
    assert sneaked_record.status == "invalid" and "task.dataset.path: '../private/secret.jsonl' has a '..'" \
        in sneaked_record.error, sneaked_record

    assert record.status == "finished" and record.errors == 0, record
    assert record.final_accuracy >= record.start_accuracy + MIN_GAIN, record
    source: DatasetSource = twin.task.dataset
    rows = read_rows(EXAMPLE_DATA, source)
    split = split_dataset([row_prompt(row, source) for row in rows], source.held_out, source.seed)
    measured = {r.prompt.prompt_id for c in completions if c.purpose == "eval" for r in c.results}
    trained = {r.prompt.prompt_id for c in completions if c.purpose == "train" for r in c.results}
    assert measured == {p.prompt_id for p in split.held_out[:twin.eval_size]}
    assert trained and trained <= {p.prompt_id for p in split.train}
