"""The peer: the throughput benchmark's experiments with TRL's GRPOTrainer + PEFT,
one experiment per fresh Python process, one after another, as a user
without C-LoRA would run them.

Each experiment matches C-LoRA's spec (``experiment_throughput.experiment_specs``):
the shipped tiny model (``shared/models/clora-tiny``) and its tokenizer;
LoRA of the spec's rank, the deployment's alpha and target modules
(``shared.config.LoraConfig`` defaults, as a spec without its own gets),
dropout 0; the same task family prompts (the scheduler's ``PromptSource``:
step s trains on the very prompts C-LoRA's step s does, in order, no
shuffling) and reward (the reward service's ``score_builtin`` with the
family's verifier); the same steps, prompts per step, group size
(``num_generations``), learning rate (constant, no warm-up), Adam betas
(0.9, 0.95) without weight decay, clip epsilon, no KL term (``beta`` 0),
rewards not scaled by their std (``normalize_advantage_std`` False), loss
normalized by the batch's completion tokens (``loss_type="dapo"``, as the
C-LoRA trainer's ``total_tokens``), gradient-norm clip, max new tokens and
temperature; greedy held-out accuracy on the same held-out prompts (the
family's, ``EVAL_SEED``) before and after training, scored by the same
verifier, generated with ``model.generate`` in batches (left padding; the
text up to the first EOS, as the rollout service cuts it).

Times (``run_peer``, the parent):
- ``process_s``: spawn -> exit of the experiment's process (interpreter
  start, imports, model load, both evaluations, training, exit);
- ``warm_s``: from right after the child's imports (``torch``,
  ``transformers``, ``peft``, ``trl``, ``datasets`` and the C-LoRA modules it
  uses) to the end of its final evaluation: model and tokenizer load,
  dataset build, trainer construction, both evaluations and training are
  counted; interpreter start, imports and process exit are not.
Experiments per hour: K / sum of ``process_s`` ("incl. process start") and
K / sum of ``warm_s`` ("warm").

TRL is an optional benchmark dependency (``pip install trl``); the child
exits 3 with a message when it is missing.

    python load_tests/peer_trl.py --experiments 8 --steps 10 --json /tmp/peer.json
    python load_tests/peer_trl.py --one --seed 0 --spec-json '{...}' --json /tmp/one.json   # one experiment
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

STARTED_AT = time.time()  # the child's own start (before its imports)
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "shared" / "models" / "clora-tiny"
ADAM_BETAS = (0.9, 0.95)  # as services.trainer.tenants.ADAM_BETAS
EVAL_BATCH = 64  # held-out prompts per greedy generate call
CHILD_TIMEOUT_S = 1800.0
MISSING_TRL_EXIT = 3


# ---------------------------------------------------------------- parent (pure parts)


def peer_summary(experiments: list[dict], trl_version: str | None) -> dict:
    """Throughput with and without process start, accuracy, from the children's reports."""
    done = [e for e in experiments if e.get("final_accuracy") is not None]
    process_s = sum(e["process_s"] for e in experiments)
    warm_s = sum(e["warm_s"] for e in done)
    finals = [e["final_accuracy"] for e in done]
    starts = [e["start_accuracy"] for e in done if e.get("start_accuracy") is not None]
    return {
        "peer": "trl", "trl_version": trl_version, "experiments": len(experiments), "finished": len(done),
        "process_s": process_s, "warm_s": warm_s,
        "experiments_per_hour": 3600.0 * len(done) / process_s if process_s > 0 and done else 0.0,
        "experiments_per_hour_warm": 3600.0 * len(done) / warm_s if warm_s > 0 and done else 0.0,
        "mean_process_start_s": statistics.fmean(e["process_s"] - e["warm_s"] for e in done) if done else None,
        "import_s": statistics.fmean(e["import_s"] for e in done) if done else None,
        "train_s": statistics.fmean(e["train_s"] for e in done) if done else None,
        "start_accuracy_mean": statistics.fmean(starts) if starts else None,
        "final_accuracy_mean": statistics.fmean(finals) if finals else None,
        "final_accuracy_std": statistics.pstdev(finals) if finals else None,
    }


