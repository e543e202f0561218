"""GRPO, as pure functions on tensors.

One train step of one tenant:

1. ``group_advantages``: per prompt group, advantage = reward - group mean
   (optionally divided by the group's std). A group whose rewards are all
   equal carries no signal and is skipped (and counted).
2. ``build_batch``: the kept samples packed by shared prompt, one row per
   prompt (the prompt is computed once for its group, see ``TrainBatch``);
   the completion tokens flat, each with the position that predicts it, its
   behaviour logprob and its completion's advantage.
3. ``model_logprobs``: log p(completion token) under the current policy.
4. ``policy_loss``: token-level PPO-style clipped importance ratio
   ``exp(logprobs - behaviour_logprobs)`` times the advantage, optional KL to
   the base model (k3 estimator, reference = the same model with its adapter
   disabled, see ``reference_logprobs``), averaged over completion tokens.

On-policy the ratio is 1 in value, but its gradient is the policy gradient
``A * grad log p``.

Shape suffixes (STYLE: names say what and what shape): a tensor named
``x_B_L`` has shape (B, L). B: packed rows (one per prompt group), L: positions
in a row, K: completion tokens (flat, over all rows), V: vocabulary, N: samples
of one group.
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
    completion token: its log-probability under the policy that sampled it.
    Examples with the same ``group`` and prompt share one packed row, so a
    row is never longer than one group (the trainer's row budget)."""

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    behaviour_logprobs: Sequence[float]
    advantage: float
    group: int = 0


