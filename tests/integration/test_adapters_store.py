"""The adapter store's retention on a real directory: ``prune`` keeps the
newest versions and the ones asked for, and only ever removes whole versions."""

from __future__ import annotations

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