def run_peer(experiments: int, seed: int, family: str, spec_fields: dict, workdir: Path,
             python: str = sys.executable, timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """K experiments, each in a fresh process, one after another; ``peer_summary``
    plus the per-experiment reports (``experiments``) and ``error``."""
    workdir.mkdir(parents=True, exist_ok=True)
    reports, error, version = [], None, None
    for index in range(experiments):
        out = workdir / f"trl-{index}.json"
        command = [python, str(Path(__file__).resolve()), "--one", "--seed", str(seed + index),
                   "--family", family, "--spec-json", json.dumps(spec_fields), "--json", str(out),
                   "--output-dir", str(workdir / f"trl-{index}")]
        print(f"== trl peer: experiment {index + 1}/{experiments}", flush=True)
        began = time.time()
        result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                capture_output=True, text=True, timeout=timeout_s)
        process_s = time.time() - began
        if result.returncode != 0 or not out.is_file():
            error = f"experiment {index} exited {result.returncode}: {result.stderr.strip()[-800:]}"
            reports.append({"seed": seed + index, "process_s": process_s, "warm_s": 0.0, "final_accuracy": None})
            break
        report = json.loads(out.read_text())
        version = report.get("trl_version")
        reports.append({**report, "process_s": process_s,
                        "warm_s": report["ended_at"] - report["imported_at"],
                        "import_s": report["imported_at"] - report["started_at"]})
        print(f"   {process_s:.1f}s (warm {reports[-1]['warm_s']:.1f}s), held-out accuracy "
              f"{report['start_accuracy']:.3f} -> {report['final_accuracy']:.3f}", flush=True)
    return {**peer_summary(reports, version), "experiments_detail": reports, "error": error}


def peer_table(summary: dict) -> str:
    from services.cli.experiments import format_table

    def num(value, digits=1, scale=1.0):
        return "-" if value is None else f"{scale * value:.{digits}f}"

    return format_table([
        ["PEER", "VERSION", "DONE", "EXP/H (INCL. START)", "EXP/H (WARM)", "START S", "START ACC", "FINAL ACC"],
        [summary["peer"], summary["trl_version"] or "-", f"{summary['finished']}/{summary['experiments']}",
         num(summary["experiments_per_hour"]), num(summary["experiments_per_hour_warm"]),
         num(summary["mean_process_start_s"], 2), num(summary["start_accuracy_mean"], 1, 100),
         num(summary["final_accuracy_mean"], 1, 100)],
    ])


# ---------------------------------------------------------------- child: one experiment


