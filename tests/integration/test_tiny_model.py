"""The shipped tiny model: loads offline, tokenizes, and leaves RL headroom.

Greedy accuracy is recomputed here on the held-out prompts behind the
committed eval.json; the full rebuild check is
``load_tests/rebuild_tiny_model.py`` (minutes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.models.build_tiny import EVAL_PROMPTS_PER_FAMILY, EVAL_SEED, greedy_accuracy
from shared.tasks import PRETRAIN_FAMILIES, get_family

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "clora-tiny"
# Same prompts as eval.json; greedy decoding differs only by float rounding.
ACCURACY_TOLERANCE = 0.03
MAX_MODEL_DIR_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def committed_eval() -> dict:
    return json.loads((MODEL_DIR / "eval.json").read_text())


def test_loads_offline_with_no_environment():
    """A fresh interpreter with HF_HUB_OFFLINE=1 and nothing else in its environment."""
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(MODEL_DIR)!r});"
        f"t = AutoTokenizer.from_pretrained({str(MODEL_DIR)!r});"
        "print(type(m).__name__, t.padding_side, t.eos_token, t.pad_token)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Qwen3ForCausalLM", "left", "</s>", "<pad>"]


def test_model_dir_is_complete_and_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "eval.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= MAX_MODEL_DIR_BYTES


def test_tokenizer_round_trips_prompts(tiny):
    _, tokenizer = tiny
    for name in PRETRAIN_FAMILIES:
        prompt = get_family(name).generate(0, 1, "eval")[0]
        ids = tokenizer.encode(prompt.text + prompt.answer, add_special_tokens=False)
        assert len(ids) == len(prompt.text + prompt.answer)  # one token per character
        assert tokenizer.decode(ids) == prompt.text + prompt.answer
    assert tokenizer.unk_token_id not in tokenizer.encode("123+45=", add_special_tokens=False)


def test_left_padding_and_eos_stop(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["1+2=", "sort:dcba="], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    output = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    assert (new_tokens == tokenizer.eos_token_id).any(dim=1).all()  # answers end with eos


@pytest.mark.parametrize("name", PRETRAIN_FAMILIES)
def test_held_out_greedy_accuracy_leaves_headroom(tiny, committed_eval, name):
    model, tokenizer = tiny
    family = get_family(name)
    prompts = family.generate(EVAL_SEED, EVAL_PROMPTS_PER_FAMILY, split="eval")
    accuracy = greedy_accuracy(model, tokenizer, family, prompts)
    assert 0.10 <= accuracy <= 0.70
    committed = committed_eval["families"][name]["greedy_accuracy"]
    assert abs(accuracy - committed) <= ACCURACY_TOLERANCE


def test_model_card_states_the_committed_numbers(committed_eval):
    card = (MODEL_DIR / "README.md").read_text()
    assert "python -m shared.models.build_tiny --out shared/models/clora-tiny" in card
    for name, numbers in committed_eval["families"].items():
        assert f"| `{name}` | {numbers['greedy_accuracy']:.1%} |" in card


def test_qwen3_4b_shape_without_allocating():
    from shared.models.qwen3_4b import build_random_qwen3_4b, qwen3_4b_config

    config = qwen3_4b_config()
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (2560, 36, 9728)
    model = build_random_qwen3_4b("meta", torch.bfloat16)
    num_params = sum(p.numel() for p in model.parameters())
    assert 4.0e9 < num_params < 4.05e9  # Qwen3-4B: 4.0B with tied embeddings
    assert torch.get_default_dtype() == torch.float32
