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
    RewardSpec,
    RolloutRequest,
    SamplingParams,
    ScoredCompletion,
    StepMetrics,
    TrainHyper,
    TrainJob,
)

BUILT_IN_REWARDS = ("family", "exact_match", "regex", "math", "format", "sum")


def shard_of(experiment_id: str, num_shards: int) -> int:
    return zlib.crc32(experiment_id.encode()) % num_shards


def train_request_id(experiment_id: str, step: int, index: int) -> str:
    return f"{experiment_id}:s{step}:p{index}"


def eval_request_id(experiment_id: str, version: int, index: int) -> str:
    return f"{experiment_id}:e{version}:p{index}"


def train_job_id(experiment_id: str, step: int) -> str:
    return f"{experiment_id}:s{step}"


def sample_successes(scored: ScoredCompletion, reward: RewardSpec) -> list[bool]:
    """Per sample: did it achieve the experiment's objective? The verifier's
    verdict (flipped for an inverted reward), else reward >= 0.5 for 0/1
    built-in rewards (not a weighted ``sum``). [] for a failed group or a
    reward without a verdict."""
    if group_failed(scored) is not None:
        return []
    successes = []
    for index, reward_value in enumerate(scored.rewards):
        verdict = scored.correct[index] if index < len(scored.correct) else None
        if verdict is not None:
            successes.append(verdict != reward.invert)
        elif reward.type in BUILT_IN_REWARDS and reward.type != "sum":
            successes.append(reward_value >= 0.5)
    return successes


def group_failed(scored: ScoredCompletion) -> str | None:
    """Why a scored group must not be trained on, or None. Rewards that are
    not one finite number per sample fail the group: a NaN would poison the
    step's mean and the trainer's loss."""
    if scored.completion.error is not None:
        return f"rollout failed: {scored.completion.error}"
    if scored.reward_error is not None:
        return f"reward failed: {scored.reward_error}"
    if not all(math.isfinite(reward) for reward in scored.rewards):
        shown = ", ".join(repr(r) for r in scored.rewards[:8])
        return f"reward failed: rewards are not all finite numbers ({shown})"
    if len(scored.rewards) != len(scored.completion.samples):
        return f"reward failed: {len(scored.rewards)} rewards for {len(scored.completion.samples)} samples"
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


def rollout_request(view: ExperimentView, step: int, index: int, prompt: Prompt, now: float) -> RolloutRequest:
    """Request ``index`` of step ``step``, under the view's newest version."""
    spec = view.spec
    return RolloutRequest(
        request_id=train_request_id(view.experiment_id, step, index), experiment_id=view.experiment_id,
        step=step, purpose="train", prompt=prompt, adapter_version=view.version,
        adapter_path=view.adapter_path if view.version > 0 else None,
        sampling=SamplingParams(n=spec.group_size, temperature=spec.temperature, top_p=spec.top_p,
                                top_k=spec.top_k, max_tokens=spec.max_tokens, stop=list(spec.stop)),
        reward=train_reward(spec), ts=now,
    )


def eval_request(view: ExperimentView, version: int, index: int, prompt: Prompt, now: float) -> RolloutRequest:
    """A greedy rollout of held-out prompt ``index`` under ``version``."""
    # the final eval is issued only once version == steps, so the path is the final one
    return RolloutRequest(
        request_id=eval_request_id(view.experiment_id, version, index), experiment_id=view.experiment_id,
        step=version, purpose="eval", prompt=prompt, adapter_version=version,
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
    ordered = [groups[train_request_id(view.experiment_id, step, i)] for i in range(spec.prompts_per_step)]
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
    rewards = [r for g in groups for r in g.rewards]
    successes = [s for g in groups for s in sample_successes(g, view.spec.reward)]
    issued_at = view.issued_at.get(step)
    completed_at = view.completed_at.get(step)
    rollout_s = completed_at - issued_at if issued_at is not None and completed_at is not None else 0.0
    # on-policy every group was sampled by version `step`; off-policy, the oldest that sampled one
    sampled_by = min((g.completion.adapter_version for g in all_groups), default=step)
    return StepMetrics(
        experiment_id=view.experiment_id, step=step, adapter_version=sampled_by,
        produced_version=published.version, groups=len(all_groups),
        failed_groups=len(all_groups) - len(groups),
        reward_mean=sum(rewards) / len(rewards) if rewards else None,
        accuracy=sum(successes) / len(successes) if successes else None,
        start_eval_accuracy=view.start_accuracy,
        rollout_s=max(0.0, rollout_s), train_s=published.stats.train_s, ts=now,
    )
