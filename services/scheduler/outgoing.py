"""What the scheduler publishes, built from an experiment's view: rollout
requests (train and eval), train jobs and step metrics; and the rules that
judge a scored group. Pure functions: the clock comes in as ``now``."""

from __future__ import annotations

import math
import zlib

import msgspec

from services.scheduler import spec as spec_rules
from services.scheduler.state import ExperimentView
from shared.messages import (
    AdapterPublished,
    Prompt,
    PromptResult,
    PromptScore,
    RewardSpec,
    RolloutRequest,
    SamplingParams,
    ScoredCompletion,
    ScoredGroup,
    StepMetrics,
    TrainHyper,
    TrainJob,
)

BUILT_IN_REWARDS = ("family", "exact_match", "regex", "math", "format", "sum")


def shard_of(experiment_id: str, num_shards: int) -> int:
    return zlib.crc32(experiment_id.encode()) % num_shards


def train_request_id(experiment_id: str, step: int) -> str:
    """The one rollout request of a step (all its prompts)."""
    return f"{experiment_id}:s{step}"


def eval_request_id(experiment_id: str, version: int) -> str:
    """The one rollout request of an evaluation of ``version`` (all held-out prompts)."""
    return f"{experiment_id}:e{version}"


def train_group_id(experiment_id: str, step: int, index: int) -> str:
    """Prompt ``index`` of step ``step``: the key of its group in the scheduler's state."""
    return f"{experiment_id}:s{step}:p{index}"


def eval_group_id(experiment_id: str, version: int, index: int) -> str:
    return f"{experiment_id}:e{version}:p{index}"


def scored_groups(scored: ScoredCompletion) -> list[ScoredGroup]:
    """One group per prompt result, in the request's prompt order. A whole
    request that failed fails each of its groups; a result without a score
    fails its group."""
    completion = scored.completion
    groups = []
    for index, result in enumerate(completion.results):
        if completion.error is not None and result.error is None:
            result = PromptResult(prompt=result.prompt, error=completion.error)
        score = (scored.scores[index] if index < len(scored.scores)
                 else PromptScore(reward_error=f"no score for prompt {index}"))
        groups.append(ScoredGroup(adapter_version=completion.adapter_version, result=result, score=score))
    return groups


def train_job_id(experiment_id: str, step: int) -> str:
    return f"{experiment_id}:s{step}"


def sample_successes(scored: ScoredGroup, reward: RewardSpec) -> list[bool]:
    """Per sample: did it achieve the experiment's objective? The verifier's
    verdict (flipped for an inverted reward), else reward >= 0.5 for 0/1
    built-in rewards (not a weighted ``sum``). [] for a failed group or a
    reward without a verdict."""
    if group_failed(scored) is not None:
        return []
    successes = []
    correct = scored.score.correct
    for index, reward_value in enumerate(scored.score.rewards):
        verdict = correct[index] if index < len(correct) else None
        if verdict is not None:
            successes.append(verdict != reward.invert)
        elif reward.type in BUILT_IN_REWARDS and reward.type != "sum":
            successes.append(reward_value >= 0.5)
    return successes


def group_failed(scored: ScoredGroup) -> str | None:
    """Why a scored group must not be trained on, or None. Rewards that are
    not one finite number per sample fail the group: a NaN would poison the
    step's mean and the trainer's loss."""
    result, score = scored.result, scored.score
    if result.error is not None:
        return f"rollout failed: {result.error}"
    if score.reward_error is not None:
        return f"reward failed: {score.reward_error}"
    if not all(math.isfinite(reward) for reward in score.rewards):
        shown = ", ".join(repr(r) for r in score.rewards[:8])
        return f"reward failed: rewards are not all finite numbers ({shown})"
    if len(score.rewards) != len(result.samples):
        return f"reward failed: {len(score.rewards)} rewards for {len(result.samples)} samples"
    return None


def train_reward(spec) -> RewardSpec:
    """The spec's reward; a ``family`` reward without a family scores with the task's."""
    if spec.reward.type == "family" and spec.reward.family is None:
        return msgspec.structs.replace(spec.reward, family=spec.task.family)
    return spec.reward


