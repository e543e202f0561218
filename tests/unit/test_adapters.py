"""Adapter store names: only experiment ids become directory names."""

from __future__ import annotations

import pytest

from shared.adapters import AdapterStore, AdapterStoreError, check_tenant_name


@pytest.mark.parametrize("name", ["a", "exp-1", "my_exp", "0" * 64])
def test_experiment_ids_are_tenant_names(name):
    assert check_tenant_name(name) == name


@pytest.mark.parametrize("name", [
    "", "exp\n", "Exp", "victim:s0", "a/b", "..", ".hidden", "-exp", "a" * 65, "exp.v2", "exp@x", "ex p", "exp\x00",
])
def test_anything_else_is_refused_before_a_path_is_built(name):
    with pytest.raises(AdapterStoreError, match="not an experiment id"):
        check_tenant_name(name)
    with pytest.raises(AdapterStoreError):
        AdapterStore("/nonexistent-root").path(name, 1)


def test_version_zero_has_no_path():
    with pytest.raises(AdapterStoreError, match="base model"):
        AdapterStore("/nonexistent-root").path("exp", 0)
