"""The scheduler's pure core, driven synchronously: no Redis, no clock, no
sleeps. Each test feeds inputs (submissions, scored groups, announcements,
dead letters, stall checks) and reads the returned ``Effects``."""

from __future__ import annotations

import math

import msgspec
import pytest

from services.scheduler import owners
from services.scheduler.core import SchedulerCore, SchedulerRules
from services.scheduler.dispatch import Dispatcher
from services.scheduler.effects import Effects
from services.scheduler.state import Keys, StoredRecord, _view_from_hash, encode_spec
from shared import messages
from shared.bus import DeadLetter
from shared.messages import (
    AdapterPublished,
    Completion,
    ExperimentSpec,
    Prompt,
    PromptResult,
    PromptScore,
    RewardSpec,
    RolloutRequest,
    Sample,
    ScoredCompletion,
    StepMetrics,
    TaskPush,
    TaskSource,
    TrainJob,
    TrainStats,
)

PREFIX = "t:"
NOW = 1_000.0
OWNER = "owner-secret-of-the-tenant-0123456789"
OTHER = "another-tenants-secret-0123456789"


def make_spec(experiment_id: str, **overrides) -> ExperimentSpec:
    fields = dict(experiment_id=experiment_id, task=TaskSource(family="add"),
                  reward=RewardSpec(type="family", family="add"), steps=3, prompts_per_step=2,
                  group_size=2, eval_size=0)
    fields.update(overrides)
    return ExperimentSpec(**fields)


def inline_spec(experiment_id: str, count: int = 10, **overrides) -> ExperimentSpec:
    prompts = [Prompt(prompt_id=f"q{i}", text=f"question {i}", answer=str(i)) for i in range(count)]
    return make_spec(experiment_id, task=TaskSource(prompts=prompts),
                     reward=RewardSpec(type="exact_match"), **overrides)


def scored_for(request: RolloutRequest, rewards: list[float], correct: bool | None = None,
               error: str | None = None, first: int | None = None,
               correct_each: list[bool] | None = None) -> ScoredCompletion:
    """Every prompt of ``request`` scored alike (``first``: only its first
    prompts, as a partial reply; ``correct_each``: prompt i's verdict);
    ``error``: the whole request failed."""
    samples = [] if error else [Sample(token_ids=[1], logprobs=[-0.1], text="x", finish_reason="stop")
                                for _ in rewards]
    results = [PromptResult(prompt=prompt, prompt_token_ids=[1], samples=samples)
               for prompt in request.prompts[:first]]
    completion = Completion(request_id=request.request_id, experiment_id=request.experiment_id, step=request.step,
                            purpose=request.purpose, results=results, adapter_version=request.adapter_version,
                            reward=request.reward, error=error)
    verdicts = [correct] * len(rewards) if correct is not None else []
    scores = [PromptScore(rewards=[] if error else rewards, correct=verdicts)] * len(results)
    if correct_each is not None:
        scores = [PromptScore(rewards=rewards, correct=[verdict] * len(rewards)) for verdict in correct_each]
    return ScoredCompletion(completion=completion, scores=scores)


