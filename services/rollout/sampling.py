"""Sampling for the torch engine: every running row's next token in one
vectorized pass, whatever the mix of settings in the batch.

Reproducible per row regardless of batch mates: each row draws its uniform
from a counter-based hash of (row seed, token position) computed for the
whole batch at once, instead of a stateful generator per row. A row's seed
comes from its request's seed (reproducible) or from the OS (seed None).

Logprobs are those of the chosen token under the temperature-scaled full
distribution (before top-k/top-p), what the trainer recomputes; greedy rows
report the unscaled distribution's.

Shape suffixes: ``_B`` one per running row, ``_V`` one per vocabulary entry.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from shared.messages import SamplingParams

RNG_MODULUS = 2**31 - 1  # Lehmer modulus: products of 31-bit values stay inside int64
RNG_MULTIPLIERS = (48271, 69621, 16807)


@dataclass
class RowSampling:
    """Sampling settings of the running rows, aligned with the runner's rows."""

    inv_temp_B: torch.Tensor  # 1/T; 1 for greedy rows (their logprobs are the raw model's)
    greedy_B: torch.Tensor  # bool
    top_k_B: torch.Tensor  # V where no truncation
    top_p_B: torch.Tensor
    seed_B: torch.Tensor  # 31-bit row seeds

    @staticmethod
    def empty(device) -> "RowSampling":
        z = lambda dtype: torch.zeros(0, dtype=dtype, device=device)  # noqa: E731
        return RowSampling(z(torch.float32), z(torch.bool), z(torch.long), z(torch.float32), z(torch.long))

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], vocab: int, device) -> "RowSampling":
        temps = [p.temperature for p in params]
        return RowSampling(
            inv_temp_B=torch.tensor([1.0 / t if t > 0 else 1.0 for t in temps], device=device),
            greedy_B=torch.tensor([t == 0 for t in temps], device=device),
            top_k_B=torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device),
            # top_p 1 must keep every token: compare against inf, not a rounded cumsum
            top_p_B=torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=device),
            seed_B=torch.tensor(seeds, dtype=torch.long, device=device),
        )

    def cat(self, other: "RowSampling") -> "RowSampling":
        return RowSampling(*(torch.cat([a, b]) for a, b in zip(self._fields(), other._fields(), strict=True)))

    def select(self, order_B: torch.Tensor) -> "RowSampling":
        return RowSampling(*(t.index_select(0, order_B) for t in self._fields()))

    def _fields(self):
        return (self.inv_temp_B, self.greedy_B, self.top_k_B, self.top_p_B, self.seed_B)


@dataclass
class SamplingFlags:
    """Which sampling paths the current rows need (skips work none of them use)."""

    any_sampled: bool = False
    any_greedy: bool = False
    any_truncation: bool = False


def counter_uniform(seed_B: torch.Tensor, counter_B: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) per row from (seed, counter): a few Lehmer rounds
    with xor-shift mixing in int64 (all products stay below 2^63)."""
    m = RNG_MODULUS
    x = (seed_B * RNG_MULTIPLIERS[0] + (counter_B % m) * RNG_MULTIPLIERS[2] + 1) % m
    for multiplier in RNG_MULTIPLIERS[:2]:
        x = (x * multiplier) % m
        x = x ^ (x >> 11)
    x = (x * RNG_MULTIPLIERS[0]) % m
    return x.to(torch.float64).div_(m).to(torch.float32).clamp_(max=1.0 - 2**-24)


def sample_tokens(
    logits_B_V: torch.Tensor, rows: RowSampling, flags: SamplingFlags, counter_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], logprobs [B]): logprob of the chosen token under the
    temperature-scaled full distribution (before top-k/top-p); greedy rows
    report the unscaled distribution's logprob."""
    if not flags.any_sampled:
        tokens_B = logits_B_V.argmax(-1)
        return tokens_B, _gather(torch.log_softmax(logits_B_V, -1), tokens_B)
    logprobs_B_V = torch.log_softmax(logits_B_V * rows.inv_temp_B[:, None], -1)
    probs_B_V = logprobs_B_V.exp()
    u_B = counter_uniform(rows.seed_B, counter_B)
    if flags.any_truncation:
        sorted_B_V, order_B_V = probs_B_V.sort(-1, descending=True)
        rank_V = torch.arange(sorted_B_V.shape[-1], device=sorted_B_V.device)
        cum_B_V = sorted_B_V.cumsum(-1)
        keep = (rank_V[None] < rows.top_k_B[:, None]) & (cum_B_V - sorted_B_V < rows.top_p_B[:, None])
        cdf_B_V = (sorted_B_V * keep).cumsum(-1)
        pick_B = _search(cdf_B_V, u_B)
        tokens_B = order_B_V.gather(1, pick_B[:, None])[:, 0]
    else:
        tokens_B = _search(probs_B_V.cumsum(-1), u_B)
    if flags.any_greedy:
        tokens_B = torch.where(rows.greedy_B, logits_B_V.argmax(-1), tokens_B)
    return tokens_B, _gather(logprobs_B_V, tokens_B)


def _search(cdf_B_V: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    target = (u_B * cdf_B_V[:, -1])[:, None]
    return torch.searchsorted(cdf_B_V, target, right=True)[:, 0].clamp_(max=cdf_B_V.shape[-1] - 1)


def _gather(values_B_V: torch.Tensor, index_B: torch.Tensor) -> torch.Tensor:
    return values_B_V.gather(1, index_B[:, None])[:, 0]


def flags_for(params: list[SamplingParams]) -> SamplingFlags:
    """The sampling paths that rows with ``params`` need."""
    return SamplingFlags(
        any_sampled=any(p.temperature > 0 for p in params),
        any_greedy=any(p.temperature == 0 for p in params),
        any_truncation=any(p.top_k > 0 or p.top_p < 1.0 for p in params if p.temperature > 0),
    )


def row_seeds(sampling: SamplingParams) -> list[int]:
    """One 31-bit seed per sample: derived from the request seed (reproducible)
    or drawn from the OS (seed None)."""
    if sampling.seed is None:  # one read of the OS's randomness for all of them
        drawn = os.urandom(4 * sampling.n)
        return [int.from_bytes(drawn[4 * i:4 * i + 4], "little") & 0x7FFFFFFF for i in range(sampling.n)]
    return [random.Random(sampling.seed * 1_000_003 + i).getrandbits(31) for i in range(sampling.n)]