def run_one(seed: int, family: str, spec_fields: dict, output_dir: Path) -> dict:
    """One experiment in this process (imports happen here, timed)."""
    try:
        import datasets
        import peft
        import torch
        import trl
    except ImportError as exc:
        print(f"the TRL peer needs trl (pip install trl): {exc}", file=sys.stderr)
        raise SystemExit(MISSING_TRL_EXIT) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO_ROOT))
    from services.cli.local import DEMO_ENV, demo_specs
    from services.reward.scoring import score_builtin
    from services.scheduler.outgoing import train_reward
    from services.scheduler.prompts import PromptSource
    from services.scheduler.state import ExperimentView
    from shared.config import LoraConfig

    imported_at = time.time()
    threads = int(DEMO_ENV.get("CLORA_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)  # as one C-LoRA service
    (spec,) = demo_specs([family], spec_fields, seed=seed)
    reward_spec = train_reward(spec)
    view = ExperimentView(spec=spec, status="running")
    prompts = PromptSource()
    train_rows = [{"prompt": p.text, "answer": p.answer}
                  for step in range(spec.steps) for p in prompts.train(view, step)]
    held_out = prompts.held_out(view)

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    deployment = LoraConfig()
    lora = peft.LoraConfig(r=spec.lora_rank or deployment.lora_rank,
                           lora_alpha=spec.lora_alpha or deployment.lora_alpha,  # type: ignore[arg-type]
                           target_modules=spec.lora_targets or list(deployment.signature.target_modules),
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    def reward(prompts, completions, answer, **_):
        return [score_builtin(reward_spec, text, ans).reward for text, ans in zip(completions, answer, strict=True)]

    batch = spec.prompts_per_step * spec.group_size
    config = trl.GRPOConfig(
        output_dir=str(output_dir), seed=seed, max_steps=spec.steps, learning_rate=spec.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
        weight_decay=0.0, max_grad_norm=spec.max_grad_norm,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=spec.group_size, num_iterations=1, max_completion_length=spec.max_tokens,
        temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
        beta=spec.kl_coef, epsilon=spec.clip_eps, loss_type="dapo",
        scale_rewards="group" if spec.normalize_advantage_std else "none", shuffle_dataset=False,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=max(spec.steps, 1),
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=config,
                              train_dataset=datasets.Dataset.from_list(train_rows), processing_class=tokenizer,
                              peft_config=lora)
    start_accuracy = held_out_accuracy(trainer.model, tokenizer, held_out, reward_spec, spec.max_tokens)
    train_began = time.time()
    trainer.train()
    train_s = time.time() - train_began
    final_accuracy = held_out_accuracy(trainer.model, tokenizer, held_out, reward_spec, spec.max_tokens)
    return {"seed": seed, "family": family, "trl_version": trl.__version__, "started_at": STARTED_AT,
            "imported_at": imported_at, "ended_at": time.time(), "train_s": train_s,
            "start_accuracy": start_accuracy, "final_accuracy": final_accuracy}


def held_out_accuracy(model, tokenizer, prompts: Sequence, reward_spec, max_tokens: int) -> float:
    """Greedy accuracy on ``prompts`` (the verifier's verdict on the text before the first EOS)."""
    import torch

    from services.reward.scoring import score_builtin

    tokenizer.padding_side = "left"
    correct = 0
    model.eval()
    for first in range(0, len(prompts), EVAL_BATCH):
        chunk = prompts[first:first + EVAL_BATCH]
        inputs = tokenizer([p.text for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for prompt, row in zip(chunk, output[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
            cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            text = tokenizer.decode(row[:cut], skip_special_tokens=True)
            correct += bool(score_builtin(reward_spec, text, prompt.answer).correct)
    return correct / len(prompts) if prompts else 0.0


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", action="store_true", help="run one experiment in this process (the child)")
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: the demo spec's, 10")
    parser.add_argument("--seed", type=int, default=0, help="experiment i gets seed SEED + i")
    parser.add_argument("--family", default=None, help="default: the tiny model's demo advice")
    parser.add_argument("--spec-json", default=None, help="spec fields as JSON (default: the demo's, steps 10)")
    parser.add_argument("--output-dir", default=None, help="the child's TRL output dir")
    parser.add_argument("--json", dest="json_path", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.one:
        if not args.spec_json or not args.family:
            raise SystemExit("--one needs --family and --spec-json")
        with tempfile.TemporaryDirectory(prefix="clora-trl-") as temporary:
            report = run_one(args.seed, args.family, json.loads(args.spec_json), Path(args.output_dir or temporary))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(report))
        return 0
    from services.cli.local import demo_settings

    families, spec_fields = demo_settings()
    spec_fields = json.loads(args.spec_json) if args.spec_json else {**spec_fields, "steps": 10}
    if args.steps is not None:
        spec_fields["steps"] = args.steps
    with tempfile.TemporaryDirectory(prefix="clora-trl-peer-") as workdir:
        summary = run_peer(args.experiments, args.seed, args.family or (families[0] if families else "add"),
                           spec_fields, Path(workdir))
    print(peer_table(summary))
    if summary["error"]:
        print(f"stopped early: {summary['error']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["error"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