class Harness:
    """A core plus the plain bookkeeping a test needs to play rollout, reward
    and trainer: every effect is kept, in order."""

    def __init__(self, **rules) -> None:
        self.keys = Keys(PREFIX)
        self.core = SchedulerCore(self.keys, SchedulerRules(**rules))
        self.now = NOW
        self.log: list[Effects] = []

    def _keep(self, effects: Effects) -> Effects:
        self.log.append(effects)
        self.now += 1.0
        return effects

    def submit(self, spec: ExperimentSpec, stored: StoredRecord = StoredRecord(), pushed=(), entry="1-0",
               allowlist=(), owner: str | None = OWNER, early_owner: str | None = None) -> Effects:
        return self._keep(self.core.submit(spec, entry_id=entry, stored=stored, allowlist=list(allowlist),
                                           stream_prompts=list(pushed), now=self.now, owner_secret=owner,
                                           early_owner=early_owner))

    def cancel(self, experiment_id: str, owner: str | None = OWNER, stored_status: str | None = None,
               admin: bool = False) -> Effects:
        return self._keep(self.core.cancel(experiment_id, stored_status=stored_status, now=self.now,
                                           owner_secret=owner, admin=admin))

    def push(self, experiment_id: str, prompts: list[Prompt], owner: str | None = OWNER,
             stored_status: str | None = None, early_owner: str | None = None, admin: bool = False) -> Effects:
        return self._keep(self.core.push_tasks(TaskPush(experiment_id=experiment_id, prompts=prompts,
                                                        owner_secret=owner),
                                               stored_status=stored_status, stored_prompt_ids=set(), now=self.now,
                                               early_owner=early_owner, admin=admin))

    def score(self, request: RolloutRequest, rewards=(1.0, 0.0), **kwargs) -> Effects:
        return self._keep(self.core.collect(scored_for(request, list(rewards), **kwargs), self.now))

    def announce(self, job: TrainJob, *, rejection: str | None = None, skipped: bool = False) -> Effects:
        version = job.base_version + 1
        published = AdapterPublished(experiment_id=job.experiment_id, version=version, step=job.step,
                                     path=f"/adapters/{job.experiment_id}/v{version}", digest="d",
                                     stats=TrainStats(train_s=2.0, skipped_update=skipped,
                                                      skip_reason="nan loss" if skipped else None))
        path = None if rejection else published.path
        return self._keep(self.core.advance(published, path, rejection, self.now))

    def requests(self, effects: Effects, purpose: str = "train") -> list[RolloutRequest]:
        return [r for r in effects.published(RolloutRequest) if r.purpose == purpose]

    def jobs(self, effects: Effects) -> list[TrainJob]:
        return effects.published(TrainJob)

    def score_all(self, effects: Effects, purpose: str = "train", **kwargs) -> Effects:
        """Score every request of ``effects``; the effects of all, merged."""
        merged = Effects()
        for request in self.requests(effects, purpose):
            merged.extend(self.score(request, **kwargs))
        return merged

    def all_events(self, experiment_id: str) -> list[str]:
        return [code for effects in self.log for code in effects.event_codes(experiment_id)]


def run_to_end(h: Harness, spec: ExperimentSpec, **announce) -> list[Effects]:
    """Drive an experiment on-policy to its end; the effects of each round."""
    rounds = [h.submit(spec)]
    for _ in range(spec.steps):
        scored = h.score_all(rounds[-1])
        [job] = h.jobs(scored)
        rounds.append(scored)
        announced = h.announce(job, **announce)
        announced.extend(h.score_all(announced, purpose="eval"))
        rounds.append(announced)
    return rounds


# ---------------------------------------------------------------- submit / admit


def test_submit_queues_admits_and_issues_step_zero():
    h = Harness()
    effects = h.submit(make_spec("a"))
    assert effects.event_codes("a") == ["queued", "admitted"]
    assert effects.fields["a"]["status"] == "running"
    assert effects.fields["a"]["issued"] == 1 and "issued_at:0" in effects.fields["a"]
    requests = h.requests(effects)
    assert [r.request_id for r in requests] == ["a:s0"] and len(requests[0].prompts) == 2  # one per step
    assert all(r.adapter_version == 0 and r.adapter_path is None and r.sampling.n == 2 for r in requests)
    assert ("sadd", h.keys.active, ("a",)) in [(w.command, w.key, w.args) for w in effects.writes]


def test_admission_queues_beyond_max_concurrent_and_admits_when_one_ends():
    h = Harness(max_concurrent=1)
    h.submit(make_spec("a"))
    second = h.submit(make_spec("b"))
    assert second.event_codes("b") == ["queued"] and h.core.queue == ["b"]
    cancelled = h.cancel("a")
    assert cancelled.event_codes("a") == ["cancelled"]
    assert cancelled.event_codes("b") == ["admitted"]
    assert [r.request_id for r in h.requests(cancelled)] == ["b:s0"]


