"""GRPO, as pure functions on tensors.

One train step of one tenant:

1. ``group_advantages``: per prompt group, advantage = reward - group mean
   (optionally divided by the group's std). A group whose rewards are all
   equal carries no signal and is skipped (and counted).
2. ``build_batch``: prompt + completion token ids of every kept sample, right
   padded, shifted for next-token prediction; a mask that is 1 only on
   completion tokens; the behaviour logprobs that came with each completion
   aligned to the same positions.
3. ``token_logprobs``: log p(target token) under the current policy.
4. ``policy_loss``: token-level PPO-style clipped importance ratio
   ``exp(logprobs - behaviour_logprobs)`` times the advantage, optional KL to
   the base model (k3 estimator, reference = the same model with its adapter
   disabled, see ``reference_logprobs``), averaged over completion tokens.

On-policy the ratio is 1 in value, but its gradient is the policy gradient
``A * grad log p``. Shapes are in the names: B sequences, T positions,
V vocabulary, N samples of a group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rewards closer than this are "identical": the group has no signal.
IDENTICAL_REWARD_TOLERANCE = 1e-9
STD_EPSILON = 1e-6


@dataclass
class GroupAdvantages:
    """``advantages[g]`` is None for a skipped group (identical rewards)."""

    advantages: list[torch.Tensor | None]
    skipped_groups: int


@dataclass
class SequenceExample:
    """One completion to learn from. ``behaviour_logprobs`` has one entry per
    completion token: its log-probability under the policy that sampled it."""

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    behaviour_logprobs: Sequence[float]
    advantage: float


@dataclass
class TrainBatch:
    """Right-padded, already shifted: position t of ``input_ids_B_T`` predicts
    ``target_ids_B_T[:, t]``; ``completion_mask_B_T`` is 1.0 where that target
    is a completion token (prompt and padding are 0)."""

    input_ids_B_T: torch.Tensor
    attention_mask_B_T: torch.Tensor
    target_ids_B_T: torch.Tensor
    completion_mask_B_T: torch.Tensor
    behaviour_logprobs_B_T: torch.Tensor
    advantages_B: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_B_T.sum().item())

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """A micro-batch of rows ``start:stop``, trimmed of all-padding columns."""
        width = int(self.attention_mask_B_T[start:stop].sum(dim=1).max().item())
        return TrainBatch(
            input_ids_B_T=self.input_ids_B_T[start:stop, :width],
            attention_mask_B_T=self.attention_mask_B_T[start:stop, :width],
            target_ids_B_T=self.target_ids_B_T[start:stop, :width],
            completion_mask_B_T=self.completion_mask_B_T[start:stop, :width],
            behaviour_logprobs_B_T=self.behaviour_logprobs_B_T[start:stop, :width],
            advantages_B=self.advantages_B[start:stop],
        )

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


@dataclass
class LossTerms:
    """``loss`` is differentiable; the rest are detached floats for stats.
    Sums over tokens are kept so micro-batches can be combined exactly."""

    loss: torch.Tensor
    policy_loss: float
    kl: float
    clip_fraction: float
    num_tokens: int


def group_advantage(rewards_N: torch.Tensor, normalize_std: bool) -> torch.Tensor | None:
    """Reward minus the group mean (divided by the group std if asked);
    None when every reward is the same (no signal)."""
    spread = (rewards_N.max() - rewards_N.min()).item() if rewards_N.numel() else 0.0
    # NaN rewards fall through on purpose: the loss becomes NaN and the step is skipped loudly.
    if rewards_N.numel() < 2 or spread <= IDENTICAL_REWARD_TOLERANCE:
        return None
    advantages_N = rewards_N - rewards_N.mean()
    if normalize_std:
        advantages_N = advantages_N / (rewards_N.std(unbiased=False) + STD_EPSILON)
    return advantages_N


def group_advantages(rewards_per_group: Sequence[Sequence[float]], normalize_std: bool) -> GroupAdvantages:
    """``group_advantage`` for each group, with the count of skipped groups."""
    advantages: list[torch.Tensor | None] = []
    for rewards in rewards_per_group:
        rewards_N = torch.tensor(list(rewards), dtype=torch.float32)
        advantages.append(group_advantage(rewards_N, normalize_std))
    return GroupAdvantages(advantages, sum(a is None for a in advantages))


def build_batch(examples: Sequence[SequenceExample], pad_id: int = 0) -> TrainBatch:
    """Pack examples into one right-padded, shifted batch (see ``TrainBatch``)."""
    if not examples:
        raise ValueError("build_batch needs at least one example")
    lengths = [len(e.prompt_ids) + len(e.completion_ids) - 1 for e in examples]
    B, T = len(examples), max(lengths)
    input_ids_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    target_ids_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_B_T = torch.zeros((B, T), dtype=torch.long)
    completion_mask_B_T = torch.zeros((B, T), dtype=torch.float32)
    behaviour_logprobs_B_T = torch.zeros((B, T), dtype=torch.float32)
    for row, example in enumerate(examples):
        _fill_row(row, example, input_ids_B_T, target_ids_B_T, attention_mask_B_T,
                  completion_mask_B_T, behaviour_logprobs_B_T)
    advantages_B = torch.tensor([e.advantage for e in examples], dtype=torch.float32)
    return TrainBatch(input_ids_B_T, attention_mask_B_T, target_ids_B_T, completion_mask_B_T,
                      behaviour_logprobs_B_T, advantages_B)


def _fill_row(row, example, input_ids_B_T, target_ids_B_T, attention_mask_B_T,
              completion_mask_B_T, behaviour_logprobs_B_T) -> None:
    prompt_len, completion_len = len(example.prompt_ids), len(example.completion_ids)
    if prompt_len == 0:
        raise ValueError("an example needs at least one prompt token (the first completion token is predicted from it)")
    if len(example.behaviour_logprobs) != completion_len:
        raise ValueError(f"{len(example.behaviour_logprobs)} behaviour logprobs for {completion_len} completion tokens")
    sequence = torch.tensor(list(example.prompt_ids) + list(example.completion_ids), dtype=torch.long)
    length = len(sequence) - 1
    input_ids_B_T[row, :length] = sequence[:-1]
    target_ids_B_T[row, :length] = sequence[1:]
    attention_mask_B_T[row, :length] = 1
    # Target index t is token t+1 of the sequence: completion tokens are targets prompt_len-1 ...
    first = prompt_len - 1
    completion_mask_B_T[row, first:first + completion_len] = 1.0
    behaviour_logprobs_B_T[row, first:first + completion_len] = torch.tensor(
        list(example.behaviour_logprobs), dtype=torch.float32)


def token_logprobs(logits_B_T_V: torch.Tensor, target_ids_B_T: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position, in fp32, with the sampler's temperature."""
    logits_B_T_V = logits_B_T_V.float()
    if temperature != 1.0:
        logits_B_T_V = logits_B_T_V / temperature
    target_logits_B_T = logits_B_T_V.gather(-1, target_ids_B_T.unsqueeze(-1)).squeeze(-1)
    return target_logits_B_T - torch.logsumexp(logits_B_T_V, dim=-1)


