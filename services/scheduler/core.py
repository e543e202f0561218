"""The scheduler's decisions: a pure step machine over every queued and
running experiment, plus the train-job dispatcher (``dispatch.Dispatcher``).

Each input (a submission, a cancel, pushed prompts, a scored group, a checked
adapter announcement, a dead letter, a stall check, a restart) goes to one
method that updates the in-memory views and returns the ``Effects`` to
commit: messages, hash fields, other writes. No Redis, no asyncio and no
clock here: what needs I/O (the stored record of an id, pushed prompts, the
reward allow-list, hashing adapter files) is read by the service first and
passed in, and so is ``now`` (unix seconds). Every method ends by admitting
queued experiments into free slots and releasing ready train jobs, so
callers never have to.

Per running experiment (``v`` = newest published version, ``k`` =
``max_off_policy_steps``):

- step ``s`` is *issued* (one rollout request carrying its ``prompts_per_step``
  prompts, under version ``v``) as soon as ``s <= v + k``; its scored
  completion brings one group per prompt, each kept once;
- the train job of step ``s`` always has ``base_version = s``; it is *ready*
  once all of step s's groups are scored **and** version ``s`` exists, so a
  tenant has at most one train job out at a time;
- ``advance`` (version s+1 announced and checked) records the step's
  ``StepMetrics`` and moves on; after the last step the final held-out eval
  runs, then the last step's metrics and ``finished`` go out together, the
  end event last.

Hash fields of an open step: ``issued_at:<s>``, ``completed_at:<s>``, and
``eval_issued:<v>`` per eval version published (``state`` also reads the
names written before: ``t<s>``, ``c<s>``, ``ev<v>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from services.scheduler import outgoing, owners
from services.scheduler import spec as spec_rules
from services.scheduler.dead_letters import decoded, explain_refusal, failed_group_from, raw_experiment_id
from services.scheduler.dispatch import Dispatcher
from services.scheduler.effects import Effects, Level
from services.scheduler.outgoing import (
    eval_group_id,
    eval_request_id,
    group_failed,
    scored_groups,
    train_group_id,
    train_job_id,
    train_request_id,
)
from services.scheduler.prompts import MAX_ID_CHARS, ExperimentFailure, PromptSource, prompts_needed, screen_prompts
from services.scheduler.spec import SpecLimits
from services.scheduler.state import (
    DONE_STEP_TTL_S,
    ExperimentView,
    Keys,
    StoredRecord,
    completed_at_field,
    encode_prompt,
    encode_spec,
    eval_issued_field,
    issued_at_field,
    legacy_step_fields,
)
from shared import messages
from shared.bus import DeadLetter
from shared.messages import (
    AdapterPublished,
    ExperimentSpec,
    Prompt,
    ScoredCompletion,
    ScoredGroup,
    StepMetrics,
    TaskPush,
    TrainJob,
    is_experiment_id,
)


@dataclass(frozen=True)
class SchedulerRules:
    """The deployment's knobs the decisions depend on (from ``SchedulerConfig``)."""

    limits: SpecLimits = SpecLimits()
    max_concurrent: int = 8
    num_shards: int = 1
    queue_depth: int = 2
    stall_timeout_s: float = 300.0
    ended_ttl_s: float = 7 * 24 * 3600.0
    datasets_root: Path | None = None  # where task.dataset paths live (None: dataset tasks fail)

    @classmethod
    def from_config(cls, config) -> SchedulerRules:
        return cls(limits=spec_rules.limits_from_config(config), max_concurrent=config.max_concurrent,
                   num_shards=config.num_trainer_shards, queue_depth=config.train_queue_depth,
                   stall_timeout_s=config.stall_timeout_s, ended_ttl_s=config.ended_ttl_s,
                   datasets_root=config.datasets_root)