def test_invalid_spec_is_recorded_invalid_and_never_admitted():
    h = Harness()
    effects = h.submit(make_spec("bad", steps=0))
    assert effects.event_codes("bad") == ["invalid_spec"]
    assert effects.fields["bad"]["status"] == "invalid" and not effects.published(RolloutRequest)
    assert "bad" not in h.core.views


def test_invalid_id_gets_an_event_and_no_key():
    h = Harness()
    effects = h.submit(make_spec("victim:s0"))
    assert effects.event_codes("victim:s0") == ["invalid_spec"]
    assert not effects.fields and not effects.writes


def test_redelivered_entry_changes_nothing_but_another_submission_is_a_duplicate():
    h = Harness()
    spec = make_spec("twice")
    stored = StoredRecord(status="running", submit_entry="1-0", spec=encode_spec(spec))
    assert h.submit(spec, stored=stored, entry="1-0").empty
    duplicate = h.submit(spec, stored=stored, entry="2-0")
    assert duplicate.event_codes("twice") == ["duplicate_experiment"] and not duplicate.fields
    # a record without an entry id: only the spec tells a redelivery
    assert h.submit(spec, stored=StoredRecord(status="queued", spec=encode_spec(spec)), entry=None).empty


def test_a_corrected_spec_replaces_a_refused_one():
    h = Harness()
    effects = h.submit(make_spec("fixed"), stored=StoredRecord(status="invalid", submit_entry="1-0"), entry="2-0")
    assert effects.writes[0].command == "delete" and effects.writes[0].key == h.keys.exp("fixed")
    assert effects.event_codes("fixed") == ["queued", "admitted"]


def test_http_reward_needs_the_allowlist_passed_in():
    h = Harness()
    spec = make_spec("web", reward=RewardSpec(type="http", url="http://rewards.local/score"))
    assert h.submit(spec).event_codes("web") == ["invalid_spec"]
    assert h.submit(spec, allowlist=["http://rewards.local/"], entry="2-0",
                    stored=StoredRecord(status="invalid")).event_codes("web")[0] == "queued"


# ---------------------------------------------------------------- the step loop


def test_on_policy_step_loop_trains_each_step_once_and_finishes_last():
    h = Harness()
    rounds = run_to_end(h, make_spec("a", steps=2))
    jobs = [j for r in rounds for j in h.jobs(r)]
    assert [(j.step, j.base_version, len(j.groups)) for j in jobs] == [(0, 0, 2), (1, 1, 2)]
    # submit, scored, announced v1, scored, announced v2: step s's rollouts run under version s
    assert [sorted({q.adapter_version for q in h.requests(r)}) for r in rounds] == [[0], [], [1], [], []]
    last = rounds[-1]
    assert [m.step for m in last.published(StepMetrics)] == [1]
    assert isinstance(last.messages[-1].message, messages.ExperimentEvent)
    assert last.messages[-1].message.code == "finished"  # the end event is the last message
    assert last.fields["a"]["status"] == "finished" and last.fields["a"]["final_metrics"] is None
    assert "a" not in h.core.views


def test_a_step_is_ready_only_once_all_groups_are_in():
    h = Harness()
    [request] = h.requests(h.submit(make_spec("a")))
    assert h.jobs(h.score(request, first=1)) == []
    assert h.jobs(h.score(request, first=1)) == []  # a duplicate result counts once
    [job] = h.jobs(h.score(request))  # its first group again (kept once) and the second
    assert job.job_id == "a:s0" and h.core.views["a"].train_sent == 1


def test_metrics_of_a_step_come_from_its_groups():
    h = Harness()
    requests = h.requests(h.submit(make_spec("a")))
    for request in requests:
        scored = h.score(request, rewards=(1.0, 0.0))
    [job] = h.jobs(scored)
    [metrics] = h.announce(job).published(StepMetrics)
    assert metrics.reward_mean == 0.5 and metrics.accuracy == 0.5
    assert metrics.groups == 2 and metrics.failed_groups == 0 and metrics.produced_version == 1
    assert metrics.rollout_s > 0 and metrics.train_s == 2.0


