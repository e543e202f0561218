"""A Qwen3-4B-shaped model with random weights, for GPU throughput runs.

The real weights cannot be downloaded here; throughput depends only on the
shapes, so a model with Qwen3-4B's dimensions (from its published
``config.json``) and random weights measures the same decode cost.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

# Qwen/Qwen3-4B config.json.
QWEN3_4B_BOS_TOKEN_ID = 151643
QWEN3_4B_EOS_TOKEN_ID = 151645


def qwen3_4b_config() -> Qwen3Config:
    """Qwen3-4B's dimensions: 36 layers, hidden 2560, 32 query / 8 KV heads of 128."""
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=QWEN3_4B_BOS_TOKEN_ID,
        eos_token_id=QWEN3_4B_EOS_TOKEN_ID,
        use_cache=True,
    )


def build_random_qwen3_4b(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16) -> Qwen3ForCausalLM:
    """Qwen3-4B with random weights, built directly on ``device`` in ``dtype``
    (about 8 GB in bf16), in eval mode."""
    config = qwen3_4b_config()
    previous_dtype = torch.get_default_dtype()
    # Allocate in the target dtype on the target device: no fp32 copy on the host.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.eval()