class SchedulerCore:
    def __init__(self, keys: Keys, rules: SchedulerRules = SchedulerRules(),
                 prompts: PromptSource | None = None) -> None:
        self.keys = keys
        self.rules = rules
        self.prompts = prompts or PromptSource(rules.datasets_root, rules.limits)
        self.dispatcher = Dispatcher(rules.num_shards, rules.queue_depth)
        self.views: dict[str, ExperimentView] = {}  # queued and running experiments
        self.queue: list[str] = []  # queued ids, FIFO

    def running(self) -> list[ExperimentView]:
        return [v for v in self.views.values() if v.status == "running"]

    # ------------------------------------------------------------ inputs

    def recover(self, views: list[ExperimentView], now: float) -> Effects:
        """Start over from the views the service loaded (running ones first,
        then queued ones FIFO); publish whatever is due and not yet published."""
        effects = Effects()
        self.views.clear()
        self.queue.clear()
        self.dispatcher.reset()
        for view in views:
            if view.status not in ("running", "queued"):
                continue
            if view.spec.task.stream:
                view.set_stream_prompts(self._usable_stream_prompts(view.spec, view.stream_prompts, effects))
            view.last_progress = now
            self.views[view.experiment_id] = view
            if view.status == "queued":
                self.queue.append(view.experiment_id)
            elif view.train_outstanding:
                self.dispatcher.mark_outstanding(view.experiment_id)
        for view in self.running():
            self._reconcile(view, effects, now)
        return self._settle(effects, now)

    def submit(self, spec: ExperimentSpec, *, entry_id: str | None, stored: StoredRecord,
               allowlist: list[str], stream_prompts: list[Prompt], now: float,
               owner_secret: str | None = None, early_owner: str | None = None,
               salt: bytes | None = None) -> Effects:
        """``entry_id``: the submission's stream entry; the same entry again is a
        redelivery (nothing happens), another one with a known id is a
        duplicate, even with the very same spec. ``stream_prompts``: pushed
        before the submission (read from Redis), ``early_owner`` the owner
        hash they were pushed under (``owners``). ``owner_secret``: kept as a
        hash salted with ``salt`` (None: a fresh random one)."""
        effects = Effects()
        experiment_id = spec.experiment_id
        if not is_experiment_id(experiment_id):
            reasons = spec_rules.validate_spec(spec, self.rules.limits)
            self._refuse_unkeyed(effects, experiment_id, "error", "invalid_spec", "; ".join(reasons), now)
            return self._settle(effects, now)
        if stored.status is not None:
            if stored.is_redelivery(spec, entry_id):
                return self._settle(effects, now)
            if stored.status != "invalid":
                effects.event(experiment_id, "error", "duplicate_experiment",
                              f"experiment {experiment_id!r} already exists ({stored.status}); "
                              "the new submission is ignored", now)
                return self._settle(effects, now)
            effects.write("delete", self.keys.exp(experiment_id))  # a corrected spec replaces a refused one
        reasons = spec_rules.validate_spec(spec, self.rules.limits, allowlist=allowlist)
        secret_problem = owners.secret_problem(owner_secret)
        if secret_problem is not None:
            reasons.append(secret_problem)
        if reasons:
            self._record_invalid(effects, experiment_id, "; ".join(reasons), spec, now)
            effects.set_fields(experiment_id, submit_entry=entry_id)
            return self._settle(effects, now)
        owner_hash = None if owner_secret is None else owners.hash_secret(owner_secret, salt)
        if spec.task.stream and early_owner is not None and not owners.secret_matches(early_owner, owner_secret):
            stream_prompts = self._drop_early_prompts(effects, experiment_id, len(stream_prompts), now)
        self._queue(effects, spec, entry_id, stream_prompts, owner_hash, now)
        return self._settle(effects, now)

    def cancel(self, experiment_id: str, *, stored_status: str | None, now: float,
               owner_secret: str | None = None, admin: bool = False) -> Effects:
        """Cancel a queued or running experiment when ``owner_secret`` opens its
        owner hash, or for an operator (``admin``: the ``admin`` stream)."""
        effects = Effects()
        if not is_experiment_id(experiment_id):
            self._refuse_unkeyed(effects, experiment_id, "warning", "cancel_ignored",
                                 f"experiment id {experiment_id[:MAX_ID_CHARS]!r} is not valid: no such experiment",
                                 now)
        elif experiment_id not in self.views:
            message = f"experiment is already {stored_status}" if stored_status else "unknown experiment"
            effects.event(experiment_id, "warning", "cancel_ignored", message, now)
        elif not admin and not owners.secret_matches(self.views[experiment_id].owner_hash, owner_secret):
            self._refuse_not_owner(effects, experiment_id, "cancel", now)
        else:
            view = self.views[experiment_id]
            by = " by an operator" if admin else ""
            self._end(view, effects, "cancelled", now, message=f"cancelled{by} at step {view.version}")
        return self._settle(effects, now)

    def push_tasks(self, push: TaskPush, *, stored_status: str | None, stored_prompt_ids: set[str],
                   now: float, early_owner: str | None = None, admin: bool = False,
                   salt: bytes | None = None) -> Effects:
        """Pushed prompts. For an id the views do not know: ``stored_status``
        its status in Redis, ``stored_prompt_ids`` the prompts already kept
        for it (pushed before its submission) and ``early_owner`` the owner
        hash they were pushed under (the first early push sets it). Only the
        owner's secret, or an operator (``admin``), may push."""
        effects = Effects()
        experiment_id = push.experiment_id
        view = self.views.get(experiment_id)
        if not is_experiment_id(experiment_id):
            self._refuse_unkeyed(effects, experiment_id, "warning", "tasks_ignored",
                                 f"experiment id {experiment_id[:MAX_ID_CHARS]!r} is not valid; "
                                 f"{len(push.prompts)} pushed prompts ignored", now)
        elif view is None and stored_status is not None:
            effects.event(experiment_id, "warning", "tasks_ignored",
                          f"experiment is {stored_status}; {len(push.prompts)} pushed prompts ignored", now)
        elif not admin and not self._may_push(view, push.owner_secret, early_owner):
            self._refuse_not_owner(effects, experiment_id, f"push of {len(push.prompts)} prompts", now)
        elif view is not None and not view.spec.task.stream:
            effects.event(experiment_id, "warning", "tasks_ignored",
                          "the experiment's task source is not 'stream'; pushed prompts ignored", now)
        else:
            self._keep_pushed(effects, experiment_id, view, push.prompts, stored_prompt_ids, now)
            if view is None and early_owner is None and push.owner_secret is not None and not admin:
                self._bind_early_prompts(effects, experiment_id, owners.hash_secret(push.owner_secret, salt))
        return self._settle(effects, now)

    def collect(self, scored: ScoredCompletion, now: float) -> Effects:
        """A scored request (every group of a train step, or a whole eval) came back."""
        effects = Effects()
        view = self.views.get(scored.completion.experiment_id)
        if view is not None and view.status == "running":
            try:
                if scored.completion.purpose == "eval":
                    self._collect_eval(view, scored, effects, now)
                else:
                    self._collect_train(view, scored, effects, now)
            except ExperimentFailure as exc:  # its dataset cannot be read again
                self._fail(view, effects, str(exc), now)
                return self._settle(effects, now)
            self._reconcile(view, effects, now)
        return self._settle(effects, now)

    def needs_check(self, published: AdapterPublished) -> bool:
        """Is this announcement a new version of a running tenant (worth
        hashing its files for)? Otherwise ``advance`` ignores it anyway."""
        view = self.views.get(published.experiment_id)
        return view is not None and view.status == "running" and published.version > view.version

    def advance(self, published: AdapterPublished, adapter_path: str | None, rejection: str | None,
                now: float) -> Effects:
        """Record version ``version`` of a tenant (announced, and checked
        against the store by the service: ``adapter_path`` its store path, or
        ``rejection`` why the announcement is refused) and move the tenant on."""
        effects = Effects()
        view = self.views.get(published.experiment_id)
        if view is None or view.status != "running" or published.version <= view.version:
            return self._settle(effects, now)  # not ours, or a re-announcement of a version we have
        if published.version != view.version + 1 or view.train_sent != published.version:
            effects.log("warning", "unexpected_adapter_version", experiment_id=view.experiment_id,
                        version=published.version, current=view.version, train_sent=view.train_sent)
        elif rejection is not None or adapter_path is None:
            effects.event(view.experiment_id, "error", "adapter_rejected",
                          f"announcement of version {published.version} refused: {rejection}; "
                          "still waiting for the trainer's own version", now)
            effects.log("warning", "adapter_rejected", experiment_id=view.experiment_id, version=published.version,
                        reason=rejection, trainer=published.trainer[:MAX_ID_CHARS])
        else:
            self._record_version(view, published, adapter_path, effects, now)
            self._reconcile(view, effects, now)
        return self._settle(effects, now)

    def reissue_stalled(self, now: float) -> Effects:
        """Re-publish what a step that made no progress for ``stall_timeout_s``
        still waits for (requests lost or dead-lettered downstream)."""
        effects = Effects()
        for view in self.running():
            if now - view.last_progress > self.rules.stall_timeout_s:
                try:
                    self._reissue(view, effects, now)
                except ExperimentFailure as exc:  # e.g. its dataset changed: it fails alone
                    self._fail(view, effects, str(exc), now)
        return self._settle(effects, now)

    def dead_letter(self, letter: DeadLetter, *, submission_exists: bool, now: float) -> Effects:
        """Turn a dead letter that concerns an experiment into its state: an
        undecodable submission becomes an ``invalid`` experiment with the
        decoder's reason (``submission_exists``: its id already has a record);
        a dead-lettered rollout request or completion becomes a failed group,
        so its step does not wait forever; a dead-lettered train job of a
        tenant's current step fails that tenant with the reason."""
        effects = Effects()
        base = messages.base_stream(letter.stream)
        if base == "experiments":
            self._invalid_from_dead_letter(letter, submission_exists, effects, now)
        elif base in ("rollout_requests", "completions"):
            scored = failed_group_from(letter.payload, base, letter.reason)
            if scored is not None and is_experiment_id(scored.completion.experiment_id):
                return self.collect(scored, now)
        elif base == "train_jobs":
            job = decoded(letter.payload, letter.stream)
            if isinstance(job, TrainJob) and is_experiment_id(job.experiment_id):
                self._fail_refused_job(job, letter.reason, effects, now)
        return self._settle(effects, now)

    def forget(self, experiment_id: str) -> Effects:
        """Drop an invalid id found in the active set or the queue (members, not keys)."""
        effects = Effects()
        self._drop_membership(effects, experiment_id)
        effects.log("error", "recovery_skipped_invalid_id", experiment_id=experiment_id[:MAX_ID_CHARS])
        return effects

    def fail_unloadable(self, experiment_id: str, reason: str, now: float) -> Effects:
        """A record that does not load fails that experiment alone."""
        effects = Effects()
        self._drop_membership(effects, experiment_id)
        effects.event(experiment_id, "error", "failed", reason, now)
        effects.set_fields(experiment_id, status="failed", error=reason, finished_at=now)
        return effects

    # ------------------------------------------------------------ submit / push

    def _queue(self, effects: Effects, spec: ExperimentSpec, entry_id: str | None,
               stream_prompts: list[Prompt], owner_hash: str | None, now: float) -> None:
        experiment_id = spec.experiment_id
        effects.set_fields(experiment_id, status="queued", spec=encode_spec(spec), steps=spec.steps,
                           step=0, version=0, submitted_at=now, owner=owner_hash,
                           family=spec_rules.eval_family(spec), submit_entry=entry_id)
        effects.write("delete", self.keys.tasks_owner(experiment_id))  # early prompts now belong to the experiment
        effects.write("zadd", self.keys.index, {experiment_id: now})
        effects.write("zadd", self.keys.queue, {experiment_id: now})
        view = ExperimentView(spec=spec, status="queued", submitted_at=now, last_progress=now, owner_hash=owner_hash)
        if spec.task.stream:
            effects.write("persist", self.keys.tasks(experiment_id))  # pushed early: they now belong to it
            view.set_stream_prompts(self._usable_stream_prompts(spec, stream_prompts, effects))
        self.views[experiment_id] = view
        self.queue.append(experiment_id)
        ownerless = "" if owner_hash else ("; submitted without an owner_secret: "
                                           "only an operator can cancel it or push to it")
        effects.event(experiment_id, "info", "queued", f"{spec.steps} steps queued{ownerless}", now)

    def _record_invalid(self, effects: Effects, experiment_id: str, reason: str, spec: ExperimentSpec | None,
                        now: float) -> None:
        effects.set_fields(experiment_id, status="invalid", error=reason, submitted_at=now,
                           finished_at=now, steps=spec.steps if spec else None,
                           spec=encode_spec(spec) if spec else None)
        effects.write("zadd", self.keys.index, {experiment_id: now})
        self._expire_ended(effects, experiment_id, range(0), set())
        effects.event(experiment_id, "error", "invalid_spec", reason, now)
        effects.log("info", "experiment_invalid", experiment_id=experiment_id, reason=reason)

    def _refuse_unkeyed(self, effects: Effects, experiment_id: str, level: Level, code: str, reason: str,
                        now: float) -> None:
        """Refuse a message whose experiment id is not valid: an event names it,
        and no key is built from it (so it can never touch another tenant's)."""
        shown = experiment_id[:MAX_ID_CHARS]
        effects.event(shown, level, code, reason, now)
        effects.log("warning", "invalid_experiment_id_refused", experiment_id=shown, code=code, reason=reason)

    def _refuse_not_owner(self, effects: Effects, experiment_id: str, what: str, now: float) -> None:
        """The same words whatever was wrong (no secret, another's, an
        experiment without an owner): the refusal tells nothing about the owner."""
        effects.event(experiment_id, "error", "not_owner",
                      f"{what} refused: owner_secret missing or not this experiment's owner's; nothing changed "
                      "(an experiment submitted without one is left to operators)", now)
        effects.log("warning", "not_owner_refused", experiment_id=experiment_id, what=what)

    @staticmethod
    def _may_push(view: ExperimentView | None, secret: str | None, early_owner: str | None) -> bool:
        """The owner may push; before the submission, the first pusher's secret binds the id's early prompts."""
        if view is not None:
            return owners.secret_matches(view.owner_hash, secret)
        if secret is None or owners.secret_problem(secret) is not None:
            return False
        return early_owner is None or owners.secret_matches(early_owner, secret)

    def _bind_early_prompts(self, effects: Effects, experiment_id: str, owner_hash: str) -> None:
        key = self.keys.tasks_owner(experiment_id)
        effects.write("hset", key, "owner", owner_hash)
        effects.write("expire", key, max(1, int(self.rules.ended_ttl_s)))

    def _drop_early_prompts(self, effects: Effects, experiment_id: str, count: int, now: float) -> list[Prompt]:
        """Prompts pushed before the submission under another owner secret are not the submitter's."""
        effects.write("delete", self.keys.tasks(experiment_id))
        effects.event(experiment_id, "warning", "tasks_ignored",
                      f"{count} prompts pushed before the submission under another owner_secret were dropped", now)
        return []

    def _keep_pushed(self, effects: Effects, experiment_id: str, view: ExperimentView | None,
                     pushed: list[Prompt], stored_prompt_ids: set[str], now: float) -> None:
        """Keep the usable pushed prompts of a streamed experiment, or of an id
        not submitted yet (checked again against its spec when it comes)."""
        known = view.stream_prompt_ids if view is not None else stored_prompt_ids
        prompts, refusals = screen_prompts(view.spec if view else None, pushed, known, self.rules.limits)
        for refusal in refusals:
            effects.event(experiment_id, "warning", "tasks_ignored", refusal, now)
        if prompts:
            tasks_key = self.keys.tasks(experiment_id)
            effects.write("rpush", tasks_key, *[encode_prompt(p) for p in prompts])
            if view is None:  # nobody may ever submit it: do not keep them forever
                effects.write("expire", tasks_key, max(1, int(self.rules.ended_ttl_s)))
        if view is not None:
            view.stream_prompts.extend(prompts)
            view.stream_prompt_ids.update(p.prompt_id for p in prompts)
            if view.status == "running":
                self._reconcile(view, effects, now)

    def _usable_stream_prompts(self, spec: ExperimentSpec, stored: list[Prompt], effects: Effects) -> list[Prompt]:
        """The stored pushed prompts that feed ``spec``'s steps: the same
        screen as on arrival, so a restart gives every step the same prompts
        (prompts pushed before the spec was known are checked here)."""
        usable, refusals = screen_prompts(spec, stored, set(), self.rules.limits)
        if refusals:
            effects.log("info", "stored_prompts_left_out", experiment_id=spec.experiment_id, reasons=refusals)
        return usable

    # ------------------------------------------------------------ admission and the end

    def _settle(self, effects: Effects, now: float) -> Effects:
        """After any input: an experiment that ended frees a slot; ready jobs go out."""
        self._admit(effects, now)
        self._dispatch(effects, now)
        return effects

    def _admit(self, effects: Effects, now: float) -> None:
        """Start queued experiments, oldest first, while fewer than
        ``max_concurrent`` run."""
        running = len(self.running())
        while self.queue and running < self.rules.max_concurrent:
            view = self.views[self.queue.pop(0)]
            view.status = "running"
            view.last_progress = now
            effects.set_fields(view.experiment_id, status="running", started_at=now,
                               version=0, step=0, issued=0, train_sent=0)
            effects.write("zrem", self.keys.queue, view.experiment_id)
            effects.write("sadd", self.keys.active, view.experiment_id)
            effects.event(view.experiment_id, "info", "admitted", "running", now)
            self._reconcile(view, effects, now)
            running += 1

    def _dispatch(self, effects: Effects, now: float) -> None:
        def still_ready(experiment_id: str) -> bool:
            view = self.views.get(experiment_id)
            return view is not None and view.status == "running" and view.train_sent == view.version

        for shard, experiment_id in self.dispatcher.release(still_ready):
            view = self.views[experiment_id]
            effects.publish(outgoing.train_job(view, now), f"train_jobs:{shard}")
            view.train_sent = view.version + 1
            effects.set_fields(experiment_id, train_sent=view.train_sent)

    def _end(self, view: ExperimentView, effects: Effects, status: str, now: float, *, message: str,
             level: Level = "info", **fields) -> None:
        """Move an experiment to a terminal status, announced by an event whose
        code is that status (``TERMINAL_STATUSES``); its last version stays."""
        experiment_id = view.experiment_id
        if view.pending_metrics is not None:  # the last step's metrics go out before the end, never after
            self._publish_metrics(view, view.pending_metrics, effects)
            view.pending_metrics = None
        effects.set_fields(experiment_id, status=status, finished_at=now,
                           final_adapter=view.adapter_path, final_metrics=None, **fields)
        # the summary hash stays; step data, evals, tasks and metrics expire
        self._expire_ended(effects, experiment_id, range(view.version, view.issued), view.evals_issued)
        self._drop_membership(effects, experiment_id)
        effects.event(experiment_id, level, status, message, now)
        view.status = status
        self.views.pop(experiment_id, None)
        if experiment_id in self.queue:
            self.queue.remove(experiment_id)
        self.dispatcher.forget(experiment_id)
        effects.log("info", "experiment_ended", experiment_id=experiment_id, status=status, reason=message)

    def _drop_membership(self, effects: Effects, experiment_id: str) -> None:
        effects.write("srem", self.keys.active, experiment_id)
        effects.write("zrem", self.keys.queue, experiment_id)

    def _fail(self, view: ExperimentView, effects: Effects, reason: str, now: float) -> None:
        self._end(view, effects, "failed", now, message=reason, level="error", error=reason)

    def _expire_ended(self, effects: Effects, experiment_id: str, open_steps: range, eval_versions: set[int]) -> None:
        """Expire an ended experiment's data; its summary hash stays. Steps
        before ``open_steps`` already expire (``DONE_STEP_TTL_S``)."""
        ttl = max(1, int(self.rules.ended_ttl_s))
        keys = [self.keys.metrics(experiment_id), self.keys.tasks(experiment_id)]
        keys += [self.keys.step_groups(experiment_id, step) for step in open_steps]
        keys += [self.keys.eval_results(experiment_id, version) for version in sorted(eval_versions)]
        for key in keys:
            effects.write("expire", key, ttl)

    # ------------------------------------------------------------ the step machine

    def _reconcile(self, view: ExperimentView, effects: Effects, now: float) -> None:
        """Publish whatever is due for ``view`` now; idempotent (only what the
        state says is not yet published). A broken experiment fails alone."""
        try:
            self._issue_due_steps(view, effects, now)
            self._issue_due_evals(view, effects, now)
            self._mark_ready(view, effects, now)
            self._finish_if_done(view, effects, now)
        except ExperimentFailure as exc:
            self._fail(view, effects, str(exc), now)

    def _issue_due_steps(self, view: ExperimentView, effects: Effects, now: float) -> None:
        spec = view.spec
        while view.issued < spec.steps and view.issued <= view.version + spec.max_off_policy_steps:
            step = view.issued
            if not self.prompts.available(view, step):
                self._announce_prompt_wait(view, step, effects, now)
                return
            effects.publish(outgoing.rollout_request(view, step, self.prompts.train(view, step), now))
            view.issued = step + 1
            view.issued_at[step] = now
            view.groups.setdefault(step, {})
            view.last_progress = now
            effects.set_fields(view.experiment_id, issued=view.issued, **{issued_at_field(step): now})

    def _announce_prompt_wait(self, view: ExperimentView, step: int, effects: Effects, now: float) -> None:
        """Say once per wait that a streamed experiment is short of prompts."""
        if view.prompt_wait_step == step:
            return
        view.prompt_wait_step = step
        spec = view.spec
        held_out = spec_rules.held_out_size(spec)
        split = (f"the first {held_out} held out for evaluation, then {spec.prompts_per_step} per step"
                 if held_out else f"{spec.prompts_per_step} per step")
        effects.event(view.experiment_id, "warning", "waiting_for_prompts",
                      f"waiting for prompts: {len(view.stream_prompts)} pushed, step {step} needs "
                      f"{prompts_needed(spec, step)} ({split}); push more with task_push", now)

    def _issue_due_evals(self, view: ExperimentView, effects: Effects, now: float) -> None:
        size = self.prompts.held_out_size(view)
        if size == 0 or (view.spec.task.stream and len(view.stream_prompts) < size):
            return
        # an adapter that was never updated is the base model: no final eval to run
        final_due = view.version >= view.spec.steps and not view.never_updated
        for version in [0, view.spec.steps] if final_due else [0]:
            if version in view.evals_issued:
                continue
            effects.publish(outgoing.eval_request(view, version, self.prompts.held_out(view), now))
            view.evals_issued.add(version)
            view.evals.setdefault(version, {})
            effects.set_fields(view.experiment_id, **{eval_issued_field(version): 1})

    def _mark_ready(self, view: ExperimentView, effects: Effects, now: float) -> None:
        """Step ``train_sent`` may train once its groups are in and version
        ``train_sent`` exists (one job per tenant at a time, in order)."""
        step = view.train_sent
        if step != view.version or step >= view.issued:
            return
        if len(view.groups.get(step, {})) < view.spec.prompts_per_step:
            return
        if step not in view.completed_at:
            view.completed_at[step] = now
            effects.set_fields(view.experiment_id, **{completed_at_field(step): now})
        self.dispatcher.mark_ready(view.experiment_id)

    def _finish_if_done(self, view: ExperimentView, effects: Effects, now: float) -> None:
        """After the last step: once the final held-out eval is in, publish
        the last step's metrics with it, then ``finished`` (``_end``)."""
        spec = view.spec
        if view.version < spec.steps:
            return
        if view.never_updated:
            self._fail(view, effects, f"none of {spec.steps} steps updated the adapter; "
                                      f"last skip: {view.last_skip or 'no reason given'}", now)
            return
        accuracies = {}
        size = self.prompts.held_out_size(view)
        if size > 0:
            for version in (0, spec.steps):
                results = view.evals.get(version, {})
                if len(results) < size:
                    return  # an eval is still running
                accuracies[version] = sum(results.values()) / len(results)
        final, start = accuracies.get(spec.steps), accuracies.get(0)
        summary = f"finished {spec.steps} steps"
        if final is not None:
            summary += f"; held-out accuracy ({size} prompts) {start:.3f} -> {final:.3f}"
        if view.pending_metrics is not None:
            view.pending_metrics = msgspec.structs.replace(view.pending_metrics, eval_accuracy=final,
                                                           start_eval_accuracy=start)
        self._end(view, effects, "finished", now, message=summary, start_accuracy=start, final_accuracy=final)

    def _reissue(self, view: ExperimentView, effects: Effects, now: float) -> None:
        view.last_progress = now
        missing = 0
        for step in range(view.train_sent, view.issued):
            # the whole step again (its groups already in are not counted twice), under the newest version
            if len(view.groups.get(step, {})) < view.spec.prompts_per_step:
                effects.publish(outgoing.rollout_request(view, step, self.prompts.train(view, step), now))
                missing += 1
        for version in view.evals_issued:
            if len(view.evals.get(version, {})) < self.prompts.held_out_size(view):
                effects.publish(outgoing.eval_request(view, version, self.prompts.held_out(view), now))
                missing += 1
        if view.train_outstanding:
            shard = self.dispatcher.shard(view.experiment_id)
            effects.publish(outgoing.train_job(view, now), f"train_jobs:{shard}")
            missing += 1
        if missing:
            effects.event(view.experiment_id, "warning", "stalled",
                          f"no progress for {self.rules.stall_timeout_s:.0f}s; re-published {missing} messages", now)

    # ------------------------------------------------------------ results

    def _collect_train(self, view: ExperimentView, scored: ScoredCompletion, effects: Effects, now: float) -> None:
        """Keep each group of the step not yet in: a redelivered or re-issued
        request's groups already kept are not counted twice."""
        completion = scored.completion
        step = completion.step
        groups = view.groups.get(step)
        if groups is None or step < view.train_sent or completion.request_id != train_request_id(
                view.experiment_id, step):
            return  # an old step's redelivery, or not ours
        fresh: dict[str, ScoredGroup] = {}
        for index, group in enumerate(scored_groups(scored)[:view.spec.prompts_per_step]):
            group_id = train_group_id(view.experiment_id, step, index)
            if group_id not in groups:
                fresh[group_id] = group
        if not fresh:
            return  # duplicate
        first = step == 0 and not groups
        groups.update(fresh)
        view.last_progress = now
        if first:
            effects.set_fields(view.experiment_id, first_scored_at=now)
        for group_id, group in fresh.items():
            effects.write("hset", self.keys.step_groups(view.experiment_id, step), group_id, messages.encode(group))
            failure = group_failed(group)
            if failure is not None:
                self._count_failure(view, effects, group_id, group, failure, step, now)

    def _count_failure(self, view: ExperimentView, effects: Effects, group_id: str, group: ScoredGroup,
                       failure: str, step: int, now: float) -> None:
        view.errors += 1
        effects.write("hincrby", self.keys.exp(view.experiment_id), "errors", 1)
        code = "rollout_failed" if group.result.error is not None else "reward_failed"
        effects.event(view.experiment_id, "warning", code,
                      f"{group_id}: {failure}; the group is left out of step {step}", now)

    def _collect_eval(self, view: ExperimentView, scored: ScoredCompletion, effects: Effects, now: float) -> None:
        completion = scored.completion
        version = completion.step
        results = view.evals.get(version)
        size = self.prompts.held_out_size(view)
        if results is None or completion.request_id != eval_request_id(view.experiment_id, version):
            return
        fresh: dict[str, bool] = {}
        for index, group in enumerate(scored_groups(scored)[:size]):
            group_id = eval_group_id(view.experiment_id, version, index)
            if group_id not in results:
                fresh[group_id] = any(outgoing.sample_successes(group, view.spec.reward)[:1])
        if not fresh:
            return  # duplicate
        results.update(fresh)
        view.last_progress = now
        for group_id, correct in fresh.items():
            effects.write("hset", self.keys.eval_results(view.experiment_id, version), group_id,
                          b"1" if correct else b"0")
        if version == 0 and len(results) == size:
            view.start_accuracy = sum(results.values()) / len(results)
            effects.set_fields(view.experiment_id, start_accuracy=view.start_accuracy)

    def _record_version(self, view: ExperimentView, published: AdapterPublished, adapter_path: str,
                        effects: Effects, now: float) -> None:
        """Version ``step + 1`` checked out: the step's metrics, the new version."""
        experiment_id = view.experiment_id
        step = published.version - 1
        metrics = outgoing.step_metrics(view, step, published, now)
        if published.version < view.spec.steps:
            self._publish_metrics(view, metrics, effects)
        else:  # the last step's: held until the final eval is in (_finish_if_done), so it carries it
            view.pending_metrics = metrics
            effects.set_fields(experiment_id, final_metrics=messages.encode(metrics))
        effects.write("expire", self.keys.step_groups(experiment_id, step), DONE_STEP_TTL_S)
        closed_fields = (issued_at_field(step), completed_at_field(step), *legacy_step_fields(step))
        effects.set_fields(experiment_id, **dict.fromkeys(closed_fields))
        view.version = published.version
        view.adapter_path = adapter_path
        if published.stats.skipped_update:
            view.skipped_updates += 1
            view.last_skip = (published.stats.skip_reason or "no reason given")[:200]
            effects.set_fields(experiment_id, skipped_updates=view.skipped_updates, last_skip=view.last_skip)
        view.groups.pop(step, None)
        view.issued_at.pop(step, None)
        view.completed_at.pop(step, None)
        view.last_progress = now
        self.dispatcher.trained(experiment_id)
        effects.set_fields(experiment_id, version=view.version, step=view.version, adapter_path=view.adapter_path,
                           reward_mean=metrics.reward_mean, accuracy=metrics.accuracy)

    def _publish_metrics(self, view: ExperimentView, metrics: StepMetrics, effects: Effects) -> None:
        effects.publish(metrics)
        effects.write("rpush", self.keys.metrics(view.experiment_id), messages.encode(metrics))

    # ------------------------------------------------------------ dead letters

    def _fail_refused_job(self, job: TrainJob, reason: str, effects: Effects, now: float) -> None:
        """The trainer gave up on a tenant's current train job: without that
        version the tenant can never move on, so it fails with the reason."""
        view = self.views.get(job.experiment_id)
        if view is None or not (view.status == "running" and view.train_outstanding and job.step == view.version
                                and job.job_id == train_job_id(view.experiment_id, view.version)):
            effects.log("info", "train_job_dead_letter_ignored", experiment_id=job.experiment_id, step=job.step,
                        reason=reason)
            return
        self._fail(view, effects, f"the train job of step {job.step} was refused for good: {reason}", now)

    def _invalid_from_dead_letter(self, letter: DeadLetter, submission_exists: bool, effects: Effects,
                                  now: float) -> None:
        experiment_id = raw_experiment_id(letter.payload)
        if experiment_id is None:
            effects.log("warning", "submission_dead_lettered", reason=letter.reason)
            return
        explanation = explain_refusal(letter.payload, letter.reason)
        if not is_experiment_id(experiment_id):
            self._refuse_unkeyed(effects, experiment_id, "error", "invalid_spec",
                                 f"experiment_id: {experiment_id[:MAX_ID_CHARS]!r} is not a valid id; {explanation}",
                                 now)
        elif submission_exists:
            effects.log("warning", "submission_dead_lettered", experiment_id=experiment_id, reason=letter.reason)
        else:
            self._record_invalid(effects, experiment_id, explanation, None, now)
