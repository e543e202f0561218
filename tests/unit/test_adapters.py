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


# ---------------------------------------------------------------- PEFT format (shared.peft_files)


def test_the_store_writes_the_peft_file_names():
    from shared import adapters, peft_files

    assert (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE) == ("adapter_config.json", "adapter_model.safetensors")
    assert adapters.CONFIG_FILE is peft_files.CONFIG_FILE and adapters.WEIGHTS_FILE is peft_files.WEIGHTS_FILE


def test_lora_tensor_names_parse_to_layer_module_and_half():
    from shared.peft_files import parse_lora_key, saved_tensor_name

    saved = "base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight"
    assert parse_lora_key(saved) == (3, "gate_proj", "B")
    assert parse_lora_key(saved.replace("lora_B", "lora_B.default")) == (3, "gate_proj", "B")
    assert parse_lora_key("base_model.model.lm_head.weight") is None
    parameter = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert saved_tensor_name(parameter) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_config_we_write_gives_the_signatures_scaling():
    from shared.engine import LoraSignature
    from shared.peft_files import lora_scaling, peft_config_dict

    signature = LoraSignature(rank=8, alpha=16.0)
    assert lora_scaling(peft_config_dict(signature, "base"), signature, "v1") == (2.0, 8)
    rslora = {**peft_config_dict(signature, "base"), "use_rslora": True}
    assert lora_scaling(rslora, signature, "v1")[0] == pytest.approx(16.0 / 8 ** 0.5)


@pytest.mark.parametrize(("change", "reason"), [
    ({"r": 0}, "integer r >= 1"),
    ({"lora_alpha": "16"}, "numeric lora_alpha"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
])
def test_configs_a_deployment_cannot_serve_are_refused_with_the_reason(change, reason):
    from shared.engine import LoraSignature
    from shared.peft_files import PeftFormatError, lora_scaling, peft_config_dict

    signature = LoraSignature(rank=8, alpha=16.0)
    with pytest.raises(PeftFormatError, match=reason):
        lora_scaling({**peft_config_dict(signature, "base"), **change}, signature, "v1")


# ---------------------------------------------------------------- each tenant's own LoRA shape


def test_a_tenant_shape_defaults_to_the_deployments_alpha_and_targets_in_its_order():
    from shared.engine import LoraSignature

    deployment = LoraSignature(rank=8, alpha=16.0)
    assert deployment.tenant_shape(8, None, None) == deployment
    shape = deployment.tenant_shape(2, 4, ["v_proj", "q_proj"])
    assert (shape.rank, shape.alpha, shape.target_modules, shape.scaling) == (2, 4.0, ("q_proj", "v_proj"), 2.0)
    assert deployment.shape_problems(shape) == []


@pytest.mark.parametrize("rank, alpha, targets, problem", [
    (16, None, None, "LoRA rank 16 is not between 1 and the deployment's maximum 8"),
    (0, None, None, "LoRA rank 0 is not between 1"),
    (4, float("nan"), None, "lora_alpha nan is not a finite number > 0"),
    (4, -1.0, None, "lora_alpha -1.0 is not a finite number > 0"),
    (4, None, ["q_proj", "lm_head"], "target modules ['q_proj', 'lm_head'] are not a non-empty subset"),
    (4, None, [], "target modules [] are not a non-empty subset"),
])
def test_a_shape_the_deployment_cannot_hold_is_named(rank, alpha, targets, problem):
    from shared.engine import LoraSignature

    deployment = LoraSignature(rank=8, alpha=16.0)
    (found,) = deployment.shape_problems(deployment.tenant_shape(rank, alpha, targets))
    assert found.startswith(problem), found


def test_the_peft_config_of_a_shape_reads_back_as_that_shape(tmp_path):
    import torch

    from shared.engine import LoraSignature
    from shared.peft_files import PeftFormatError, peft_config_dict, shape_from_peft_config

    shape = LoraSignature(rank=2, alpha=6.0, target_modules=("q_proj", "down_proj"))
    config = peft_config_dict(shape, "base")
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 6.0, ["down_proj", "q_proj"])
    read = shape_from_peft_config(config, "v1")
    assert (read.rank, read.alpha, set(read.target_modules)) == (2, 6.0, {"q_proj", "down_proj"})
    with pytest.raises(PeftFormatError, match="target_modules as a non-empty list"):
        shape_from_peft_config({**config, "target_modules": "q_proj|v_proj"}, "v1")
    store = AdapterStore(tmp_path)
    path, _ = store.write_version("exp", 1, {"base_model.model.x.lora_A.weight": torch.ones(2, 4)}, shape, "base")
    assert store.load_shape(path).rank == 2 and store.load_shape(path).alpha == 6.0
