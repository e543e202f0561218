"""Does the shipped tiny model leave RL real headroom? A minimal GRPO check.

One tenant (one fresh rank-8 LoRA on all linear layers) per task family,
trained alone with GRPO: ``prompts`` train prompts x ``group`` samples per
step at temperature 1, reward = the family verifier, advantage = reward minus
the group mean (groups with identical rewards skipped), token-level policy
gradient, Adam. Prints held-out greedy accuracy before, during and after,
and writes JSON.

    python load_tests/grpo_headroom.py --steps 25 --lr 5e-3 --json /tmp/grpo_headroom.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.models.build_tiny import EVAL_SEED, MAX_NEW_TOKENS, greedy_accuracy
from shared.tasks import PRETRAIN_FAMILIES, TaskFamily, get_family

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "shared" / "models" / "clora-tiny"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(model_dir: Path, rank: int):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(base, config)


@torch.no_grad()
def sample_group(model, tokenizer, prompt_texts: list[str], group: int, temperature: float):
    """Token ids ``sequences_R_T`` (prompt + completion, R = prompts x group),
    the prompt width, and the completion texts."""
    model.eval()
    batch = tokenizer(prompt_texts, return_tensors="pt", padding=True)
    sequences_R_T = model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
        num_return_sequences=group,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    prompt_width = batch["input_ids"].shape[1]
    texts = tokenizer.batch_decode(sequences_R_T[:, prompt_width:], skip_special_tokens=True)
    return sequences_R_T, prompt_width, texts


def completion_mask(completion_ids_R_C: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on completion tokens up to and including the first eos."""
    is_eos_R_C = (completion_ids_R_C == eos_id).long()
    eos_before_R_C = is_eos_R_C.cumsum(dim=1) - is_eos_R_C
    return (eos_before_R_C == 0).float()


def policy_gradient_loss(model, tokenizer, sequences_R_T, prompt_width: int, advantages_R: torch.Tensor):
    model.train()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_mask_R_P = (sequences_R_T[:, :prompt_width] != pad_id).float()
    mask_R_C = completion_mask(sequences_R_T[:, prompt_width:], eos_id)
    attention_mask_R_T = torch.cat([prompt_mask_R_P, mask_R_C], dim=1).long()
    position_ids_R_T = (attention_mask_R_T.cumsum(dim=1) - 1).clamp(min=0)
    logits_R_T_V = model(input_ids=sequences_R_T, attention_mask=attention_mask_R_T,
                         position_ids=position_ids_R_T).logits
    # Logits at position t predict token t+1: the completion starts at prompt_width.
    logprobs_R_C_V = torch.log_softmax(logits_R_T_V[:, prompt_width - 1 : -1].float(), dim=-1)
    token_logprobs_R_C = logprobs_R_C_V.gather(-1, sequences_R_T[:, prompt_width:, None]).squeeze(-1)
    return -(advantages_R[:, None] * token_logprobs_R_C * mask_R_C).sum() / mask_R_C.sum().clamp(min=1)


def grpo_step(model, tokenizer, optimizer, family: TaskFamily, step: int, args) -> dict:
    prompts = family.generate(seed=10_000 + step, n=args.prompts, split="train")
    sequences_R_T, prompt_width, texts = sample_group(model, tokenizer, [p.text for p in prompts], args.group,
                                                      args.temperature)
    answers_R = [p.answer for p in prompts for _ in range(args.group)]
    rewards_R = [float(family.verify(t, a or "")) for t, a in zip(texts, answers_R, strict=True)]
    rewards_G_N = torch.tensor(rewards_R).view(-1, args.group)
    advantages_G_N = rewards_G_N - rewards_G_N.mean(dim=1, keepdim=True)
    keep_G = rewards_G_N.std(dim=1) > 0
    if keep_G.any():
        keep_R = keep_G.repeat_interleave(args.group)
        loss = policy_gradient_loss(model, tokenizer, sequences_R_T[keep_R], prompt_width,
                                    advantages_G_N.view(-1)[keep_R])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
        optimizer.step()
    return {"reward": rewards_G_N.mean().item(), "groups_used": int(keep_G.sum())}


def run_tenant(family_name: str, args) -> dict:
    torch.manual_seed(args.seed)
    family = get_family(family_name)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = lora_model(args.model, args.rank)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99))
    eval_prompts = family.generate(EVAL_SEED, args.eval_size, split="eval")
    model.eval()
    curve = [{"step": 0, "greedy_accuracy": greedy_accuracy(model, tokenizer, family, eval_prompts)}]
    rewards, step_s = [], []
    for step in range(1, args.steps + 1):
        started = time.monotonic()
        stats = grpo_step(model, tokenizer, optimizer, family, step, args)
        step_s.append(time.monotonic() - started)
        rewards.append(stats["reward"])
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            curve.append({"step": step, "greedy_accuracy": greedy_accuracy(model, tokenizer, family, eval_prompts)})
            print(f"  {family_name:8s} step {step:3d} reward {stats['reward']:.2f} "
                  f"greedy {curve[-1]['greedy_accuracy']:.1%}", flush=True)
    return {
        "family": family_name,
        "start_accuracy": curve[0]["greedy_accuracy"],
        "final_accuracy": curve[-1]["greedy_accuracy"],
        "best_accuracy": max(c["greedy_accuracy"] for c in curve),
        "curve": curve,
        "rewards": rewards,
        "mean_step_s": sum(step_s) / len(step_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--families", nargs="+", default=list(PRETRAIN_FAMILIES))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("grpo_headroom.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run_tenant(name, args) for name in args.families]
    print(f"\n{'family':8s} {'start':>7s} {'final':>7s} {'gain':>7s} {'s/step':>7s}")
    for r in results:
        gain = r["final_accuracy"] - r["start_accuracy"]
        print(f"{r['family']:8s} {r['start_accuracy']:7.1%} {r['final_accuracy']:7.1%} {gain:+7.1%} "
              f"{r['mean_step_s']:7.2f}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"settings": settings, "tenants": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
