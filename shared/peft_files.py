"""PEFT's adapter format on disk, in one place: the file names, the
``adapter_config.json`` we write, the tensor names, reading a directory
(tensors + config, each checked) and writing one.

A PEFT adapter directory holds::

    adapter_config.json        a LoraConfig (r, lora_alpha, target_modules...)
    adapter_model.safetensors  tensors named like PEFT saves them:
        base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_A.weight  [r, in]
        base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_B.weight  [out, r]

so ``peft.PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load it
directly. The adapter store (``shared.adapters``) adds versions, digests and
durability on top; the torch engine lays the tensors out for its slots.
Errors are ``PeftFormatError`` with the reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.engine import LoraSignature

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT names: ...layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>[.<adapter name>].weight
LORA_KEY_PATTERN = re.compile(
    r"layers\.(\d+)\.(?:self_attn|mlp)\.([A-Za-z_]+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
# The adapter name PEFT gives a model's parameters and leaves out of saved names.
DEFAULT_ADAPTER_NAME = "default"


class PeftFormatError(ValueError):
    """Not a PEFT adapter we can serve; the message says why."""


def peft_config_dict(signature: LoraSignature, base_model: str) -> dict:
    """An ``adapter_config.json`` that PEFT's ``PeftModel.from_pretrained`` and
    vLLM accept for an adapter of ``signature`` (its own rank, alpha and
    target modules, not the deployment's) on ``base_model``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": signature.rank,
        "lora_alpha": signature.alpha,
        "target_modules": sorted(signature.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def shape_from_peft_config(config: dict, where: Path | str) -> LoraSignature:
    """The LoRA shape (r, lora_alpha, target_modules) an ``adapter_config.json``
    describes; ``PeftFormatError`` when it lacks one (target modules given as
    a list: a regex string cannot be laid out in slots)."""
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise PeftFormatError(f"{where}: {CONFIG_FILE} needs an integer r >= 1 and a numeric lora_alpha")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise PeftFormatError(f"{where}: {CONFIG_FILE} needs target_modules as a non-empty list of module names")
    return LoraSignature(rank=rank, alpha=float(alpha), target_modules=tuple(targets))


def saved_tensor_name(parameter_name: str, adapter_name: str = DEFAULT_ADAPTER_NAME) -> str:
    """A PEFT model's parameter name -> the name PEFT saves it under
    (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``)."""
    return parameter_name.replace(f".{adapter_name}.", ".")


def parse_lora_key(name: str) -> tuple[int, str, str] | None:
    """``(layer index, module, "A" or "B")`` of a PEFT LoRA tensor name, None
    for any other name."""
    match = LORA_KEY_PATTERN.search(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2), match.group(3)


def write_peft_dir(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> list[Path]:
    """Write both files of an adapter into the existing ``directory``;
    returns their paths (the caller makes them durable)."""
    cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    save_file(cpu_tensors, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return [weights_path, config_path]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory, on CPU."""
    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(weights_path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise PeftFormatError(f"{weights_path} is not a valid safetensors file: {exc}") from exc


def read_config(directory: Path) -> dict:
    config_path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise PeftFormatError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_path} must hold a JSON object")
    return config


def read_peft_dir(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config of a PEFT adapter directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PeftFormatError(f"adapter directory {directory} does not exist")
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise PeftFormatError(f"{directory} is not a PEFT adapter: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_config(directory)
    return read_weights(directory), config


# Options of a LoraConfig that change the math our slots do: refused when set.
_UNSUPPORTED_OPTIONS = {
    "use_dora": lambda value: bool(value),
    "bias": lambda value: value not in (None, "none"),
    "modules_to_save": lambda value: bool(value),
    "rank_pattern": lambda value: bool(value),
    "alpha_pattern": lambda value: bool(value),
}


def lora_scaling(config: dict, signature: LoraSignature, where: Path | str) -> tuple[float, int]:
    """(scaling, rank) of an ``adapter_config.json``, refusing what a
    deployment of ``signature`` cannot serve; ``where`` names it in errors."""
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise PeftFormatError(f"{where}: {CONFIG_FILE} needs an integer r >= 1 and a numeric lora_alpha")
    bad = [name for name, used in _UNSUPPORTED_OPTIONS.items() if used(config.get(name))]
    if bad:
        raise PeftFormatError(f"{where}: unsupported adapter options {bad}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        outside = sorted(set(targets) - set(signature.target_modules))
        if outside:
            raise PeftFormatError(
                f"{where}: target modules {outside} are not in the deployment's "
                f"signature {list(signature.target_modules)}"
            )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return float(scaling), rank


__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "LORA_KEY_PATTERN", "DEFAULT_ADAPTER_NAME", "PeftFormatError",
    "peft_config_dict", "shape_from_peft_config", "saved_tensor_name", "parse_lora_key", "write_peft_dir",
    "read_weights", "read_config", "read_peft_dir", "lora_scaling",
]