def model_logprobs(model, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
    """``token_logprobs`` of ``batch``'s targets under ``model`` (a causal LM)."""
    logits_B_T_V = model(input_ids=batch.input_ids_B_T, attention_mask=batch.attention_mask_B_T).logits
    return token_logprobs(logits_B_T_V, batch.target_ids_B_T, temperature)


def reference_logprobs(peft_model, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the base model: the same PEFT model with its adapter
    disabled (no second copy of the model), without gradient."""
    with torch.no_grad(), peft_model.disable_adapter():
        return model_logprobs(peft_model, batch, temperature)


def kl_to_reference(logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): non-negative, zero
    exactly when the two agree, unbiased on samples from the policy."""
    log_ratio_B_T = ref_logprobs_B_T - logprobs_B_T
    return torch.exp(log_ratio_B_T) - log_ratio_B_T - 1.0


def policy_loss(
    logprobs_B_T: torch.Tensor,
    behaviour_logprobs_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    completion_mask_B_T: torch.Tensor,
    clip_eps: float,
    ref_logprobs_B_T: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    total_tokens: int | None = None,
) -> LossTerms:
    """Clipped-ratio policy-gradient loss (+ ``kl_coef`` * KL), mean over
    completion tokens. ``total_tokens`` (default: this batch's) is the
    denominator, so micro-batch losses add up to the full batch's mean."""
    mask_B_T = completion_mask_B_T
    num_tokens = int(mask_B_T.sum().item())
    denominator = float(total_tokens if total_tokens is not None else max(num_tokens, 1))
    # Zero the log-ratio off the completion (not multiply later): padding must not leak inf/NaN.
    log_ratio_B_T = torch.where(mask_B_T > 0, logprobs_B_T - behaviour_logprobs_B_T, 0.0)
    ratio_B_T = torch.exp(log_ratio_B_T)
    advantages_B_1 = advantages_B.unsqueeze(-1)
    unclipped_B_T = ratio_B_T * advantages_B_1
    clipped_B_T = torch.clamp(ratio_B_T, 1.0 - clip_eps, 1.0 + clip_eps) * advantages_B_1
    token_loss_B_T = -torch.minimum(unclipped_B_T, clipped_B_T)
    policy_sum = (token_loss_B_T * mask_B_T).sum()
    loss = policy_sum / denominator
    kl_sum = 0.0
    if ref_logprobs_B_T is not None:
        ref_logprobs_B_T = torch.where(mask_B_T > 0, ref_logprobs_B_T, logprobs_B_T.detach())
        kl_sum_t = (kl_to_reference(logprobs_B_T, ref_logprobs_B_T) * mask_B_T).sum()
        loss = loss + kl_coef * kl_sum_t / denominator
        kl_sum = kl_sum_t.item()
    clipped_tokens = (((ratio_B_T - 1.0).abs() > clip_eps).float() * mask_B_T).sum().item()
    return LossTerms(
        loss=loss,
        policy_loss=policy_sum.item() / denominator,
        kl=kl_sum / denominator,
        clip_fraction=clipped_tokens / denominator,
        num_tokens=num_tokens,
    )


def is_finite(value: float | torch.Tensor) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all().item())
    return math.isfinite(value)


__all__ = [
    "GroupAdvantages", "SequenceExample", "TrainBatch", "LossTerms", "group_advantage",
    "group_advantages", "build_batch", "token_logprobs", "model_logprobs", "reference_logprobs",
    "kl_to_reference", "policy_loss", "is_finite",
]