def eval_reward(spec) -> RewardSpec:
    """The experiment's own reward when it is built in (so an inverted
    tenant is measured on its objective), else the family's verifier."""
    if spec.reward.type in BUILT_IN_REWARDS:
        return train_reward(spec)
    return RewardSpec(type="family", family=spec_rules.eval_family(spec))


def rollout_request(view: ExperimentView, step: int, prompts: list[Prompt], now: float) -> RolloutRequest:
    """The request of step ``step`` (all its prompts), under the view's newest version."""
    spec = view.spec
    return RolloutRequest(
        request_id=train_request_id(view.experiment_id, step), experiment_id=view.experiment_id,
        step=step, purpose="train", prompts=prompts, adapter_version=view.version,
        adapter_path=view.adapter_path if view.version > 0 else None,
        sampling=SamplingParams(n=spec.group_size, temperature=spec.temperature, top_p=spec.top_p,
                                top_k=spec.top_k, max_tokens=spec.max_tokens, stop=list(spec.stop)),
        reward=train_reward(spec), ts=now,
    )


def eval_request(view: ExperimentView, version: int, prompts: list[Prompt], now: float) -> RolloutRequest:
    """A greedy rollout of every held-out prompt under ``version``."""
    # the final eval is issued only once version == steps, so the path is the final one
    return RolloutRequest(
        request_id=eval_request_id(view.experiment_id, version), experiment_id=view.experiment_id,
        step=version, purpose="eval", prompts=prompts, adapter_version=version,
        adapter_path=view.adapter_path if version > 0 else None,
        sampling=SamplingParams(n=1, temperature=0.0, max_tokens=view.spec.max_tokens, stop=list(view.spec.stop)),
        reward=eval_reward(view.spec), ts=now,
    )


def train_job(view: ExperimentView, now: float) -> TrainJob:
    """The train job of the view's current step: it turns version ``step`` into
    ``step + 1``. The same job_id each time it is sent: the trainer re-announces
    a version it already wrote."""
    spec = view.spec
    step = view.version
    groups = view.groups.get(step, {})
    ordered = [groups[train_group_id(view.experiment_id, step, i)] for i in range(spec.prompts_per_step)]
    return TrainJob(
        job_id=train_job_id(view.experiment_id, step), experiment_id=view.experiment_id, step=step,
        base_version=step, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_targets=spec.lora_targets,
        groups=[g for g in ordered if group_failed(g) is None],
        hyper=TrainHyper(learning_rate=spec.learning_rate, temperature=spec.temperature, clip_eps=spec.clip_eps,
                         kl_coef=spec.kl_coef, normalize_advantage_std=spec.normalize_advantage_std,
                         max_grad_norm=spec.max_grad_norm, max_off_policy_steps=spec.max_off_policy_steps,
                         checkpoint_every=spec.checkpoint_every, seed=spec.seed),
        ts=now,
    )


def step_metrics(view: ExperimentView, step: int, published: AdapterPublished, now: float) -> StepMetrics:
    """What step ``step`` did, from its groups and the version it produced."""
    all_groups = list(view.groups.get(step, {}).values())
    groups = [g for g in all_groups if group_failed(g) is None]
    rewards = [r for g in groups for r in g.score.rewards]
    successes = [s for g in groups for s in sample_successes(g, view.spec.reward)]
    issued_at = view.issued_at.get(step)
    completed_at = view.completed_at.get(step)
    rollout_s = completed_at - issued_at if issued_at is not None and completed_at is not None else 0.0
    # on-policy every group was sampled by version `step`; off-policy, the oldest that sampled one
    sampled_by = min((g.adapter_version for g in all_groups), default=step)
    return StepMetrics(
        experiment_id=view.experiment_id, step=step, adapter_version=sampled_by,
        produced_version=published.version, groups=len(all_groups),
        failed_groups=len(all_groups) - len(groups),
        reward_mean=sum(rewards) / len(rewards) if rewards else None,
        accuracy=sum(successes) / len(successes) if successes else None,
        start_eval_accuracy=view.start_accuracy,
        rollout_s=max(0.0, rollout_s), train_s=published.stats.train_s, ts=now,
    )
