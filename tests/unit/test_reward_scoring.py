"""Built-in rewards, the HTTP reward protocol's pure parts (allowlist, reply
parsing, retry classification) and the worker helper's result shaping."""

from __future__ import annotations

import asyncio

import pytest

from services.reward.http_client import parse_reply, request_body
from services.reward.scoring import RewardError, SampleScore, apply_invert, check_reward_value, score_builtin
from services.reward.worker import combine_scores, score_with_function, to_sample_score
from shared.deployment import parse_allowlist, refusal_reason
from shared.messages import Completion, Prompt, PromptResult, RewardSpec, RewardTerm, Sample


def _completion(texts, answer="42") -> Completion:
    return Completion(
        request_id="exp-a:s0", experiment_id="exp-a", step=0, purpose="train",
        results=[PromptResult(
            prompt=Prompt(prompt_id="p0", text="40+2=", answer=answer), prompt_token_ids=[1, 2],
            samples=[Sample(token_ids=[3], logprobs=[-0.1], text=t, finish_reason="stop") for t in texts])],
        adapter_version=0, reward=RewardSpec(type="exact_match"),
    )


# ---------------------------------------------------------------- built-in


def test_exact_match_strips_and_compares():
    spec = RewardSpec(type="exact_match")
    assert score_builtin(spec, " 42\n", "42") == SampleScore(reward=1.0, correct=True)
    assert score_builtin(spec, "43", "42") == SampleScore(reward=0.0, correct=False)


def test_regex_searches():
    spec = RewardSpec(type="regex", pattern=r"^\d+$")
    assert score_builtin(spec, "123", None).reward == 1.0
    assert score_builtin(spec, "12a", None).reward == 0.0


def test_regex_runs_in_linear_time_with_the_right_verdict():
    # Python's re backtracks exponentially on this pair (27 characters took 24 s
    # with the GIL held); RE2 answers at once, with re's verdict.
    spec = RewardSpec(type="regex", pattern=r"(\w+\s?)+$")
    assert score_builtin(spec, "a" * 64 + "!", None) == SampleScore(reward=0.0, correct=False)
    assert score_builtin(spec, "a" * 64 + " b", None) == SampleScore(reward=1.0, correct=True)


@pytest.mark.parametrize("pattern", [r"(a)\1", r"a(?=b)", r"(?<!x)a"])
def test_regex_features_that_need_backtracking_are_refused_with_the_reason(pattern):
    # Backreferences and lookaround are what RE2 leaves out to stay linear;
    # a backtracking engine would accept them, so this fails if `re` came back.
    with pytest.raises(RewardError, match="RE2") as info:
        score_builtin(RewardSpec(type="regex", pattern=pattern), "aab", None)
    assert repr(pattern) in info.value.reason  # the reason names the pattern


def test_family_uses_the_task_verifier():
    spec = RewardSpec(type="family", family="add")
    assert score_builtin(spec, "42", "42").correct is True
    assert score_builtin(spec, "41", "42").correct is False


@pytest.mark.parametrize("spec, answer, needle", [
    (RewardSpec(type="family", family="no-such-family"), "1", "unknown task family"),
    (RewardSpec(type="family", family="add"), None, "answer"),
    (RewardSpec(type="exact_match"), None, "answer"),
    (RewardSpec(type="regex", pattern="(unclosed"), None, "invalid regex"),
    (RewardSpec(type="regex"), None, "pattern"),
])
def test_unscorable_specs_say_why(spec, answer, needle):
    with pytest.raises(RewardError, match=needle):
        score_builtin(spec, "x", answer)


def test_math_reads_the_final_answer_against_the_reference():
    spec = RewardSpec(type="math")
    assert score_builtin(spec, "3 boxes of 4: 12. #### 12", "#### 12") == SampleScore(
        reward=1.0, correct=True, metrics={"answer_found": 1.0})
    assert score_builtin(spec, "\\boxed{1,200}", "1200").correct is True
    assert score_builtin(spec, "I am not sure", "12") == SampleScore(
        reward=0.0, correct=False, metrics={"answer_found": 0.0})


def test_format_checks_the_answer_marker_or_a_pattern_without_a_verdict():
    assert score_builtin(RewardSpec(type="format"), "so #### 7", None) == SampleScore(reward=1.0)
    assert score_builtin(RewardSpec(type="format"), "so 7", None) == SampleScore(reward=0.0)
    tagged = RewardSpec(type="format", pattern=r"<answer>\d+</answer>$")
    assert score_builtin(tagged, "... <answer>7</answer>", None) == SampleScore(reward=1.0)
    assert score_builtin(tagged, "... 7", None).reward == 0.0


def test_a_sum_weights_its_terms_and_takes_the_verifier_verdict():
    spec = RewardSpec(type="sum", terms=[RewardTerm(type="format", weight=0.25), RewardTerm(type="math", weight=1.0),
                                         RewardTerm(type="regex", pattern="^Let", weight=-0.5)])
    right_and_marked = score_builtin(spec, "Let x be 12. #### 12", "12")
    assert right_and_marked == SampleScore(reward=0.25 + 1.0 - 0.5, correct=True, metrics={
        "term0_format": 1.0, "term1_math": 1.0, "term2_regex": 1.0})
    wrong_unmarked = score_builtin(spec, "it is 13", "12")
    assert wrong_unmarked.reward == 0.0 and wrong_unmarked.correct is False
    no_verifier = RewardSpec(type="sum", terms=[RewardTerm(type="format")])
    assert score_builtin(no_verifier, "#### 3", None).correct is None


