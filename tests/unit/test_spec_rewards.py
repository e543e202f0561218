"""Submission rules for the math, format and sum rewards, stop strings and
``max_tokens`` against the model's context, with the reasons they give."""

from __future__ import annotations

import pytest

from services.scheduler.spec import (
    SpecFileError,
    SpecLimits,
    convert_spec,
    held_out_size,
    reward_has_verdict,
    reward_needs_answer,
    validate_spec,
)
from shared.client import spec_limits
from shared.deployment import DeploymentInfo
from shared.messages import ExperimentSpec, Prompt, RewardSpec, RewardTerm, TaskSource

FAMILIES = ("add", "sub")
LIMITS = SpecLimits(deployment_rank=8, max_tokens_limit=4096, max_model_len=64)
PROMPTS = [Prompt(prompt_id=f"p{i}", text=f"{i}+{i}=", answer=str(2 * i)) for i in range(6)]
MATH_AND_FORMAT = [RewardTerm(type="math"), RewardTerm(type="format", weight=0.1)]


def spec(**overrides) -> ExperimentSpec:
    fields = dict(experiment_id="exp-1", task=TaskSource(prompts=PROMPTS), reward=RewardSpec(type="math"),
                  max_tokens=16)
    fields.update(overrides)
    return ExperimentSpec(**fields)


def reasons(s: ExperimentSpec, limits: SpecLimits = LIMITS) -> list[str]:
    return validate_spec(s, limits, FAMILIES)


@pytest.mark.parametrize("reward", [
    RewardSpec(type="math"),
    RewardSpec(type="math", tolerance=0.0),
    RewardSpec(type="format"),
    RewardSpec(type="format", pattern=r"#### -?\d+$"),
    RewardSpec(type="sum", terms=MATH_AND_FORMAT),
    RewardSpec(type="sum", terms=[RewardTerm(type="family", family="add"), RewardTerm(type="regex", pattern="^\\d",
                                                                                      weight=-0.5)]),
])
def test_valid_rewards(reward):
    assert reasons(spec(reward=reward)) == []


@pytest.mark.parametrize("reward, reason", [
    (RewardSpec(type="math", tolerance=float("nan")), "reward.tolerance: must be in [0, 1) (got nan)"),
    (RewardSpec(type="math", tolerance=1.0), "reward.tolerance: must be in [0, 1)"),
    (RewardSpec(type="format", pattern="(unclosed"), "reward.pattern: "),
    (RewardSpec(type="sum"), "reward.terms: give 1 to 8 terms for reward type 'sum' (got 0)"),
    (RewardSpec(type="sum", terms=[]), "reward.terms: give 1 to 8 terms"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="format")] * 9),
     "reward.terms: give 1 to 8 terms for reward type 'sum' (got 9)"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="math", weight=float("inf"))]),
     "reward.terms[0].weight: must be a finite number (got inf)"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="format"), RewardTerm(type="math", weight=float("nan"))]),
     "reward.terms[1].weight: must be a finite number (got nan)"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="math"), RewardTerm(type="exact_match")]),
     "reward.terms: at most one verifier term (family, exact_match, math), whose verdict is the sum's "
     "(got terms [0, 1])"),
    (RewardSpec(type="sum", terms=MATH_AND_FORMAT, invert=True), "reward.invert: not for reward type 'sum'"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="family")]), "reward.terms[0].family: a known family is required"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="family", family="nope")]), "reward.terms[0].family: "),
    (RewardSpec(type="sum", terms=[RewardTerm(type="regex")]),
     "reward.terms[0].pattern: required for reward type 'regex'"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="math", tolerance=-1.0)]),
     "reward.terms[0].tolerance: must be in [0, 1) (got -1.0)"),
    (RewardSpec(type="math", terms=MATH_AND_FORMAT), "reward.terms: only for reward type 'sum' (got type 'math')"),
])
def test_bad_rewards_are_refused_with_the_reason(reward, reason):
    found = reasons(spec(reward=reward))
    assert any(r.startswith(reason) for r in found), found


@pytest.mark.parametrize("reward", [RewardSpec(type="math"), RewardSpec(type="sum", terms=MATH_AND_FORMAT)])
def test_a_math_reward_needs_every_inline_prompt_answered(reward):
    unanswered = [*PROMPTS, Prompt(prompt_id="q", text="2+2=")]
    assert reasons(spec(reward=reward, task=TaskSource(prompts=unanswered))) == [
        "reward.type: 'math' needs an answer for every prompt (task.prompts[6] has none)"]
    assert reward_needs_answer(reward)
    assert not reward_needs_answer(RewardSpec(type="sum", terms=[RewardTerm(type="format")]))


def test_held_out_accuracy_needs_a_verdict():
    assert held_out_size(spec(reward=RewardSpec(type="math"), eval_size=2)) == 2
    assert held_out_size(spec(reward=RewardSpec(type="sum", terms=MATH_AND_FORMAT), eval_size=2)) == 2
    format_only = RewardSpec(type="sum", terms=[RewardTerm(type="format")])
    assert not reward_has_verdict(format_only) and held_out_size(spec(reward=format_only, eval_size=2)) == 0
    assert not reward_has_verdict(RewardSpec(type="format"))


def test_max_tokens_must_leave_room_for_a_prompt_in_the_context():
    assert reasons(spec(max_tokens=63)) == []
    assert reasons(spec(max_tokens=64)) == [
        "max_tokens: 64 does not fit the model's context of 64 tokens with a prompt (at most 63)"]
    unknown_context = SpecLimits(max_tokens_limit=4096, max_model_len=0)
    assert reasons(spec(max_tokens=2000, group_size=2), unknown_context) == []


def test_the_client_checks_the_context_the_deployment_publishes():
    limits = spec_limits(DeploymentInfo(max_model_len=32))
    assert limits.max_model_len == 32
    assert any(r.startswith("max_tokens: 40 does not fit the model's context of 32")
               for r in validate_spec(spec(max_tokens=40), limits, FAMILIES))


@pytest.mark.parametrize("stop, reason", [
    ([""], "stop[0]: must be 1 to 64 characters long (got 0)"),
    (["ok", "x" * 65], "stop[1]: must be 1 to 64 characters long (got 65)"),
    ([str(i) for i in range(9)], "stop: at most 8 stop strings (got 9)"),
])
def test_bad_stop_strings_are_refused(stop, reason):
    assert reason in reasons(spec(stop=stop))


def test_stop_strings_and_terms_read_from_a_spec_file():
    data = {"experiment_id": "gsm", "task": {"prompts": [{"text": "1+1=", "answer": "2"}]},
            "reward": {"type": "sum", "terms": [{"type": "math"}, {"type": "format", "weight": 0.2}]},
            "stop": ["\n\n", "Question:"]}
    parsed = convert_spec(data)
    assert parsed.stop == ["\n\n", "Question:"]
    assert parsed.reward.terms == [RewardTerm(type="math"), RewardTerm(type="format", weight=0.2)]
    data["reward"]["terms"].append({"type": "http"})
    with pytest.raises(SpecFileError, match=r"reward.terms\[2\].type"):
        convert_spec(data)
    data["reward"]["terms"][2] = {"type": "sum", "terms": []}  # no nesting: a term has no terms
    with pytest.raises(SpecFileError, match="terms"):
        convert_spec(data)
