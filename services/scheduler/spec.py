"""Validation of an ``ExperimentSpec`` beyond its types, and spec files.

``shared.messages`` already guarantees the *types* of a decoded spec; this
module checks what types cannot say (ranges, exactly one task source, a known
task family, a reward that can actually be computed within the operator's
limits, a rank the deployment can serve, a train job within the trainer's
token budget). Every rule yields one readable reason that starts with the field
it is about, e.g. ``"lora_rank: 16 is over the deployment's rank 8"``.

``load_spec_file`` reads a YAML or JSON file for ``clora submit`` and turns
parse and schema errors into one clear ``SpecFileError``.
"""

from __future__ import annotations

import json
import math
import random
import re
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml

from shared.datasets import MAX_FIELD_NAME_CHARS, path_problem
from shared.deployment import DEFAULT_LORA_TARGETS, refusal_reason
from shared.messages import (
    EXPERIMENT_ID_PATTERN,
    ChatFormat,
    DatasetSource,
    ExperimentSpec,
    Prompt,
    RewardSpec,
    is_experiment_id,
)
from shared.patterns import PatternError, compile_pattern
from shared.tinker_messages import TINKER_RUN_PREFIX

MAX_STEPS = 100_000
MAX_GROUP_SIZE = 1024
MAX_PROMPTS_PER_STEP = 4096
MAX_EVAL_SIZE = 10_000
MAX_OFF_POLICY_STEPS = 16
MAX_REWARD_TERMS = 8  # terms of a 'sum' reward
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64  # one stop string
WORKER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_PROMPT_CHARS = 8192  # longest prompt text, inline or pushed
# The built-in families' prompts are a few operands ("57+68=", "sort: 3 1 2"),
# far under this; tests/unit/test_spec.py checks every family against it.
FAMILY_PROMPT_BYTES_BOUND = 64
# A chat template's markup, in bytes (an upper bound on its tokens): per turn
# (Qwen's "<|im_start|>user\n" ... "<|im_end|>\n" is 23) and for the
# generation prompt with an empty thinking block (Qwen3's is 41).
CHAT_TURN_BYTES_BOUND = 32
CHAT_GENERATION_BYTES_BOUND = 64
MAX_CHAT_TURNS = 64


