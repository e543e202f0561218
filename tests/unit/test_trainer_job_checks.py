"""``job_problem``: which train jobs the trainer refuses for good, and why
(token ids outside the vocabulary, misaligned logprobs, token budgets)."""

from __future__ import annotations

from services.trainer.service import job_problem
from shared.config import TrainBudget
from shared.messages import Prompt, PromptResult, PromptScore, Sample, ScoredGroup, TrainHyper, TrainJob

VOCAB = 100
BUDGET = TrainBudget(max_train_tokens=40, max_packed_row_tokens=20)


def group(prompt_ids: list[int], completions: list[list[int]], error: str | None = None) -> ScoredGroup:
    samples = [Sample(token_ids=list(c), logprobs=[-1.0] * len(c), text="", finish_reason="length")
               for c in completions]
    result = PromptResult(prompt=Prompt(prompt_id="p", text=""), prompt_token_ids=list(prompt_ids),
                          samples=samples, error=error)
    return ScoredGroup(adapter_version=0, result=result,
                       score=PromptScore(rewards=[float(i % 2) for i in range(len(samples))]))


def job(*groups: ScoredGroup, base_version: int = 0) -> TrainJob:
    return TrainJob(job_id="exp:s0", experiment_id="exp", step=0, base_version=base_version, lora_rank=8,
                    groups=list(groups), hyper=TrainHyper(learning_rate=1e-3))


def test_a_job_within_budget_and_vocabulary_passes_up_to_the_limits():
    # Rows of exactly 20 tokens (4 + 4 x 4), 40 in all: both limits are inclusive.
    row = group([1, 2, 3, 4], [[5, 6, 7, VOCAB - 1]] * 4)
    assert job_problem(job(row, row), VOCAB, BUDGET) is None


def test_a_failed_generation_without_tokens_is_not_a_problem():
    assert job_problem(job(group([], [], error="generation failed")), VOCAB, BUDGET) is None


def test_token_ids_outside_the_vocabulary_are_refused():
    code, reason = job_problem(job(group([1, 2], [[3, VOCAB]])), VOCAB, BUDGET)
    assert code == "train_job_invalid" and f"token id {VOCAB} outside the model's vocabulary [0, {VOCAB})" in reason
    code, reason = job_problem(job(group([1, -3], [[3]])), VOCAB, BUDGET)
    assert code == "train_job_invalid" and "prompt token id -3" in reason


def test_logprobs_must_be_one_per_completion_token_and_completions_need_a_prompt():
    misaligned = group([1, 2], [[3, 4, 5]])
    misaligned.result.samples[0].logprobs.append(-1.0)
    assert job_problem(job(misaligned), VOCAB, BUDGET) == (
        "train_job_invalid", "group 0: sample 0: 4 behaviour logprobs for 3 completion tokens")
    code, reason = job_problem(job(group([], [[3, 4]])), VOCAB, BUDGET)
    assert code == "train_job_invalid" and "no prompt tokens" in reason


def test_token_budgets_are_enforced_with_the_numbers_in_the_reason():
    wide = group([1, 2, 3, 4, 5], [[6, 7, 8, 9]] * 4)  # 5 + 16 = 21 tokens in one packed row
    assert job_problem(job(wide), VOCAB, BUDGET) == ("train_job_over_budget", (
        "group 0 packs 21 tokens (prompt + all its completions) in one row, over the trainer's "
        "max_packed_row_tokens 20"))
    row = group([1, 2, 3, 4], [[5, 6, 7, 8]] * 4)  # 20 tokens
    code, reason = job_problem(job(row, row, group([1], [[2]])), VOCAB, BUDGET)  # 42 tokens
    assert code == "train_job_over_budget"
    assert "42 prompt + completion tokens, over the trainer's max_train_tokens 40" in reason


def test_a_negative_base_version_is_refused():
    assert job_problem(job(base_version=-1), VOCAB, BUDGET)[0] == "train_job_invalid"