@pytest.mark.parametrize("k", [0, 1, 2])
def test_off_policy_issues_step_s_once_s_le_v_plus_k_and_jobs_stay_contiguous(k):
    h = Harness()
    effects = h.submit(make_spec("a", steps=4, max_off_policy_steps=k))
    assert {r.step for r in h.requests(effects)} == set(range(k + 1))  # steps 0..k under version 0
    issued = h.requests(effects)
    for version in range(4):
        step_requests = [r for r in issued if r.step == version]
        merged = Effects()
        for request in step_requests:
            merged.extend(h.score(request))
        [job] = h.jobs(merged)
        assert job.step == version and job.base_version == version
        announced = h.announce(job)
        new = h.requests(announced)
        assert all(r.step <= version + 1 + k for r in new)
        issued += new
    assert sorted({r.step for r in issued}) == [0, 1, 2, 3]


def test_failed_and_nan_groups_are_counted_and_left_out_of_the_job():
    h = Harness()
    [request] = h.requests(h.submit(make_spec("a")))
    scored = scored_for(request, [math.nan, 1.0])
    results = [scored.completion.results[0], PromptResult(prompt=request.prompts[1], error="engine died")]
    scored = ScoredCompletion(completion=msgspec.structs.replace(scored.completion, results=results),
                              scores=[scored.scores[0], PromptScore()])
    effects = h._keep(h.core.collect(scored, h.now))
    assert effects.event_codes("a") == ["reward_failed", "rollout_failed"]  # one prompt's failure fails only it
    writes = [(w.command, w.key, w.args) for w in effects.writes]
    assert writes.count(("hincrby", h.keys.exp("a"), ("errors", 1))) == 2
    [job] = h.jobs(effects)
    assert job.groups == []
    [metrics] = h.announce(job).published(StepMetrics)
    assert metrics.failed_groups == 2 and metrics.reward_mean is None


def test_never_updated_adapter_ends_failed_not_finished():
    h = Harness()
    rounds = run_to_end(h, make_spec("a", steps=2), skipped=True)
    assert rounds[-1].event_codes("a")[-1] == "failed"
    assert "none of 2 steps updated the adapter" in rounds[-1].fields["a"]["error"]
    assert "nan loss" in rounds[-1].fields["a"]["error"]


def test_forged_announcement_is_an_event_only_and_the_real_one_still_advances():
    h = Harness()
    merged = h.score_all(h.submit(make_spec("a")))
    [job] = h.jobs(merged)
    forged = h.announce(job, rejection="digest mismatch")
    assert forged.event_codes("a") == ["adapter_rejected"] and not forged.fields and not forged.writes
    assert h.core.views["a"].version == 0
    assert h.announce(job).fields["a"]["version"] == 1


def test_unexpected_and_repeated_announcements_change_nothing():
    h = Harness()
    [job] = h.jobs(h.score_all(h.submit(make_spec("a"))))
    early = msgspec.structs.replace(job, base_version=1)  # version 2 while version 1 is due
    assert h.announce(early).empty
    h.announce(job)
    assert h.announce(job).empty  # a re-announcement


def test_cancel_ends_the_experiment_and_late_results_are_ignored():
    h = Harness()
    requests = h.requests(h.submit(make_spec("a")))
    effects = h.cancel("a")
    assert effects.event_codes("a") == ["cancelled"] and effects.fields["a"]["status"] == "cancelled"
    assert {w.key for w in effects.writes if w.command == "expire"} >= {h.keys.step_groups("a", 0)}
    assert h.score(requests[0]).empty
    unknown = h.cancel("a", stored_status="cancelled")
    assert unknown.events("a")[0].message == "experiment is already cancelled"


# ---------------------------------------------------------------- owners