@dataclass
class TrainBatch:
    """Completions packed by shared prompt: one row per distinct prompt,
    ``[prompt, c1[:-1], c2[:-1], ...]``, so a prompt is computed once for its
    whole group. Completion i attends to the prompt and causally to itself
    only, at the positions it had when sampled (``position_ids_B_L``), so each
    log-probability equals the one of ``prompt + ci`` alone. Rows are right
    padded; a padding position attends to itself only.

    The K completion tokens are flat: token k is ``target_K[k]``, predicted by
    the logits at ``(row_K[k], position_K[k])`` (the last prompt position for
    a completion's first token), with its behaviour log-prob and its
    completion's advantage. Tokens are ordered by row: those of row b are
    ``row_offsets[b]:row_offsets[b + 1]``; ``row_lengths[b]`` positions of
    row b are used, the rest is padding."""

    input_ids_B_L: torch.Tensor
    position_ids_B_L: torch.Tensor
    attend_B_L_L: torch.Tensor  # bool: query position (dim 1) may attend key position (dim 2)
    row_lengths: list[int]
    row_offsets: list[int]
    row_K: torch.Tensor
    position_K: torch.Tensor
    target_K: torch.Tensor
    behaviour_logprobs_K: torch.Tensor
    advantages_K: torch.Tensor

    _TENSORS = ("input_ids_B_L", "position_ids_B_L", "attend_B_L_L", "row_K", "position_K", "target_K",
                "behaviour_logprobs_K", "advantages_K")

    @property
    def num_rows(self) -> int:
        return len(self.row_lengths)

    @property
    def num_tokens(self) -> int:
        return self.target_K.shape[0]

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """Rows ``start:stop`` with their tokens, trimmed of all-padding columns."""
        width = max(self.row_lengths[start:stop])
        first, last = self.row_offsets[start], self.row_offsets[stop]
        return TrainBatch(
            input_ids_B_L=self.input_ids_B_L[start:stop, :width],
            position_ids_B_L=self.position_ids_B_L[start:stop, :width],
            attend_B_L_L=self.attend_B_L_L[start:stop, :width, :width],
            row_lengths=self.row_lengths[start:stop],
            row_offsets=[offset - first for offset in self.row_offsets[start:stop + 1]],
            row_K=self.row_K[first:last] - start,
            position_K=self.position_K[first:last],
            target_K=self.target_K[first:last],
            behaviour_logprobs_K=self.behaviour_logprobs_K[first:last],
            advantages_K=self.advantages_K[first:last],
        )

    def micro_batches(self, max_padded_tokens: int) -> list["TrainBatch"]:
        """Consecutive rows; each micro-batch holds at most ``max_padded_tokens``
        (rows x its longest row) unless one row alone is longer."""
        batches, start, width = [], 0, 0
        for row, length in enumerate(self.row_lengths):
            if row > start and (row - start + 1) * max(width, length) > max_padded_tokens:
                batches.append(self.rows(start, row))
                start, width = row, 0
            width = max(width, length)
        batches.append(self.rows(start, self.num_rows))
        return batches

    def to(self, device: torch.device | str) -> "TrainBatch":
        moved = {name: getattr(self, name).to(device) for name in self._TENSORS}
        return TrainBatch(row_lengths=self.row_lengths, row_offsets=self.row_offsets, **moved)


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
    """Pack examples into rows by group and shared prompt (see ``TrainBatch``)."""
    if not examples:
        raise ValueError("build_batch needs at least one example")
    by_prompt: dict[tuple[int, tuple[int, ...]], list[SequenceExample]] = {}
    for example in examples:
        _check_example(example)
        by_prompt.setdefault((example.group, tuple(example.prompt_ids)), []).append(example)
    rows = [_pack_row(prompt, group) for (_, prompt), group in by_prompt.items()]
    B, L = len(rows), max(len(row.input_ids) for row in rows)
    input_ids_B_L = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids_B_L = torch.zeros((B, L), dtype=torch.long)
    # Padding attends to itself only: no all-masked query row, so no NaN anywhere.
    attend_B_L_L = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)
    tokens: dict[str, list] = {"row": [], "position": [], "target": [], "behaviour": [], "advantage": []}
    row_offsets = [0]
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids_B_L[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        position_ids_B_L[b, :n] = torch.tensor(row.positions, dtype=torch.long)
        attend_B_L_L[b, :n, :n] = row.attend_N_N
        for key, values in row.tokens.items():
            tokens[key].extend(values)
        tokens["row"].extend([b] * len(row.tokens["target"]))
        row_offsets.append(len(tokens["row"]))
    return TrainBatch(
        input_ids_B_L=input_ids_B_L,
        position_ids_B_L=position_ids_B_L,
        attend_B_L_L=attend_B_L_L,
        row_lengths=[len(row.input_ids) for row in rows],
        row_offsets=row_offsets,
        row_K=torch.tensor(tokens["row"], dtype=torch.long),
        position_K=torch.tensor(tokens["position"], dtype=torch.long),
        target_K=torch.tensor(tokens["target"], dtype=torch.long),
        behaviour_logprobs_K=torch.tensor(tokens["behaviour"], dtype=torch.float32),
        advantages_K=torch.tensor(tokens["advantage"], dtype=torch.float32),
    )


def _check_example(example: SequenceExample) -> None:
    if len(example.prompt_ids) == 0:
        raise ValueError("an example needs at least one prompt token (the first completion token is predicted from it)")
    if len(example.completion_ids) == 0:
        raise ValueError("an example needs at least one completion token")
    if len(example.behaviour_logprobs) != len(example.completion_ids):
        raise ValueError(f"{len(example.behaviour_logprobs)} behaviour logprobs for "
                         f"{len(example.completion_ids)} completion tokens")


@dataclass
class _PackedRow:
    input_ids: list[int]
    positions: list[int]
    attend_N_N: torch.Tensor
    tokens: dict[str, list]  # position, target, behaviour, advantage: one entry per completion token


def _pack_row(prompt: tuple[int, ...], group: list[SequenceExample]) -> _PackedRow:
    """``[prompt, c1[:-1], c2[:-1], ...]``: a completion's last token is only
    ever a target, never an input."""
    P = len(prompt)
    N = P + sum(len(e.completion_ids) - 1 for e in group)
    attend_N_N = torch.zeros((N, N), dtype=torch.bool)
    attend_N_N[:P, :P] = torch.ones((P, P), dtype=torch.bool).tril()
    input_ids, positions = list(prompt), list(range(P))
    tokens: dict[str, list] = {"position": [], "target": [], "behaviour": [], "advantage": []}
    for example in group:
        start, inputs = len(input_ids), list(example.completion_ids[:-1])
        span = slice(start, start + len(inputs))
        attend_N_N[span, :P] = True
        attend_N_N[span, span] = torch.ones((len(inputs), len(inputs)), dtype=torch.bool).tril()
        input_ids.extend(inputs)
        positions.extend(range(P, P + len(inputs)))
        # Token j of the completion is predicted at the position of token j-1 (the prompt's last for j=0).
        tokens["position"].extend([P - 1] + list(range(start, start + len(inputs))))
        tokens["target"].extend(example.completion_ids)
        tokens["behaviour"].extend(example.behaviour_logprobs)
        tokens["advantage"].extend([example.advantage] * len(example.completion_ids))
    return _PackedRow(input_ids, positions, attend_N_N, tokens)


def token_logprobs(logits_K_V: torch.Tensor, target_K: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) for each row of logits, in fp32, with the sampler's temperature."""
    logits_K_V = logits_K_V.float()
    if temperature != 1.0:
        logits_K_V = logits_K_V / temperature
    target_logits_K = logits_K_V.gather(-1, target_K.unsqueeze(-1)).squeeze(-1)
    return target_logits_K - torch.logsumexp(logits_K_V, dim=-1)


def attention_bias(attend_B_L_L: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean attention pattern as the additive ``(B, 1, L, L)`` mask a
    transformers model takes as a custom 4D ``attention_mask``."""
    bias_B_L_L = torch.zeros(attend_B_L_L.shape, dtype=dtype, device=attend_B_L_L.device)
    return bias_B_L_L.masked_fill_(~attend_B_L_L, torch.finfo(dtype).min).unsqueeze(1)


def model_logprobs(model, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
    """``token_logprobs`` of the batch's K completion tokens under ``model`` (a causal LM)."""
    dtype = model.get_input_embeddings().weight.dtype
    logits_B_L_V = model(input_ids=batch.input_ids_B_L, position_ids=batch.position_ids_B_L,
                         attention_mask=attention_bias(batch.attend_B_L_L, dtype)).logits
    return token_logprobs(logits_B_L_V[batch.row_K, batch.position_K], batch.target_K, temperature)


def reference_logprobs(peft_model, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the base model: the same PEFT model with its adapter
    disabled (no second copy of the model), without gradient."""
    with torch.no_grad(), peft_model.disable_adapter():
        return model_logprobs(peft_model, batch, temperature)


def kl_to_reference(logprobs_K: torch.Tensor, ref_logprobs_K: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): non-negative, zero
    exactly when the two agree, unbiased on samples from the policy."""
    log_ratio_K = ref_logprobs_K - logprobs_K
    return torch.exp(log_ratio_K) - log_ratio_K - 1.0


def policy_loss(
    logprobs_K: torch.Tensor,
    behaviour_logprobs_K: torch.Tensor,
    advantages_K: torch.Tensor,
    clip_eps: float,
    ref_logprobs_K: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    total_tokens: int | None = None,
) -> LossTerms:
    """Clipped-ratio policy-gradient loss (+ ``kl_coef`` * KL), mean over the
    K completion tokens. ``total_tokens`` (default K) is the denominator, so
    micro-batch losses add up to the full batch's mean."""
    num_tokens = logprobs_K.shape[0]
    denominator = float(total_tokens if total_tokens is not None else max(num_tokens, 1))
    ratio_K = torch.exp(logprobs_K - behaviour_logprobs_K)
    unclipped_K = ratio_K * advantages_K
    clipped_K = torch.clamp(ratio_K, 1.0 - clip_eps, 1.0 + clip_eps) * advantages_K
    policy_sum = -torch.minimum(unclipped_K, clipped_K).sum()
    loss = policy_sum / denominator
    kl_sum = 0.0
    if ref_logprobs_K is not None:
        kl_sum_t = kl_to_reference(logprobs_K, ref_logprobs_K).sum()
        loss = loss + kl_coef * kl_sum_t / denominator
        kl_sum = kl_sum_t.item()
    clipped_tokens = ((ratio_K - 1.0).abs() > clip_eps).sum().item()
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
    "group_advantages", "build_batch", "token_logprobs", "attention_bias", "model_logprobs", "reference_logprobs",
    "kl_to_reference", "policy_loss", "is_finite",
]