class SpecInvalid(ValueError):
    """A spec the scheduler refuses; ``reasons`` holds one line per broken rule."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class SpecFileError(ValueError):
    """A spec file that cannot be read, parsed or converted; the text says why."""


@dataclass(frozen=True)
class SpecLimits:
    """What the deployment can serve (from ``SchedulerConfig``)."""

    deployment_rank: int = 8  # the largest lora_rank
    deployment_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # lora_targets must be a subset
    max_tokens_limit: int = 4096
    max_model_len: int = 0  # the model's context in tokens (prompt + completion); 0: unknown, not checked
    max_prompt_chars: int = MAX_PROMPT_CHARS
    # the trainer's budget (shared.config.TrainBudget)
    max_train_tokens: int = 1_000_000
    max_packed_row_tokens: int = 16_384
    # what one experiment's reward may cost (shared.config.RewardLimits)
    max_reward_timeout_s: float = 60.0
    max_reward_attempts: int = 5
    max_reward_budget_s: float = 120.0


def limits_from_config(config: Any) -> SpecLimits:
    return SpecLimits(
        deployment_rank=int(config.lora_rank),
        deployment_targets=tuple(config.signature.target_modules),
        max_tokens_limit=config.max_tokens_limit,
        max_model_len=int(getattr(config, "max_model_len", 0)),
        max_train_tokens=config.max_train_tokens,
        max_packed_row_tokens=config.max_packed_row_tokens,
        max_reward_timeout_s=config.max_reward_timeout_s,
        max_reward_attempts=config.max_reward_attempts,
        max_reward_budget_s=config.max_reward_budget_s,
    )


def _default_families() -> Collection[str]:
    from shared.tasks import FAMILIES  # lazy: written in parallel, heavy-free

    return FAMILIES.keys()


# ---------------------------------------------------------------- rules


def _check_id(spec: ExperimentSpec) -> list[str]:
    if spec.experiment_id.startswith(TINKER_RUN_PREFIX):
        return [f"experiment_id: {spec.experiment_id!r} starts with {TINKER_RUN_PREFIX!r}, which names the "
                "Tinker gateway's runs"]
    if is_experiment_id(spec.experiment_id):
        return []
    return [f"experiment_id: {spec.experiment_id!r} must match {EXPERIMENT_ID_PATTERN.pattern} "
            "(lowercase letters, digits, '-' and '_', at most 64 characters)"]


TASK_SOURCES = ("family", "prompts", "stream", "dataset")


def _check_task(spec: ExperimentSpec, families: Collection[str], limits: SpecLimits) -> list[str]:
    task = spec.task
    present = (task.family is not None, task.prompts is not None, task.stream, task.dataset is not None)
    given = [name for name, is_given in zip(TASK_SOURCES, present, strict=True) if is_given]
    if len(given) != 1:
        got = " and ".join(given) if given else "none"
        return [f"task: give exactly one of {', '.join(TASK_SOURCES)} (got {got})"]
    reasons = _check_chat(task.chat, limits)
    if task.family is not None and task.family not in families:
        reasons.append(f"task.family: unknown family {task.family!r} (known: {', '.join(sorted(families))})")
    if task.prompts is not None:
        reasons += _check_prompts(task.prompts, limits)
    if task.dataset is not None:
        reasons += _check_dataset(task.dataset, spec)
    return reasons


def _check_chat(chat: ChatFormat | None, limits: SpecLimits) -> list[str]:
    if chat is not None and chat.system is not None and len(chat.system) > limits.max_prompt_chars:
        return [f"task.chat.system: {len(chat.system)} characters long, over the limit of {limits.max_prompt_chars}"]
    return []


def _check_dataset(dataset: DatasetSource, spec: ExperimentSpec) -> list[str]:
    """What can be checked without reading the file (the scheduler reads it
    at admission and fails the experiment with the reason when it cannot)."""
    reasons = []
    if (problem := path_problem(dataset.path)) is not None:
        reasons.append(f"task.dataset.path: {problem}")
    for name in ("prompt_field", "answer_field", "messages_field", "split"):
        value = getattr(dataset, name)
        if value is not None and not 0 < len(value) <= MAX_FIELD_NAME_CHARS:
            reasons.append(f"task.dataset.{name}: must be 1 to {MAX_FIELD_NAME_CHARS} characters (got {value!r})")
    held_out = dataset.held_out
    if isinstance(held_out, int) and held_out < 0:
        reasons.append(f"task.dataset.held_out: a count must be >= 0 (got {held_out})")
    elif isinstance(held_out, float) and not 0 <= held_out < 1:
        reasons.append(f"task.dataset.held_out: a share must be in [0, 1) (got {held_out}); "
                       "give a count as an integer")
    if dataset.seed < 0:
        reasons.append(f"task.dataset.seed: must be >= 0 (got {dataset.seed})")
    if dataset.answer_field is None and spec.reward.type in ANSWER_REWARDS:
        reasons.append(f"task.dataset.answer_field: reward type {spec.reward.type!r} needs each row's answer")
    return reasons


def _check_prompts(prompts: list[Prompt], limits: SpecLimits) -> list[str]:
    if not prompts:
        return ["task.prompts: the list is empty"]
    for index, prompt in enumerate(prompts):
        problem = prompt_problem(prompt, limits)
        if problem is not None:
            return [f"task.prompts: prompt {index} {problem}"]
    return []


def prompt_problem(prompt: Prompt, limits: SpecLimits) -> str | None:
    """Why one prompt (inline, pushed or a dataset row) cannot be used, or None."""
    if prompt.messages is None:
        if not prompt.text:
            return "has an empty text"
        chars = len(prompt.text)
    else:
        if not prompt.messages:
            return "has an empty list of messages"
        if len(prompt.messages) > MAX_CHAT_TURNS:
            return f"has {len(prompt.messages)} messages, more than {MAX_CHAT_TURNS}"
        if prompt.messages[-1].role != "user":
            return f"must end with a user message (the last is {prompt.messages[-1].role!r})"
        chars = len(prompt.text) + sum(len(message.content) for message in prompt.messages)
    if chars > limits.max_prompt_chars:
        return f"is {chars} characters long, over the limit of {limits.max_prompt_chars}"
    return None


def prompt_bytes(prompt: Prompt, chat: ChatFormat | None) -> int:
    """An upper bound on the tokens of ``prompt`` as the rollout encodes it
    (``max_prompt_tokens`` says why bytes), chat markup included."""
    if prompt.messages is None and chat is None:
        return len(prompt.text.encode())
    contents = [m.content for m in prompt.messages] if prompt.messages is not None else [prompt.text]
    if chat is not None and chat.system and not any(m.role == "system" for m in prompt.messages or []):
        contents.append(chat.system)
    return (sum(len(c.encode()) for c in contents) + CHAT_TURN_BYTES_BOUND * len(contents)
            + CHAT_GENERATION_BYTES_BOUND)


def _check_reward(spec: ExperimentSpec, families: Collection[str], limits: SpecLimits,
                  allowlist: Sequence[str] | None) -> list[str]:
    reward = spec.reward
    reasons: list[str] = []
    if reward.type == "family":
        family = reward.family or spec.task.family
        if family is None:
            reasons.append("reward.family: required for reward type 'family' (or give task.family)")
        elif family not in families:
            reasons.append(f"reward.family: unknown family {family!r} (known: {', '.join(sorted(families))})")
    elif reward.type == "regex":
        reasons += _check_pattern(reward.pattern)
    elif reward.type == "http":
        if not reward.url or not reward.url.startswith(("http://", "https://")):
            reasons.append(f"reward.url: reward type 'http' needs an http:// or https:// url (got {reward.url!r})")
        elif allowlist is not None and (refused := refusal_reason(reward.url, allowlist)) is not None:
            reasons.append(f"reward.url: {refused} (an operator adds a prefix with `clora allowlist add URL`)")
    elif reward.type == "worker":
        if not reward.worker or not WORKER_NAME_PATTERN.fullmatch(reward.worker):
            reasons.append(f"reward.worker: reward type 'worker' needs a worker name matching "
                           f"{WORKER_NAME_PATTERN.pattern} (got {reward.worker!r})")
    elif reward.type == "exact_match":
        reasons += _check_exact_match(spec)
    elif reward.type in ("math", "format"):
        reasons += _check_term(spec, "reward", reward.type, reward.pattern, reward.tolerance)
    elif reward.type == "sum":
        reasons += _check_reward_terms(spec, families)
    if reward.terms is not None and reward.type != "sum":
        reasons.append(f"reward.terms: only for reward type 'sum' (got type {reward.type!r})")
    return reasons + _check_reward_cost(reward, limits)


def _check_reward_terms(spec: ExperimentSpec, families: Collection[str]) -> list[str]:
    """A ``sum`` reward: 1..MAX_REWARD_TERMS built-in terms with finite
    weights, at most one verifier (whose verdict is the sum's), no invert."""
    reward, terms = spec.reward, spec.reward.terms or []
    if not 1 <= len(terms) <= MAX_REWARD_TERMS:
        return [f"reward.terms: give 1 to {MAX_REWARD_TERMS} terms for reward type 'sum' (got {len(terms)})"]
    reasons = []
    if reward.invert:
        reasons.append("reward.invert: not for reward type 'sum' (give the terms negative weights instead)")
    verifiers = [i for i, term in enumerate(terms) if term.type in VERIFIER_TERM_TYPES]
    if len(verifiers) > 1:
        reasons.append(f"reward.terms: at most one verifier term ({', '.join(VERIFIER_TERM_TYPES)}), whose "
                       f"verdict is the sum's (got terms {verifiers})")
    for index, term in enumerate(terms):
        where = f"reward.terms[{index}]"
        if not math.isfinite(term.weight):
            reasons.append(f"{where}.weight: must be a finite number (got {term.weight})")
        if term.type == "family" and term.family not in families:
            reasons.append(f"{where}.family: a known family is required in a term (got {term.family!r}; "
                           f"known: {', '.join(sorted(families))})")
        reasons += _check_term(spec, where, term.type, term.pattern, term.tolerance)
    return reasons


def _check_term(spec: ExperimentSpec, where: str, kind: str, pattern: str | None, tolerance: float) -> list[str]:
    """The rules of one math, format, regex or exact_match reward (top-level or a term)."""
    if kind == "regex":
        return [f"{where}.{r.removeprefix('reward.')}" for r in _check_pattern(pattern)]
    if kind == "format" and pattern:
        return [f"{where}.{r.removeprefix('reward.')}" for r in _check_pattern(pattern)]
    if kind == "exact_match":
        return _check_answers(spec, "exact_match")
    if kind == "math":
        if not (math.isfinite(tolerance) and 0 <= tolerance < 1):
            return [f"{where}.tolerance: must be in [0, 1) (got {tolerance})"]
        return _check_answers(spec, "math")
    return []


def _check_reward_cost(reward: RewardSpec, limits: SpecLimits) -> list[str]:
    """A slow reward must slow only its own experiment: bound each attempt and
    the attempts x timeout a group may hold a scoring slot."""
    if not reward.timeout_s > 0 or not math.isfinite(reward.timeout_s):
        return [f"reward.timeout_s: must be > 0 (got {reward.timeout_s})"]
    if reward.timeout_s > limits.max_reward_timeout_s:
        return [f"reward.timeout_s: {reward.timeout_s} is over the deployment's limit of "
                f"{limits.max_reward_timeout_s} s per attempt"]
    if reward.max_attempts < 1:
        return [f"reward.max_attempts: must be >= 1 (got {reward.max_attempts})"]
    if reward.max_attempts > limits.max_reward_attempts:
        return [f"reward.max_attempts: {reward.max_attempts} is over the deployment's limit of "
                f"{limits.max_reward_attempts}"]
    budget_s = reward.timeout_s * reward.max_attempts
    if budget_s > limits.max_reward_budget_s:
        return [f"reward.timeout_s x reward.max_attempts: {reward.timeout_s} x {reward.max_attempts} = "
                f"{budget_s:g} s is over the deployment's limit of {limits.max_reward_budget_s:g} s per group"]
    return []


def _check_pattern(pattern: str | None) -> list[str]:
    if not pattern:
        return ["reward.pattern: required for reward type 'regex'"]
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return [f"reward.pattern: {exc}"]
    return []


def _check_exact_match(spec: ExperimentSpec) -> list[str]:
    return _check_answers(spec, "exact_match")


def _check_answers(spec: ExperimentSpec, kind: str) -> list[str]:
    task = spec.task
    if task.prompts is not None:
        missing = [i for i, prompt in enumerate(task.prompts) if prompt.answer is None]
        if missing:
            return [f"reward.type: {kind!r} needs an answer for every prompt "
                    f"(task.prompts[{missing[0]}] has none)"]
    # family prompts carry answers; streamed prompts are checked as they arrive
    return []


def reward_needs_answer(reward: RewardSpec) -> bool:
    """Whether ``reward`` scores against the prompt's answer (a prompt without
    one cannot be scored)."""
    kinds = [term.type for term in reward.terms or []] if reward.type == "sum" else [reward.type]
    return any(kind in ANSWER_REWARDS for kind in kinds)


def reward_has_verdict(reward: RewardSpec) -> bool:
    """Whether ``reward`` says whether a sample is right (so held-out accuracy
    can be measured with it)."""
    if reward.type == "sum":
        return any(term.type in VERIFIER_TERM_TYPES for term in reward.terms or [])
    return reward.type in VERDICT_REWARDS


def _range(name: str, value: float, ok: bool, rule: str) -> list[str]:
    return [] if ok else [f"{name}: must be {rule} (got {value})"]


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check_ranges(spec: ExperimentSpec, limits: SpecLimits) -> list[str]:
    s = spec
    reasons = [
        *_range("steps", s.steps, 1 <= s.steps <= MAX_STEPS, f"between 1 and {MAX_STEPS}"),
        *_range("group_size", s.group_size, 2 <= s.group_size <= MAX_GROUP_SIZE,
                f"between 2 and {MAX_GROUP_SIZE} (group-relative advantages need a group)"),
        *_range("prompts_per_step", s.prompts_per_step, 1 <= s.prompts_per_step <= MAX_PROMPTS_PER_STEP,
                f"between 1 and {MAX_PROMPTS_PER_STEP}"),
        *_range("max_tokens", s.max_tokens, 1 <= s.max_tokens <= limits.max_tokens_limit,
                f"between 1 and {limits.max_tokens_limit}"),
        *_range("temperature", s.temperature, _finite(s.temperature) and s.temperature >= 0, ">= 0"),
        *_range("top_p", s.top_p, 0 < s.top_p <= 1, "in (0, 1]"),
        *_range("top_k", s.top_k, s.top_k >= 0, ">= 0 (0: no truncation)"),
        *_range("learning_rate", s.learning_rate, 0 < s.learning_rate < 1, "in (0, 1)"),
        *_range("max_off_policy_steps", s.max_off_policy_steps,
                0 <= s.max_off_policy_steps <= MAX_OFF_POLICY_STEPS, f"between 0 and {MAX_OFF_POLICY_STEPS}"),
        *_range("kl_coef", s.kl_coef, _finite(s.kl_coef) and s.kl_coef >= 0, ">= 0"),
        *_range("clip_eps", s.clip_eps, 0 < s.clip_eps < 1, "in (0, 1)"),
        *_range("max_grad_norm", s.max_grad_norm, _finite(s.max_grad_norm) and s.max_grad_norm > 0, "> 0"),
        *_range("eval_size", s.eval_size, 0 <= s.eval_size <= MAX_EVAL_SIZE, f"between 0 and {MAX_EVAL_SIZE}"),
        *_range("checkpoint_every", s.checkpoint_every, s.checkpoint_every >= 1, ">= 1"),
        *_range("seed", s.seed, s.seed >= 0, ">= 0"),
    ]
    return reasons + _check_lora_shape(s, limits)


def _check_lora_shape(s: ExperimentSpec, limits: SpecLimits) -> list[str]:
    """The experiment's own adapter shape: a rank up to the deployment's (a
    smaller one is zero-padded in the engines' slots), an alpha, a subset of
    the deployment's target modules."""
    reasons = []
    if s.lora_rank < 1:
        reasons.append(f"lora_rank: must be >= 1 (got {s.lora_rank})")
    elif s.lora_rank > limits.deployment_rank:
        reasons.append(f"lora_rank: {s.lora_rank} is over the deployment's rank {limits.deployment_rank} "
                       "(the largest an experiment may use)")
    if s.lora_alpha is not None and not (_finite(s.lora_alpha) and s.lora_alpha > 0):
        reasons.append(f"lora_alpha: must be a finite number > 0 (got {s.lora_alpha})")
    if s.lora_targets is not None:
        known = limits.deployment_targets
        outside = [t for t in s.lora_targets if t not in known]
        repeated = sorted({t for t in s.lora_targets if s.lora_targets.count(t) > 1})
        if not s.lora_targets or outside or repeated:
            problem = (f"{outside} are not among" if outside else f"{repeated} repeated;" if repeated
                       else "empty; give some of")
            reasons.append(f"lora_targets: {problem} the deployment's target modules {list(known)}")
    return reasons


def _check_sampling(spec: ExperimentSpec, limits: SpecLimits) -> list[str]:
    """``max_tokens`` within the model's context (a prompt needs one token at
    least; a longer prompt's rollout is refused by the engine), and stop strings
    that can be matched cheaply."""
    reasons = []
    if limits.max_model_len > 0 and spec.max_tokens >= limits.max_model_len:
        reasons.append(f"max_tokens: {spec.max_tokens} does not fit the model's context of "
                       f"{limits.max_model_len} tokens with a prompt (at most {limits.max_model_len - 1})")
    if len(spec.stop) > MAX_STOP_STRINGS:
        reasons.append(f"stop: at most {MAX_STOP_STRINGS} stop strings (got {len(spec.stop)})")
    for index, stop in enumerate(spec.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            reasons.append(f"stop[{index}]: must be 1 to {MAX_STOP_CHARS} characters long (got {len(stop)})")
    return reasons


def max_prompt_tokens(spec: ExperimentSpec, limits: SpecLimits) -> int | None:
    """An upper bound on one prompt's token count, None for a task source
    that is checked elsewhere. Without a tokenizer here, a prompt's UTF-8
    length in bytes stands for its tokens: an upper bound for byte-level BPE
    and character tokenizers (every token covers at least one byte), and the
    rollout adds no special tokens to a prompt beyond its chat template's
    markup (``prompt_bytes``)."""
    task = spec.task
    if task.prompts:
        return max(prompt_bytes(p, task.chat) for p in task.prompts)
    if task.stream or task.dataset is not None:
        # pushed prompts are checked as they arrive, dataset rows when the file is read,
        # each against prompt_bytes_allowance
        return 1
    if task.family is not None:
        return prompt_bytes(Prompt(prompt_id="bound", text="x" * FAMILY_PROMPT_BYTES_BOUND), task.chat)
    return None


def prompt_bytes_allowance(spec: ExperimentSpec, limits: SpecLimits) -> int:
    """The longest prompt (UTF-8 bytes, see ``max_prompt_tokens``) whose
    group still fits the trainer's budget, for a pushed prompt."""
    completion_tokens = spec.group_size * spec.max_tokens
    return min(limits.max_packed_row_tokens - completion_tokens,
               limits.max_train_tokens // max(1, spec.prompts_per_step) - completion_tokens)


def pushed_prompt_problem(prompt: Prompt, spec: ExperimentSpec, limits: SpecLimits) -> str | None:
    """Why a pushed prompt (or a dataset row) cannot feed ``spec``'s steps, or None."""
    problem = prompt_problem(prompt, limits)
    if problem is not None:
        return problem
    size, allowance = prompt_bytes(prompt, spec.task.chat), prompt_bytes_allowance(spec, limits)
    if size > allowance:
        return (f"is {size} bytes long; behind group_size {spec.group_size} x max_tokens {spec.max_tokens} "
                f"the train job would exceed the trainer's budget (at most {allowance} bytes a prompt)")
    return None


def _check_train_budget(spec: ExperimentSpec, limits: SpecLimits) -> list[str]:
    """Refuse a spec whose train job the trainer would refuse: a group packed
    behind its prompt is one row of prompt + group_size x max_tokens tokens
    (attention ~ its square), and one job holds prompts_per_step such rows."""
    prompt_tokens = max_prompt_tokens(spec, limits)
    if prompt_tokens is None or spec.group_size < 1 or spec.max_tokens < 1 or spec.prompts_per_step < 1:
        return []  # reported by the task or range rules
    row_tokens = prompt_tokens + spec.group_size * spec.max_tokens
    row = (f"prompt <= {prompt_tokens} + group_size {spec.group_size} x max_tokens {spec.max_tokens} "
           f"= {row_tokens} tokens")
    if row_tokens > limits.max_packed_row_tokens:
        return [f"group_size x max_tokens: a packed group of {row} is over the trainer's "
                f"max_packed_row_tokens {limits.max_packed_row_tokens}"]
    job_tokens = spec.prompts_per_step * row_tokens
    if job_tokens > limits.max_train_tokens:
        return [f"prompts_per_step: a train job of prompts_per_step {spec.prompts_per_step} x ({row}) = "
                f"{job_tokens} tokens is over the trainer's max_train_tokens {limits.max_train_tokens}"]
    return []


def validate_spec(spec: ExperimentSpec, limits: SpecLimits = SpecLimits(),
                  families: Collection[str] | None = None, allowlist: Sequence[str] | None = None) -> list[str]:
    """Every broken rule of ``spec``, one readable reason each; [] when valid.
    ``allowlist``: the reward service's URL prefixes (None: not checked)."""
    families = _default_families() if families is None else families
    return [
        *_check_id(spec),
        *_check_task(spec, families, limits),
        *_check_reward(spec, families, limits, allowlist),
        *_check_ranges(spec, limits),
        *_check_train_budget(spec, limits),
        *_check_sampling(spec, limits),
    ]


def check_spec(spec: ExperimentSpec, limits: SpecLimits = SpecLimits(),
               families: Collection[str] | None = None) -> None:
    """Raise ``SpecInvalid`` with every reason when ``spec`` is not valid."""
    reasons = validate_spec(spec, limits, families)
    if reasons:
        raise SpecInvalid(reasons)


VERDICT_REWARDS = ("family", "exact_match", "regex", "math")  # rewards that say whether a sample is right
VERIFIER_TERM_TYPES = ("family", "exact_match", "math")  # terms whose verdict is a sum's (reward.scoring)
ANSWER_REWARDS = ("family", "exact_match", "math")  # rewards that need the prompt's answer


def held_out_size(spec: ExperimentSpec, held_out_rows: int = 0) -> int:
    """How many held-out prompts measure the experiment's greedy accuracy
    (0: no held-out evaluation).

    - ``task.family``: ``eval_size`` prompts of the family's eval split.
    - ``task.prompts``: ``eval_size`` of them, at most half, drawn with the
      spec's seed (``held_out_prompts``) and never trained on.
    - ``task.stream``: the first ``eval_size`` prompts pushed, never trained on.
    - ``task.dataset``: ``eval_size`` at most of the dataset's
      ``held_out_rows`` held-out rows (known once the file is read).
    Inline, streamed and dataset prompts are measured only under a reward
    that says whether a sample is right (``VERDICT_REWARDS``); otherwise
    none is held out (a dataset's held-out rows are still never trained on)."""
    task = spec.task
    if spec.eval_size <= 0:
        return 0
    if task.family is not None:
        return spec.eval_size
    if not reward_has_verdict(spec.reward):
        return 0
    if task.prompts is not None:
        return min(spec.eval_size, len(task.prompts) // 2)
    if task.dataset is not None:
        return min(spec.eval_size, held_out_rows)
    return spec.eval_size if task.stream else 0


def split_inline_prompts(spec: ExperimentSpec) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) of ``task.prompts``: ``held_out_size`` prompts drawn
    with ``seed`` (the same on every restart), the rest in their given order."""
    prompts = spec.task.prompts or []
    held = set(random.Random(spec.seed).sample(range(len(prompts)), held_out_size(spec))) if prompts else set()
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, [prompts[i] for i in sorted(held)]


def eval_family(spec: ExperimentSpec) -> str | None:
    """The task family whose held-out split measures this experiment, if any."""
    if spec.task.family is not None:
        return spec.task.family
    if spec.reward.type == "family":
        return spec.reward.family
    return None


# ---------------------------------------------------------------- spec files


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_spec_text(text: str, source: str = "spec") -> Any:
    """YAML or JSON text -> plain data. JSON is valid YAML, so YAML reads both;
    a ``.json`` source is read strictly as JSON for clearer errors."""
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecFileError(f"{source}: does not parse: {exc}") from None


def convert_spec(data: Any, source: str = "spec") -> ExperimentSpec:
    """Plain data -> ``ExperimentSpec``; missing fields and wrong types are
    reported with their path, e.g. ``spec.yaml: reward: missing required field `type```.
    Inline prompts without a ``prompt_id`` get ``p<index>``."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise SpecFileError(f"{prefix}expected a mapping of spec fields, got {type(data).__name__}")
    _fill_prompt_ids(data)
    try:
        return msgspec.convert(data, ExperimentSpec)
    except msgspec.ValidationError as exc:
        raise SpecFileError(f"{prefix}{_explain_validation(str(exc))}") from None


def _fill_prompt_ids(data: dict) -> None:
    task = data.get("task")
    prompts = task.get("prompts") if isinstance(task, dict) else None
    if isinstance(prompts, list):
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, dict) and "prompt_id" not in prompt:
                prompt["prompt_id"] = f"p{index}"


_AT_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$")
_REWARD_TYPES = ", ".join(typing.get_args(typing.get_type_hints(RewardSpec)["type"]))


def _explain_validation(text: str) -> str:
    """msgspec says ``Expected `int`, got `str` - at `$.steps```; put the
    field first: ``steps: expected `int`, got `str```."""
    match = _AT_PATH.match(text)
    assert match is not None  # the pattern matches any string
    what = match.group("what").removeprefix("Object ").removeprefix("object ")
    what = what[:1].lower() + what[1:]
    path = match.group("path") or "spec"
    if path == "reward.type" and what.startswith("invalid enum value"):
        what = f"unknown reward type {what.removeprefix('invalid enum value ')} (known: {_REWARD_TYPES})"
    return f"{path}: {what}"


def load_spec_file(path: str | Path) -> ExperimentSpec:
    """Read a YAML or JSON spec file; ``SpecFileError`` says what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return convert_spec(parse_spec_text(text, str(path)), str(path))