def test_only_the_owner_secret_or_an_operator_cancels_and_a_refusal_changes_nothing():
    h = Harness()
    submitted = h.submit(make_spec("a"))
    stored = submitted.fields["a"]["owner"]
    assert OWNER not in stored and owners.secret_matches(stored, OWNER) and not owners.secret_matches(stored, OTHER)
    for wrong in (OTHER, None, OWNER + "x", ""):
        refused = h.cancel("a", owner=wrong)
        assert refused.event_codes() == ["not_owner"] and refused.events()[0].level == "error"
        assert not refused.fields and not refused.writes and h.core.views["a"].status == "running"
    texts = {e.message for effects in h.log for e in effects.events("a") if e.code == "not_owner"}
    assert len(texts) == 1 and OWNER not in texts.pop()  # the same words whatever was wrong
    assert h.cancel("a").event_codes("a") == ["cancelled"]
    h.submit(make_spec("b"))
    assert h.cancel("b", owner=None, admin=True).event_codes("b") == ["cancelled"]


def test_a_submission_without_a_secret_is_left_to_operators():
    h = Harness()
    queued = h.submit(make_spec("s", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match")), owner=None)
    assert "owner" not in queued.fields["s"] or queued.fields["s"]["owner"] is None
    assert "only an operator" in queued.events("s")[0].message
    assert h.cancel("s", owner=None).event_codes("s") == ["not_owner"]
    assert h.push("s", pushed("p0"), owner=None).event_codes("s") == ["not_owner"]
    assert h.push("s", pushed("p0"), owner=OWNER).event_codes("s") == ["not_owner"]
    assert h.push("s", pushed("p0"), owner=None, admin=True).writes  # kept
    assert h.cancel("s", owner=None, admin=True).event_codes("s") == ["cancelled"]


def test_pushes_need_the_owner_secret():
    h = Harness()
    h.submit(make_spec("s", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"), steps=1))
    refused = h.push("s", pushed("p0", "p1"), owner=OTHER)
    assert refused.event_codes("s") == ["not_owner"] and not refused.writes and not h.core.views["s"].stream_prompts
    fed = h.push("s", pushed("p0", "p1"))
    assert [p.prompt_id for r in h.requests(fed) for p in r.prompts] == ["p0", "p1"]


def test_early_prompts_are_kept_only_for_the_secret_they_were_pushed_under():
    h = Harness()
    bound = h.push("later", pushed("p0"), owner=OTHER).writes[2].args[1]
    assert h.push("later", pushed("p1"), early_owner=bound).event_codes("later") == ["not_owner"]
    assert h.push("later", pushed("p1"), owner=None).event_codes("later") == ["not_owner"]
    spec = make_spec("later", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"))
    submitted = h.submit(spec, pushed=pushed("p0"), early_owner=bound)
    assert "tasks_ignored" in submitted.event_codes("later") and not h.core.views["later"].stream_prompts
    assert ("delete", h.keys.tasks("later")) in [(w.command, w.key) for w in submitted.writes]
    mine = Harness()
    spec = make_spec("mine", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"))
    bound = mine.push("mine", pushed("p0")).writes[2].args[1]
    kept = mine.submit(spec, pushed=pushed("p0"), early_owner=bound)
    assert "tasks_ignored" not in kept.event_codes("mine") and len(mine.core.views["mine"].stream_prompts) == 1
    assert ("delete", mine.keys.tasks_owner("mine")) in [(w.command, w.key) for w in kept.writes]


def test_a_secret_too_short_or_too_long_is_refused_with_the_spec():
    for secret in ("short", "x" * (owners.MAX_SECRET_CHARS + 1)):
        effects = Harness().submit(make_spec("a"), owner=secret)
        assert effects.event_codes("a") == ["invalid_spec"] and "owner_secret" in effects.events("a")[0].message
        assert secret not in effects.events("a")[0].message


def test_a_duplicate_submission_does_not_change_the_owner():
    h = Harness()
    h.submit(make_spec("a"))
    duplicate = h.submit(make_spec("a"), stored=StoredRecord(status="running", submit_entry="1-0"), entry="2-0",
                         owner=OTHER)
    assert duplicate.event_codes("a") == ["duplicate_experiment"] and not duplicate.fields
    assert h.cancel("a", owner=OTHER).event_codes("a") == ["not_owner"]


# ---------------------------------------------------------------- held-out evaluation


def test_held_out_eval_runs_at_version_zero_and_at_the_end_and_is_reported():
    h = Harness()
    spec = make_spec("a", steps=1, eval_size=3)
    submitted = h.submit(spec)
    [start_eval] = h.requests(submitted, "eval")  # one request with every held-out prompt
    assert (start_eval.step, start_eval.sampling.temperature, start_eval.sampling.n) == (0, 0.0, 1)
    assert len(start_eval.prompts) == 3
    h._keep(h.core.collect(scored_for(start_eval, [1.0], correct_each=[True, False, False]), h.now))
    [job] = h.jobs(h.score_all(submitted))
    announced = h.announce(job)
    assert announced.published(StepMetrics) == []  # held until the final eval is in
    final_evals = h.requests(announced, "eval")
    assert {r.adapter_version for r in final_evals} == {1}
    merged = Effects()
    for request in final_evals:
        merged.extend(h._keep(h.core.collect(scored_for(request, [1.0], correct=True), h.now)))
    [metrics] = merged.published(StepMetrics)
    assert metrics.eval_accuracy == 1.0 and metrics.start_eval_accuracy == pytest.approx(1 / 3)
    assert merged.event_codes("a") == ["finished"]
    assert merged.fields["a"]["final_accuracy"] == 1.0


def test_inline_prompts_hold_out_a_seeded_split_never_trained_on():
    h = Harness()
    spec = inline_spec("a", count=10, steps=4, eval_size=3)
    effects = h.submit(spec)
    held_out = {p.prompt_id for r in h.requests(effects, "eval") for p in r.prompts}
    assert len(held_out) == 3
    trained = set()
    for _ in range(spec.steps):
        trained |= {p.prompt_id for r in h.requests(effects) for p in r.prompts}
        [job] = h.jobs(h.score_all(effects))
        effects = h.announce(job)
    assert trained and not trained & held_out
    again = {p.prompt_id for r in Harness().requests(Harness().submit(spec), "eval") for p in r.prompts}
    assert again == held_out  # the same split every time


# ---------------------------------------------------------------- streamed prompts


def pushed(*ids: str) -> list[Prompt]:
    return [Prompt(prompt_id=i, text=f"text {i}", answer="1") for i in ids]


def test_streamed_step_waits_for_prompts_announced_once_per_wait():
    h = Harness()
    spec = make_spec("s", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"), steps=2)
    effects = h.submit(spec, pushed=pushed("p0"))
    assert effects.event_codes("s") == ["queued", "admitted", "waiting_for_prompts"]
    push = lambda *ids: h.push("s", pushed(*ids))  # noqa: E731
    assert push("p0").event_codes("s") == ["tasks_ignored"]  # a repeated prompt_id
    fed = push("p1")
    assert [p.prompt_id for r in h.requests(fed) for p in r.prompts] == ["p0", "p1"] and fed.event_codes("s") == []
    [job] = h.jobs(h.score_all(fed))
    assert h.announce(job).event_codes("s") == ["waiting_for_prompts"]  # a new wait: said again
    assert h.all_events("s").count("waiting_for_prompts") == 2


def test_prompts_pushed_before_the_submission_are_kept_with_an_expiry():
    h = Harness(ended_ttl_s=60)
    effects = h.push("later", pushed("p0"))
    assert [w.command for w in effects.writes] == ["rpush", "expire", "hset", "expire"]
    assert effects.writes[1].args == (60,) and effects.writes[3].args == (60,)
    assert effects.writes[2].key == h.keys.tasks_owner("later")  # the first pusher's secret binds them
    ended = h.push("old", pushed("p0"), stored_status="finished")
    assert ended.event_codes("old") == ["tasks_ignored"] and not ended.writes


# ---------------------------------------------------------------- stalls and dead letters


def test_stall_reissues_only_unfinished_requests_under_the_newest_version():
    h = Harness(stall_timeout_s=10)
    [request] = h.requests(h.submit(make_spec("a")))
    h.score(request, first=1)
    assert h.core.reissue_stalled(h.now + 5).empty  # not stalled yet
    effects = h.core.reissue_stalled(h.now + 60)
    [again] = h.requests(effects)
    assert again.request_id == "a:s0" and again.prompts == request.prompts  # its kept group is not counted twice
    assert effects.event_codes("a") == ["stalled"]
    assert h.core.reissue_stalled(h.now + 61).empty  # the re-issue counts as progress


def test_stall_resends_an_outstanding_train_job_with_the_same_id():
    h = Harness(stall_timeout_s=10)
    [job] = h.jobs(h.score_all(h.submit(make_spec("a"))))
    [again] = h.jobs(h.core.reissue_stalled(h.now + 60))
    assert again.job_id == job.job_id


def dead_letter(stream: str, message, reason: str = "too many deliveries") -> DeadLetter:
    return DeadLetter(dead_letter_id="9-0", stream=stream, entry_id="1-0", group="g", consumer="c",
                      deliveries=5, reason=reason, payload=messages.encode(message))


def test_dead_lettered_train_job_of_the_current_step_fails_the_tenant():
    h = Harness()
    [job] = h.jobs(h.score_all(h.submit(make_spec("a"))))
    old = msgspec.structs.replace(job, job_id="a:s7", step=7)
    assert h.core.dead_letter(dead_letter("train_jobs:0", old), submission_exists=False, now=h.now).empty
    effects = h.core.dead_letter(dead_letter("train_jobs:0", job, "rank too large"), submission_exists=False,
                                 now=h.now)
    assert effects.event_codes("a") == ["failed"] and "rank too large" in effects.fields["a"]["error"]


def test_dead_lettered_rollout_request_becomes_a_failed_group():
    h = Harness()
    [request] = h.requests(h.submit(make_spec("a")))
    h.score(request, first=1)
    effects = h.core.dead_letter(dead_letter("rollout_requests", request), submission_exists=False, now=h.now)
    assert effects.event_codes("a") == ["rollout_failed"]
    [job] = h.jobs(effects)
    assert len(job.groups) == 1


def test_undecodable_submission_becomes_an_invalid_experiment_once():
    h = Harness()
    raw = msgspec.msgpack.encode({"kind": "experiment_submit", "spec": {"experiment_id": "raw", "steps": "x"}})
    letter = DeadLetter(dead_letter_id="9-0", stream="experiments", entry_id="1-0", group="g", consumer="c",
                        deliveries=1, reason="does not decode", payload=raw)
    effects = h.core.dead_letter(letter, submission_exists=False, now=h.now)
    assert effects.event_codes("raw") == ["invalid_spec"] and "steps" in effects.fields["raw"]["error"]
    assert h.core.dead_letter(letter, submission_exists=True, now=h.now).empty


# ---------------------------------------------------------------- restart recovery


def test_recovery_rebuilds_from_stored_fields_and_publishes_only_what_is_due():
    h = Harness()
    spec = make_spec("a", steps=3)
    first_round = h.submit(spec)
    [job] = h.jobs(h.score_all(first_round))
    h.announce(job)  # version 1; step 1 issued, nothing scored yet
    stored = {b"spec": encode_spec(spec), b"status": b"running", b"version": b"1", b"issued": b"2",
              b"train_sent": b"1", b"adapter_path": b"/adapters/a/v1", b"issued_at:1": b"1004.0"}
    view = _view_from_hash(stored)
    view.groups[1] = {}
    restarted = SchedulerCore(Keys(PREFIX))
    effects = restarted.recover([view], now=2_000.0)
    assert effects.empty  # step 1's requests are out already: nothing is due
    assert restarted.views["a"].issued_at == {1: 1004.0}
    stalled = restarted.reissue_stalled(2_000.0 + 301)
    assert {r.request_id for r in stalled.published(RolloutRequest)} == {"a:s1"}


def test_recovery_reads_the_field_names_of_the_previous_version():
    spec = make_spec("a", eval_size=2)
    view = _view_from_hash({b"spec": encode_spec(spec), b"status": b"running", b"issued": b"1",
                            b"t0": b"10.5", b"c0": b"12.5", b"ev0": b"1"})
    assert view.issued_at == {0: 10.5} and view.completed_at == {0: 12.5} and view.evals_issued == {0}


def test_recovery_marks_outstanding_jobs_and_resumes_queued_experiments_in_order():
    spec = make_spec("a")
    running = _view_from_hash({b"spec": encode_spec(spec), b"status": b"running", b"issued": b"1",
                               b"train_sent": b"1"})
    running.groups[0] = {}
    queued = [_view_from_hash({b"spec": encode_spec(make_spec(i)), b"status": b"queued"}) for i in ("q1", "q2")]
    core = SchedulerCore(Keys(PREFIX), SchedulerRules(max_concurrent=2))
    effects = core.recover([running, *queued], now=NOW)
    assert core.dispatcher.outstanding[0] == {"a"}
    assert effects.event_codes("q1") == ["admitted"] and effects.event_codes("q2") == [] and core.queue == ["q2"]


def test_step_fields_are_deleted_under_both_names_when_the_step_is_done():
    h = Harness()
    [job] = h.jobs(h.score_all(h.submit(make_spec("a"))))
    fields = h.announce(job).fields["a"]
    assert {name: fields[name] for name in ("issued_at:0", "completed_at:0", "t0", "c0")} == dict.fromkeys(
        ("issued_at:0", "completed_at:0", "t0", "c0"))


# ---------------------------------------------------------------- the dispatcher


def test_dispatcher_releases_least_recently_trained_first_within_queue_depth():
    dispatcher = Dispatcher(num_shards=1, queue_depth=1)
    for tenant in ("a", "b", "c"):
        dispatcher.mark_ready(tenant)
    assert dispatcher.release(lambda t: True) == [(0, "a")]
    assert dispatcher.release(lambda t: True) == []  # depth 1: a is still out
    dispatcher.trained("a")
    dispatcher.mark_ready("a")  # a is ready again before b and c trained once
    assert [t for _, t in dispatcher.release(lambda t: True)] == ["b"]
    dispatcher.trained("b")
    assert [t for _, t in dispatcher.release(lambda t: True)] == ["c"]
    dispatcher.trained("c")
    assert [t for _, t in dispatcher.release(lambda t: True)] == ["a"]


def test_dispatcher_depth_is_per_shard_and_drops_tenants_no_longer_ready():
    dispatcher = Dispatcher(num_shards=2, queue_depth=1)
    by_shard: dict[int, list[str]] = {0: [], 1: []}
    for index in range(12):
        tenant = f"t{index}"
        by_shard[dispatcher.shard(tenant)].append(tenant)
        dispatcher.mark_ready(tenant)
    released = dispatcher.release(lambda t: t != by_shard[0][0])
    assert released == [(0, by_shard[0][1]), (1, by_shard[1][0])]


def test_core_sends_each_tenants_job_to_its_shard_fairly():
    h = Harness(num_shards=1, queue_depth=1)
    firsts = {i: h.submit(make_spec(i)) for i in ("a", "b")}
    [job_a] = h.jobs(h.score_all(firsts["a"]))
    assert h.jobs(h.score_all(firsts["b"])) == []  # depth 1: b waits for a's version
    released = h.announce(job_a)
    assert [j.experiment_id for j in h.jobs(released)] == ["b"]
    assert [o.stream for o in released.messages if isinstance(o.message, TrainJob)] == ["train_jobs:0"]
