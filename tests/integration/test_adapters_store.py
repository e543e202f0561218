"""The adapter store's retention on a real directory: ``prune`` keeps the
newest versions and the ones asked for, and only ever removes whole versions;
a stored version is a PEFT directory that ``shared.peft_files`` reads back."""

from __future__ import annotations

import pytest
import torch

from shared.adapters import DIGEST_FILE, AdapterStore
from shared.engine import LoraSignature

SIGNATURE = LoraSignature(rank=2, alpha=4.0)


def write(store, tenant: str, version: int) -> None:
    tensors = {"base_model.model.x.lora_A.weight": torch.full((2, 4), float(version))}
    store.write_version(tenant, version, tensors, SIGNATURE, "base")


def test_prune_keeps_the_newest_and_the_protected_versions(tmp_path):
    store = AdapterStore(tmp_path)
    for version in range(1, 8):
        write(store, "exp", version)
    write(store, "other", 1)
    (store.path("exp", 2) / DIGEST_FILE).unlink()  # a crashed write below the cut: garbage too
    assert store.prune("exp", keep_newest=3, keep=[1, 4]) == [2, 3]
    assert store.versions("exp") == [1, 4, 5, 6, 7]
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["v1", "v4", "v5", "v6", "v7"]
    assert store.versions("other") == [1]  # another tenant's versions are never touched
    # What remains is intact.
    for version in store.versions("exp"):
        stored = store.load_tensors(store.path("exp", version))["base_model.model.x.lora_A.weight"]
        assert torch.equal(stored, torch.full((2, 4), float(version)))
    assert store.prune("exp", keep_newest=3, keep=[1, 4]) == []  # idempotent


def test_prune_never_removes_the_newest_version(tmp_path):
    store = AdapterStore(tmp_path)
    for version in (1, 2):
        write(store, "exp", version)
    assert store.prune("exp", keep_newest=0) == [1]
    assert store.latest_version("exp") == 2 and store.versions("exp") == [2]
    assert store.prune("never-written", keep_newest=1) == []


def test_a_stored_version_reads_back_as_a_peft_directory(tmp_path):
    from shared.peft_files import lora_scaling, read_peft_dir

    store = AdapterStore(tmp_path)
    write(store, "exp", 1)
    tensors, config = read_peft_dir(store.path("exp", 1))
    assert torch.equal(tensors["base_model.model.x.lora_A.weight"], torch.full((2, 4), 1.0))
    assert lora_scaling(config, SIGNATURE, "v1") == (2.0, 2)
    assert config["base_model_name_or_path"] == "base"


def test_unreadable_peft_directories_say_why(tmp_path):
    from shared.peft_files import CONFIG_FILE, WEIGHTS_FILE, PeftFormatError, read_peft_dir

    with pytest.raises(PeftFormatError, match="does not exist"):
        read_peft_dir(tmp_path / "missing")
    (tmp_path / CONFIG_FILE).write_text("[1, 2]")
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(PeftFormatError, match="JSON object"):
        read_peft_dir(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(PeftFormatError, match="not a valid safetensors file"):
        read_peft_dir(tmp_path)
