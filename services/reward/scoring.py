"""Built-in rewards: the task families' verifiers, exact match and regex.

Each scorer turns one sample's text (plus the prompt's reference answer) into
a ``SampleScore``: a reward in [0, 1] and, where the scorer is a verifier, a
``correct`` verdict. ``invert`` (``RewardSpec.invert``) rewards the opposite:
it maps the reward r to 1 - r but leaves ``correct`` alone: ``correct`` is
always the verifier's verdict on the task. The scheduler flips it for an
inverted reward when it counts the experiment's successes
(``services.scheduler.outgoing.sample_successes``).

A scorer that cannot score (unknown family, missing answer, bad pattern)
raises ``RewardError`` with a reason a user can act on.

Regex rewards are a user's pattern: they run through
``shared.patterns.compile_pattern`` (RE2, matching time linear in the text),
never Python's backtracking ``re``, which holds the GIL for as long as one
pattern backtracks and so would freeze every tenant's scoring. A pattern RE2
cannot take fails the group with RE2's reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.messages import RewardSpec
from shared.patterns import PatternError, compile_pattern

BUILTIN_TYPES = ("family", "exact_match", "regex")


class RewardError(Exception):
    """Scoring failed; ``reason`` says why (shown on the experiment's events).
    ``retryable`` says whether trying the same call again may succeed."""

    def __init__(self, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass
class SampleScore:
    reward: float
    correct: bool | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def score_builtin(spec: RewardSpec, text: str, answer: str | None) -> SampleScore:
    """Score one sample with a built-in reward (without ``invert``)."""
    if spec.type == "family":
        return _score_family(spec.family, text, answer)
    if spec.type == "exact_match":
        return _score_exact_match(text, answer)
    if spec.type == "regex":
        return _score_regex(spec.pattern, text)
    raise RewardError(f"reward type {spec.type!r} is not a built-in verifier")


def apply_invert(score: SampleScore, invert: bool) -> SampleScore:
    if not invert:
        return score
    return SampleScore(reward=1.0 - score.reward, correct=score.correct, metrics=score.metrics)


def check_reward_value(value: object) -> float:
    """A reward a service replied with, as a finite float (bools count as 0/1).
    NaN and infinities are refused: one of them would turn the group's
    advantages, and so the whole train step, into NaN."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise RewardError(f"reward must be a number, got {type(value).__name__}")
    try:
        reward = float(value)
    except OverflowError:  # an integer too large for a float, e.g. JSON 1 followed by 400 zeros
        raise RewardError("reward must be finite, got an integer too large for a float") from None
    if not math.isfinite(reward):
        raise RewardError(f"reward must be finite, got {reward}")
    return reward


def _score_family(family_name: str | None, text: str, answer: str | None) -> SampleScore:
    if not family_name:
        raise RewardError("reward type 'family' needs reward.family")
    if answer is None:
        raise RewardError(f"family {family_name!r} verifier needs the prompt's answer; it is missing")
    from shared.tasks import get_family  # the task module is only needed for this reward type

    try:
        family = get_family(family_name)
    except KeyError as exc:
        raise RewardError(f"unknown task family {family_name!r}: {exc}") from None
    correct = bool(family.verify(text, answer))
    return SampleScore(reward=float(correct), correct=correct)


def _score_exact_match(text: str, answer: str | None) -> SampleScore:
    if answer is None:
        raise RewardError("exact_match needs the prompt's answer; it is missing")
    correct = text.strip() == answer.strip()
    return SampleScore(reward=float(correct), correct=correct)


def _score_regex(pattern: str | None, text: str) -> SampleScore:
    if not pattern:
        raise RewardError("reward type 'regex' needs reward.pattern")
    try:
        compiled = compile_pattern(pattern)  # RE2, cached: see the module doc
    except PatternError as exc:
        raise RewardError(f"invalid regex {pattern!r}: {exc}") from None
    matched = compiled.search(text) is not None
    return SampleScore(reward=float(matched), correct=matched)
