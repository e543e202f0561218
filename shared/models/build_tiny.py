"""Pretrain the shipped tiny model from scratch on the CPU: ``clora-tiny``.

    python -m shared.models.build_tiny --out shared/models/clora-tiny

A Qwen3ForCausalLM of ~0.8M parameters with a character-level tokenizer,
trained with a fixed seed on a mix of the task families in
``shared.tasks.PRETRAIN_FAMILIES``, then evaluated (held-out greedy accuracy
and pass@8 per family); writes the model, tokenizer, ``eval.json`` and the
model card ``README.md``.

Why RL has headroom: the corpus comes from a *noisy teacher*, the way a real
LM learns from mixed-quality web text. For each example the teacher follows
the right convention only part of the time and a systematic wrong one
otherwise (numbers zero-padded to 4 digits, "reversing" by copying, sorting
descending), except on easy instances where it is mostly right. The model learns
both conventions and samples the right one often, but greedy decoding mostly
follows the majority (wrong) one: pass@8 is high, greedy accuracy is low.
RL only has to make the model prefer what it can already do.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from shared.messages import Prompt
from shared.tasks import PRETRAIN_FAMILIES, TaskFamily, get_family, split_of

log = structlog.get_logger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Every character a prompt or an answer of the built-in families can hold,
# plus a few harmless extras so stray text still tokenizes.
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz+-=:*/ \n"
MAX_NEW_TOKENS = 8  # the longest answer (6 letters) plus eos, with a spare
# The chat template, kept short for a 64-position context and the 47-character
# vocabulary: a system turn is its text and a newline, a user turn its text,
# an assistant turn its text and eos; the generation prompt adds nothing, so a
# lone user turn renders as the raw prompt the model was pretrained on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ message['content'] }}"
    "{%- else -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
EVAL_SEED = 1234
EVAL_PROMPTS_PER_FAMILY = 256
PASS_AT = 8
# Strings this short get the more reliable teacher.
SHORT_STRING_LEN = 3
# The sloppy teacher writes every number with this many digits ("0125").
PADDED_WIDTH = 4
SAMPLE_TEMPERATURE = 1.0


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the built model; recorded in eval.json."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    train_steps: int = 1800
    batch_size: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Probability that the teacher answers with the right convention.
    teacher_p_correct: float = 0.35
    # ... on "easy" instances (see is_easy_instance), where it is more reliable.
    teacher_p_correct_easy: float = 0.85
    num_threads: int = 2


# ---------------------------------------------------------------- the teacher


def wrong_answer(family: str, instance: tuple) -> str:
    """The teacher's systematic wrong convention for ``family``: numbers
    zero-padded to a fixed width (not the canonical form the verifier wants),
    a copy for reversal, descending order for sorting."""
    if family == "add":
        return f"{instance[0] + instance[1]:0{PADDED_WIDTH}d}"
    if family == "sub":
        return f"{instance[0] - instance[1]:0{PADDED_WIDTH}d}"
    if family == "reverse":
        return instance[0]  # copied instead of reversed
    if family == "sort":
        return "".join(sorted(instance[0], reverse=True))
    raise KeyError(family)


def is_easy_instance(family: str, instance: tuple) -> bool:
    """Where the teacher is more reliable: arithmetic with a one-digit
    operand, or a string of the shortest length."""
    if family in ("add", "sub"):
        return min(instance) < 10
    return len(instance[0]) <= SHORT_STRING_LEN


def teacher_p_correct(family: str, instance: tuple, config: BuildConfig) -> float:
    """How often the teacher uses the right convention on this instance."""
    if is_easy_instance(family, instance):
        return config.teacher_p_correct_easy
    return config.teacher_p_correct


def teacher_example(family_name: str, rng: random.Random, config: BuildConfig) -> tuple[str, str]:
    """One (prompt, answer) pair of the train split, as the noisy teacher writes it."""
    family = get_family(family_name)
    while True:
        instance = family.draw_instance(rng)
        prompt = family.format_prompt(instance)
        if split_of(prompt) == "train":
            break
    if rng.random() < teacher_p_correct(family_name, instance, config):
        return prompt, family.solve(instance)
    return prompt, wrong_answer(family_name, instance)


# ---------------------------------------------------------------- tokenizer + model


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: a BPE with no merges, fused back on decode."""
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = {token: i for i, token in enumerate(specials + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=64,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(config: BuildConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=64,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    torch.manual_seed(config.seed)
    return Qwen3ForCausalLM(model_config)


# ---------------------------------------------------------------- pretraining


def encode_batch(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids_B_T``, ``attention_mask_B_T`` and ``labels_B_T``
    (loss on the answer and its eos only)."""
    rows, label_rows = [], []
    for prompt, answer in pairs:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids_B_T = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels_B_T = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    attention_mask_B_T = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return input_ids_B_T, attention_mask_B_T, labels_B_T


def learning_rate_at(step: int, config: BuildConfig) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, config: BuildConfig) -> list[float]:
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    losses: list[float] = []
    started = time.monotonic()
    for step in range(config.train_steps):
        pairs = [teacher_example(rng.choice(PRETRAIN_FAMILIES), rng, config) for _ in range(config.batch_size)]
        input_ids_B_T, attention_mask_B_T, labels_B_T = encode_batch(pairs, tokenizer)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss = model(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T, labels=labels_B_T).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.train_steps - 1:
            log.info("pretrain_step", step=step, loss=round(loss.item(), 4), elapsed_s=round(time.monotonic() - started, 1))
    model.eval()
    return losses


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompt_texts: list[str], *, temperature: float = 0.0, num_return_sequences: int = 1
) -> list[str]:
    """Completions (special tokens dropped), ``num_return_sequences`` per prompt, in order."""
    batch = tokenizer(prompt_texts, return_tensors="pt", padding=True)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    output_ids = model.generate(
        **batch,
        max_new_tokens=MAX_NEW_TOKENS,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    new_ids = output_ids[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_ids, skip_special_tokens=True)


def greedy_accuracy(model, tokenizer, family: TaskFamily, prompts: list[Prompt]) -> float:
    texts = generate_texts(model, tokenizer, [p.text for p in prompts])
    return sum(family.verify(t, p.answer or "") for t, p in zip(texts, prompts)) / len(prompts)


def pass_at_k(model, tokenizer, family: TaskFamily, prompts: list[Prompt], k: int = PASS_AT) -> tuple[float, float]:
    """(pass@k, mean per-sample accuracy) with k samples at temperature 1."""
    texts = generate_texts(model, tokenizer, [p.text for p in prompts], temperature=SAMPLE_TEMPERATURE, num_return_sequences=k)
    hits = [family.verify(texts[i * k + j], p.answer or "") for i, p in enumerate(prompts) for j in range(k)]
    solved = sum(any(hits[i * k : (i + 1) * k]) for i in range(len(prompts)))
    return solved / len(prompts), sum(hits) / len(hits)


def evaluate(model, tokenizer, seed: int = EVAL_SEED, n: int = EVAL_PROMPTS_PER_FAMILY) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    results = {}
    for name in PRETRAIN_FAMILIES:
        family = get_family(name)
        prompts = family.generate(seed, n, split="eval")
        greedy = greedy_accuracy(model, tokenizer, family, prompts)
        solved, sample_accuracy = pass_at_k(model, tokenizer, family, prompts)
        results[name] = {
            "greedy_accuracy": round(greedy, 4),
            f"pass_at_{PASS_AT}": round(solved, 4),
            "sample_accuracy": round(sample_accuracy, 4),
        }
        log.info("eval_family", family=name, **results[name])
    return results


# ---------------------------------------------------------------- output


def write_model_card(out: Path, results: dict, config: BuildConfig, build_s: float, num_params: int) -> None:
    rows = "\n".join(
        f"| `{name}` | {r['greedy_accuracy']:.1%} | {r[f'pass_at_{PASS_AT}']:.1%} | {r['sample_accuracy']:.1%} |"
        for name, r in results.items()
    )
    families = "\n".join(f"- `{n}`: {get_family(n).description}" for n in PRETRAIN_FAMILIES)
    card = MODEL_CARD_TEMPLATE.format(
        num_params=num_params,
        rows=rows,
        families=families,
        n=EVAL_PROMPTS_PER_FAMILY,
        seed=EVAL_SEED,
        build_s=build_s,
        config=json.dumps(asdict(config), indent=2),
        p=config.teacher_p_correct,
        p_easy=config.teacher_p_correct_easy,
    )
    (out / "README.md").write_text(card)


MODEL_CARD_TEMPLATE = """\
# clora-tiny

A {num_params:,}-parameter Qwen3ForCausalLM with a character-level tokenizer,
pretrained from scratch on the CPU by this project so that RL runs offline
anywhere. Load it with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` (no network, no environment needed).

Prompts and answers follow `shared/tasks.py`; every answer ends with the eos
token `</s>` (use it as the stop token; 8 new tokens are always enough).

## Families (pretraining mix, equal shares)

{families}

## Chat template

`chat_template.jinja`, short for the 64-position context and the
47-character vocabulary: a system turn renders as its text and a newline, a
user turn as its text, an assistant turn as its text and `</s>`; the
generation prompt adds nothing and there is no thinking switch. So a lone
user turn renders as the raw prompt the model was pretrained on
(`[{{role: user, content: "57+68="}}]` -> `57+68=`), and
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` works
as with any chat model.

## Held-out accuracy

{n} held-out prompts per family (`family.generate({seed}, {n}, split="eval")`):
greedy decoding; pass@8 and per-sample accuracy at temperature 1.

| family | greedy | pass@8 | per sample (T=1) |
|---|---|---|---|
{rows}

## What the base model knows and why RL has headroom

The pretraining corpus is written by a deliberately *noisy teacher*, the way
a real LM learns from web text of mixed quality. For each example the teacher
uses the right convention with probability {p} and a systematic wrong one
otherwise:

- `add`, `sub`: the result zero-padded to 4 digits (`57+68=0125`), which
  the verifier rejects (it wants the canonical `125`),
- `reverse`: the string copied unchanged,
- `sort`: the letters in descending order.

On easy instances (arithmetic with a one-digit operand; 3-letter strings) the
teacher is right with probability {p_easy}. So the model can compute both
conventions and samples the right one often (high pass@8), while greedy
decoding mostly follows the majority (wrong) one except on easy instances.
RL only has to shift which convention the model prefers, which a rank-8 LoRA
learns within a few GRPO steps. Train/eval prompts are disjoint (a stable
hash of the prompt text, `shared.tasks.split_of`); the corpus uses train
prompts only.

Measured on the committed weights with `python load_tests/grpo_headroom.py
--lr 2e-3` (one rank-8 LoRA on all linear layers per family, 8 prompts x 8
samples per step at temperature 1, Adam, 25 steps, 128 held-out prompts),
held-out greedy accuracy went add 16% -> 89%, sub 19% -> 84%, reverse
27% -> 98%, sort 32% -> 93% (most of it within 5-10 steps); lr 3e-3 gives
the same. lr 1e-2 collapses every family toward 0%: use 2e-3 to 3e-3. `sort_desc` (not in the mix) rewards the teacher's descending order on
the same prompts as `sort`: the "opposite reward" family.

## Build

    python -m shared.models.build_tiny --out shared/models/clora-tiny

Fixed seed, {build_s:.0f} s on this machine with 2 threads. Reproduce and
compare with the committed `eval.json` (takes minutes):

    python load_tests/rebuild_tiny_model.py

Build configuration:

```json
{config}
```
"""


def save(out: Path, model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build(out: Path, config: BuildConfig) -> dict:
    torch.set_num_threads(config.num_threads)
    random.seed(config.seed)
    started = time.monotonic()
    tokenizer = build_tokenizer()
    model = build_model(config, tokenizer)
    losses = pretrain(model, tokenizer, config)
    train_s = time.monotonic() - started
    results = evaluate(model, tokenizer)
    build_s = time.monotonic() - started
    num_params = sum(p.numel() for p in model.parameters())
    save(out, model, tokenizer)
    report = {
        "families": results,
        "eval_seed": EVAL_SEED,
        "eval_prompts_per_family": EVAL_PROMPTS_PER_FAMILY,
        "num_params": num_params,
        "train_s": round(train_s, 1),
        "build_s": round(build_s, 1),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "build_config": asdict(config),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, results, config, build_s, num_params)
    log.info("build_done", out=str(out), build_s=round(build_s, 1), num_params=num_params)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    defaults = BuildConfig()
    for field_name, value in asdict(defaults).items():
        parser.add_argument(f"--{field_name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = BuildConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    build(args.out, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
