"""Model builders: the shipped tiny model and a Qwen3-4B-shaped config for GPU runs."""