@pytest.mark.parametrize("spec, answer, needle", [
    (RewardSpec(type="math"), None, "math needs the prompt's answer"),
    (RewardSpec(type="math"), "forty-two", "holds no number"),
    (RewardSpec(type="sum"), "1", "needs reward.terms"),
    (RewardSpec(type="sum", terms=[RewardTerm(type="regex")]), "1", "pattern"),
    (RewardSpec(type="format", pattern="(unclosed"), None, "invalid regex"),
])
def test_unscorable_math_format_and_sum_say_why(spec, answer, needle):
    with pytest.raises(RewardError, match=needle):
        score_builtin(spec, "#### 1", answer)


def test_invert_flips_reward_but_keeps_the_verdict():
    assert apply_invert(SampleScore(reward=1.0, correct=True), True) == SampleScore(reward=0.0, correct=True)
    assert apply_invert(SampleScore(reward=0.0, correct=False), False).reward == 0.0


# ---------------------------------------------------------------- http protocol


ALLOW = parse_allowlist("http://127.0.0.1:8088/score, https://rewards.example.com/")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8088/score", "http://127.0.0.1:8088/score/v2", "https://rewards.example.com/any",
    "https://rewards.example.com:443/x",
])
def test_allowlisted_urls(url):
    assert refusal_reason(url, ALLOW) is None


@pytest.mark.parametrize("url, needle", [
    ("http://127.0.0.1:8089/score", "allowlist"),            # other port
    ("http://127.0.0.1:8088/scoreboard", "allowlist"),        # not at a path boundary
    ("http://127.0.0.1:8088.evil.com/score", "valid URL"),   # prefix trick on the host
    ("http://rewards.example.com/x", "allowlist"),           # other scheme
    ("http://rewards.example.com.evil.com/", "allowlist"),   # prefix trick on the name
    ("http://u:p@127.0.0.1:8088/score", "credentials"),
    ("file:///etc/passwd", "http(s)"),
    ("http://[::1/score", "valid URL"),                      # unbalanced IPv6 bracket: a reason, not a crash
    ("http://127.0.0.1:8088/score/../admin", "'..' path"),   # resolves to /admin, outside the prefix
    ("http://127.0.0.1:8088/score/%2E%2E/admin", "'..' path"),  # the same, percent-encoded
])
def test_refused_urls_say_why(url, needle):
    reason = refusal_reason(url, ALLOW)
    assert reason is not None and needle in reason


def test_empty_allowlist_refuses_everything():
    assert "empty" in refusal_reason("http://127.0.0.1:8088/score", [])


def test_request_body_is_the_documented_one():
    body = request_body(_completion(["41", "42"]), 0, 1)
    assert body == {"experiment_id": "exp-a", "request_id": "exp-a:s0", "prompt": "40+2=",
                    "answer": "42", "completion": "42", "sample_index": 1, "prompt_index": 0}


def test_good_reply():
    reply = parse_reply(200, b'{"reward": 0.5, "metrics": {"len": 3}, "correct": false}')
    assert (reply.reward, reply.metrics, reply.correct) == (0.5, {"len": 3.0}, False)


@pytest.mark.parametrize("status, body, retryable", [
    (200, b"not json", False),
    (200, b'{"score": 1}', False),
    (200, b'{"reward": "high"}', False),
    (200, b'{"reward": NaN}', False),
    (200, b'{"reward": Infinity}', False),
    (200, b'{"reward": -Infinity}', False),
    (200, b'{"reward": 1e999}', False),
    (200, b'{"reward": "inf"}', False),
    (200, b'{"reward": 1' + b"0" * 400 + b'}', False),
    (200, b'{"reward": 1, "metrics": {"m": NaN}}', False),
    (200, b'{"reward": 1, "metrics": [1]}', False),
    (404, b"", False),
    (429, b"slow down", True),
    (503, b"", True),
])
def test_bad_replies_are_classified(status, body, retryable):
    with pytest.raises(RewardError) as info:
        parse_reply(status, body)
    assert info.value.retryable is retryable


# ---------------------------------------------------------------- worker helper


def test_function_results_become_scores():
    assert to_sample_score(True) == SampleScore(reward=1.0, correct=True)
    assert to_sample_score(0.25) == SampleScore(reward=0.25)
    assert to_sample_score({"reward": 1, "correct": True, "metrics": {"m": 2}}).metrics == {"m": 2.0}
    with pytest.raises(RewardError):
        to_sample_score("yes")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10 ** 400, "1.0", None])
def test_rewards_that_are_not_finite_numbers_are_refused(value):
    with pytest.raises(RewardError, match="finite|number"):
        check_reward_value(value)
    with pytest.raises(RewardError):
        to_sample_score({"reward": 1.0, "metrics": {"m": value}})


def test_a_function_returning_nan_marks_the_result():
    [score] = asyncio.run(score_with_function(lambda p, c, a: float("nan"), _completion(["a"]))).scores
    assert score.rewards == [0.0] and "finite" in score.reward_error


def test_metrics_are_averaged_over_samples():
    scored = combine_scores([SampleScore(1.0, None, {"m": 1.0}), SampleScore(0.0, None, {"m": 3.0})])
    assert scored.rewards == [1.0, 0.0] and scored.reward_metrics == {"m": 2.0}


def test_a_raising_function_marks_the_result():
    def broken(prompt, completion, answer):
        raise ZeroDivisionError("oops")

    [score] = asyncio.run(score_with_function(broken, _completion(["a", "b"]))).scores
    assert score.rewards == [0.0, 0.0]
    assert "ZeroDivisionError" in score.reward_error
