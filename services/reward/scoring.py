"""Built-in rewards: the task families' verifiers, exact match, regex, the
math verifier, the format reward, and weighted sums of them.

Each scorer turns one sample's text (plus the prompt's reference answer) into
a ``SampleScore``: a reward in [0, 1] and, where the scorer is a verifier, a
``correct`` verdict. ``invert`` (``RewardSpec.invert``) rewards the opposite:
it maps the reward r to 1 - r but leaves ``correct`` alone: ``correct`` is
always the verifier's verdict on the task. The scheduler flips it for an
inverted reward when it counts the experiment's successes
(``services.scheduler.outgoing.sample_successes``).

A scorer that cannot score (unknown family, missing answer, bad pattern)
raises ``RewardError`` with a reason a user can act on.

``sum`` adds its terms' rewards, each times its weight; its ``correct`` is
that of its verifier term (``VERIFIER_TYPES``, at most one: the scheduler
checks it), and ``metrics`` holds each term's reward as ``term<i>_<type>``.

Regex rewards are a user's pattern: they run through
``shared.patterns.compile_pattern`` (RE2, matching time linear in the text),
never Python's backtracking ``re``, which holds the GIL for as long as one
pattern backtracks and so would freeze every tenant's scoring. A pattern RE2
cannot take fails the group with RE2's reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.reward import math_verifier
from shared.messages import RewardSpec, RewardTerm
from shared.patterns import PatternError, compile_pattern

BUILTIN_TYPES = ("family", "exact_match", "regex", "math", "format", "sum")
VERIFIER_TYPES = ("family", "exact_match", "math")  # a sum's verdict comes from its term of these


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
    if spec.type == "sum":
        return _score_sum(spec.terms, text, answer)
    return _score_one(spec.type, spec.family, spec.pattern, spec.tolerance, text, answer)


def score_term(term: RewardTerm, text: str, answer: str | None) -> SampleScore:
    """One term of a ``sum`` (its weight not applied)."""
    return _score_one(term.type, term.family, term.pattern, term.tolerance, text, answer)


def _score_one(kind: str, family: str | None, pattern: str | None, tolerance: float,
               text: str, answer: str | None) -> SampleScore:
    if kind == "family":
        return _score_family(family, text, answer)
    if kind == "exact_match":
        return _score_exact_match(text, answer)
    if kind == "regex":
        return _score_regex(pattern, text)
    if kind == "math":
        return _score_math(text, answer, tolerance)
    if kind == "format":
        return _score_format(pattern, text)
    raise RewardError(f"reward type {kind!r} is not a built-in verifier")


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


def _score_math(text: str, answer: str | None, tolerance: float) -> SampleScore:
    if answer is None:
        raise RewardError("math needs the prompt's answer; it is missing")
    try:
        verdict = math_verifier.verify(text, answer, tolerance)
    except ValueError as exc:
        raise RewardError(f"math: {exc}") from None
    return SampleScore(reward=float(verdict.correct), correct=verdict.correct,
                       metrics={"answer_found": float(verdict.predicted is not None)})


def _score_format(pattern: str | None, text: str) -> SampleScore:
    """Not a verdict on the task: ``correct`` stays None."""
    if pattern:
        return SampleScore(reward=_score_regex(pattern, text).reward)
    return SampleScore(reward=float(math_verifier.has_answer_marker(text)))


def _score_sum(terms: list[RewardTerm] | None, text: str, answer: str | None) -> SampleScore:
    if not terms:
        raise RewardError("reward type 'sum' needs reward.terms (one or more)")
    reward, correct, metrics = 0.0, None, {}
    for index, term in enumerate(terms):
        score = score_term(term, text, answer)
        reward += term.weight * score.reward
        metrics[f"term{index}_{term.type}"] = score.reward
        if term.type in VERIFIER_TYPES and correct is None:
            correct = score.correct
    if not math.isfinite(reward):
        raise RewardError(f"the weighted sum of the terms is not finite ({reward})")
    return SampleScore(reward=reward, correct=correct, metrics=metrics)
