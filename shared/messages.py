"""Every message that crosses a process, one typed struct per stream.

Wire format: one Redis stream entry with a single field ``msg`` whose value is
a msgpack map. The map carries ``kind`` (which struct) and ``schema`` (the
schema version); every other key is a field below. Decoding validates types,
rejects unknown kinds and unknown fields, and rejects a schema newer than this
code understands. New fields are only ever added with defaults.

Conventions: ``*_s`` are seconds, ``ts`` is a unix timestamp in seconds,
adapter version 0 is the base model (no adapter), version v >= 1 is the
adapter after v train steps.
"""

from __future__ import annotations

import re
import time
from typing import Literal, Union

import msgspec

from shared.tinker_messages import TINKER_SCHEMA_VERSION, TINKER_STREAM_KINDS, TinkerMessage

SCHEMA_VERSION = 2
# Kinds whose shape changed, with the oldest schema still read. Schema 2: a
# rollout request carries every prompt of a step (``prompts``), a completion a
# result per prompt (``results``), a scored completion a score per prompt
# (``scores``), a train job ``ScoredGroup``s; an older sender of these (e.g.
# an old reward worker) is refused with a reason, not misread. Other kinds
# of an older schema are read as they are (fields are only added with defaults).
MIN_SCHEMA_BY_KIND = {"rollout_request": 2, "completion": 2, "scored_completion": 2, "train_job": 2}
assert TINKER_SCHEMA_VERSION == SCHEMA_VERSION
# An experiment id becomes part of Redis keys and of directory names: no ':',
# no '/', no '.', no newline. Always ``fullmatch`` (``$`` would accept "id\n").
EXPERIMENT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def is_experiment_id(value: object) -> bool:
    """True for an id that keys and paths may be built from."""
    return isinstance(value, str) and EXPERIMENT_ID_PATTERN.fullmatch(value) is not None


class MessageDecodeError(ValueError):
    """A payload that is not a valid message; the text says why."""


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for nested structs: strict about unknown fields."""


class _Message(_Struct, tag_field="kind", kw_only=True):
    """Base for top-level messages: tagged by ``kind``, versioned by ``schema``."""

    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------- nested parts


class SamplingParams(_Struct):
    """How to sample. ``top_k`` 0 and ``top_p`` 1.0 mean no truncation;
    ``temperature`` 0 means greedy; ``seed`` None means nondeterministic.
    ``stop``: strings that end a completion where one first appears in its
    text: the completion keeps its tokens up to the one that completes the
    stop string, its text ends before the stop string, and its
    ``finish_reason`` is "stop"."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: list[int] = []
    seed: int | None = None
    stop: list[str] = []


class ChatMessage(_Struct):
    """One turn of a chat prompt."""

    role: Literal["system", "user", "assistant"]
    content: str


class Prompt(_Struct):
    """One task instance. ``answer`` None: the reward does not need a reference.

    ``messages`` None: ``text`` is the prompt, encoded as it is. Otherwise
    the prompt is these chat turns (the last one the user's), rendered with
    the model's chat template and its generation prompt; ``text`` then is
    the plain form rewards see as the prompt (the scheduler fills in the
    last user turn when it is empty). ``enable_thinking``: the template's
    thinking switch (None: the template's default), only with ``messages``.
    The completion is the assistant's text either way."""

    prompt_id: str
    text: str = ""
    answer: str | None = None
    messages: list[ChatMessage] | None = None
    enable_thinking: bool | None = None


class RewardTerm(_Struct):
    """One built-in term of a ``sum`` reward: ``weight`` times the reward of
    ``type`` (read as ``RewardSpec``'s type of the same name, with this
    term's ``family``, ``pattern`` and ``tolerance``)."""

    type: Literal["family", "exact_match", "regex", "math", "format"]
    weight: float = 1.0
    family: str | None = None
    pattern: str | None = None
    tolerance: float = 1e-6


class RewardSpec(_Struct):
    """How completions of an experiment are scored.

    - ``family``: the built-in verifier of task family ``family``.
    - ``exact_match``: completion text (stripped) equals the prompt's answer.
    - ``regex``: 1.0 when ``pattern`` matches the completion (``re.search``).
    - ``math``: the completion's numeric final answer (``#### 42``,
      ``\\boxed{42}``, else its last number) equals the prompt's answer
      within ``tolerance`` (relative; absolute below 1).
    - ``format``: 1.0 when ``pattern`` matches the completion; without a
      pattern, when it gives a final answer after ``####`` or in ``\\boxed{}``.
      No verdict (``correct`` None).
    - ``sum``: the weighted sum of ``terms`` (built-in rewards, one level);
      the verdict is that of its verifier term (family, exact_match or
      math; at most one), None without one.
    - ``http``: POST to ``url`` (must be on the reward service's allowlist).
    - ``worker``: an external worker on stream ``<prefix>reward:<worker>``.
    ``invert`` turns a 0/1 reward r into 1 - r (reward the opposite); not for ``sum``."""

    type: Literal["family", "exact_match", "regex", "http", "worker", "math", "format", "sum"]
    family: str | None = None
    pattern: str | None = None
    url: str | None = None
    worker: str | None = None
    timeout_s: float = 10.0
    max_attempts: int = 3
    invert: bool = False
    tolerance: float = 1e-6
    terms: list[RewardTerm] | None = None


class ChatFormat(_Struct):
    """Render every prompt of a task with the model's chat template: a text
    prompt becomes one user turn after ``system`` (None: no system turn); a
    prompt given as messages gets ``system`` first when it has no system
    turn. ``enable_thinking``: the template's thinking switch (None: the
    template's default; a template without one ignores it)."""

    system: str | None = None
    enable_thinking: bool | None = None


class DatasetSource(_Struct):
    """Prompts read by the scheduler from a dataset file: ``path`` relative
    to the deployment's datasets directory (no absolute path, no ``..``).
    A file is JSON Lines, one object per line; a directory is a Hugging
    Face dataset saved with ``save_to_disk`` (its ``split`` when it holds
    several), read only where ``datasets`` is installed.

    Each row gives the prompt text in ``prompt_field`` or, with
    ``messages_field``, chat turns (a list of ``{role, content}``); its
    reference answer in ``answer_field`` (None: no answer). With
    ``answer_format`` "gsm8k" the answer is what follows the last ``####``
    (GSM8K's worked solution then ``#### 42``), commas dropped.

    ``held_out``: rows set aside for evaluation, never trained on, drawn
    with ``seed``: an int is a count, a float in (0, 1) a share of the rows;
    the held-out accuracy measures up to ``eval_size`` of them. ``order``:
    "epochs" walks the training rows in a fresh seeded order each epoch;
    "sample" draws each step's rows with replacement."""

    path: str
    prompt_field: str = "question"
    answer_field: str | None = "answer"
    messages_field: str | None = None
    answer_format: Literal["text", "gsm8k"] = "text"
    split: str = "train"
    held_out: int | float = 0
    seed: int = 0
    order: Literal["epochs", "sample"] = "epochs"


class TaskSource(_Struct):
    """Where an experiment's prompts come from: exactly one of
    ``family`` (built-in generator), ``prompts`` (given inline),
    ``stream`` True (the user pushes ``TaskPush`` messages for this
    experiment) or ``dataset`` (a file the scheduler reads).
    ``chat``: render the prompts with the model's chat template (None:
    only prompts given as messages are)."""

    family: str | None = None
    prompts: list[Prompt] | None = None
    stream: bool = False
    dataset: DatasetSource | None = None
    chat: ChatFormat | None = None


class ExperimentSpec(_Struct):
    """One RL experiment (a tenant). Validated by the scheduler on submission.
    Its adapter's own shape: ``lora_rank`` (up to the deployment's),
    ``lora_alpha`` (None: the deployment's), ``lora_targets`` (module names,
    a subset of the deployment's; None: all of the deployment's)."""

    experiment_id: str
    task: TaskSource
    reward: RewardSpec
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    learning_rate: float = 2e-3
    lora_rank: int = 8
    max_off_policy_steps: int = 0
    kl_coef: float = 0.0
    clip_eps: float = 0.2
    normalize_advantage_std: bool = False
    max_grad_norm: float = 1.0
    eval_size: int = 64
    checkpoint_every: int = 1
    seed: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    stop: list[str] = []  # stop strings of every completion (SamplingParams.stop)


class Sample(_Struct):
    """One sampled completion. ``logprobs`` holds, for every token of
    ``token_ids``, its log-probability under the policy that sampled it
    (after temperature, before top-k/top-p truncation); same length."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length", "error"]


class RolloutTimings(_Struct):
    queue_wait_s: float = 0.0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0


class TrainHyper(_Struct):
    """``temperature``: the sampling temperature of the completions, so the
    trainer scores them under the same distribution (0: greedy, scored at 1)."""

    learning_rate: float
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    normalize_advantage_std: bool = False
    max_grad_norm: float = 1.0
    max_off_policy_steps: int = 0
    checkpoint_every: int = 1
    seed: int = 0


# ---------------------------------------------------------------- messages


class ExperimentSubmit(_Message, tag="experiment_submit"):
    """Stream ``experiments``: a user submits an experiment.

    ``owner_secret``: the experiment's owner secret (16 to 256 characters);
    its cancels and task pushes must present it. The scheduler keeps only a
    salted hash of it and deletes the stream entry once handled. None: an
    experiment without an owner, which only an operator (stream ``admin``)
    can cancel or push to. It lives on the message, not on the spec: the
    spec is stored and shown, a credential must not be."""

    spec: ExperimentSpec
    ts: float = 0.0
    owner_secret: str | None = None


class ExperimentCancel(_Message, tag="experiment_cancel"):
    """Stream ``experiments``: stop an experiment; its last version stays.
    ``owner_secret``: the one it was submitted with (None: refused unless
    sent on the operators' stream ``admin``, which needs no secret)."""

    experiment_id: str
    ts: float = 0.0
    owner_secret: str | None = None


class TaskPush(_Message, tag="task_push"):
    """Stream ``tasks``: prompts a user feeds to an experiment whose task
    source is ``stream``. ``owner_secret`` as for ``ExperimentCancel``; a push
    before the submission binds the id's early prompts to its secret."""

    experiment_id: str
    prompts: list[Prompt]
    owner_secret: str | None = None


class RolloutRequest(_Message, tag="rollout_request"):
    """Stream ``rollout_requests``: generate ``sampling.n`` completions of each
    of ``prompts`` (every prompt of one step, or every held-out prompt of one
    evaluation) under adapter ``adapter_version`` of ``experiment_id``.

    ``adapter_path``: informational only (None for version 0); the rollout
    takes a version's directory from its adapter store and checks its DIGEST,
    never from a message.
    ``purpose`` "train" feeds a train step; "eval" measures held-out accuracy
    (``step`` is then the version being evaluated)."""

    request_id: str
    experiment_id: str
    step: int
    purpose: Literal["train", "eval"]
    prompts: list[Prompt]
    adapter_version: int
    adapter_path: str | None
    sampling: SamplingParams
    reward: RewardSpec
    ts: float = 0.0


class PromptResult(_Struct):
    """One prompt of a ``Completion``: its token ids and samples, or
    ``error`` (generation failed for this prompt only; ``samples`` empty)."""

    prompt: Prompt
    prompt_token_ids: list[int] = []
    samples: list[Sample] = []
    error: str | None = None


class Completion(_Message, tag="completion"):
    """Stream ``completions``: the samples of one ``RolloutRequest``,
    ``results[i]`` those of its ``prompts[i]``. ``error`` not None: the whole
    request failed (e.g. its adapter version is unavailable)."""

    request_id: str
    experiment_id: str
    step: int
    purpose: Literal["train", "eval"]
    results: list[PromptResult]
    adapter_version: int
    reward: RewardSpec
    timings: RolloutTimings = msgspec.field(default_factory=RolloutTimings)
    worker: str = ""
    error: str | None = None


class PromptScore(_Struct):
    """The rewards of one prompt's samples, one per sample. ``correct`` per
    sample: the verifier's verdict where the reward has one (None otherwise).
    ``reward_error`` not None: scoring failed; ``rewards`` then holds 0.0 and
    the group must not be trained on."""

    rewards: list[float] = []
    correct: list[bool | None] = []
    reward_metrics: dict[str, float] = {}
    reward_error: str | None = None


class ScoredCompletion(_Message, tag="scored_completion"):
    """Stream ``scored``: a ``Completion`` with ``scores[i]`` the rewards of
    its ``results[i]``."""

    completion: Completion
    scores: list[PromptScore]


class ScoredGroup(_Struct):
    """One prompt's samples with their rewards, as a train job carries them:
    ``adapter_version`` sampled them."""

    adapter_version: int
    result: PromptResult
    score: PromptScore


class TrainJob(_Message, tag="train_job"):
    """Stream ``train_jobs:<shard>``: one policy-gradient step of one tenant.
    ``base_version`` is the version being updated; the result is
    ``base_version + 1``. Groups were sampled by versions >= base_version -
    hyper.max_off_policy_steps.

    The tenant's own LoRA shape: ``lora_rank`` (up to the deployment's),
    ``lora_alpha`` (None: the deployment's) and ``lora_targets``, module
    names, a subset of the deployment's (None: all of the deployment's)."""

    job_id: str
    experiment_id: str
    step: int
    base_version: int
    lora_rank: int
    groups: list[ScoredGroup]
    hyper: TrainHyper
    ts: float = 0.0
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None


class TrainStats(_Struct):
    loss: float = 0.0
    grad_norm: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    num_tokens: int = 0
    skipped_groups: int = 0
    train_s: float = 0.0
    skipped_update: bool = False
    skip_reason: str | None = None
    write_s: float = 0.0


class AdapterPublished(_Message, tag="adapter_published"):
    """Stream ``adapters``: version ``version`` of ``experiment_id`` is
    complete on disk at ``path`` (PEFT format, digest verified)."""

    experiment_id: str
    version: int
    step: int
    path: str
    digest: str
    stats: TrainStats = msgspec.field(default_factory=TrainStats)
    trainer: str = ""
    ts: float = 0.0


# An experiment's terminal statuses. The scheduler ends a running experiment
# with an ``ExperimentEvent`` whose ``code`` is the status it ended in
# (a spec refused on submission gets ``invalid_spec`` instead).
TERMINAL_STATUSES = frozenset({"finished", "cancelled", "invalid", "failed"})


# Every ``ExperimentEvent.code`` a service sends (the README lists them).
EVENT_CODES = frozenset({
    "queued", "admitted", "invalid_spec", "duplicate_experiment", "waiting_for_prompts", "tasks_ignored",
    "cancel_ignored", "not_owner", "reward_failed", "rollout_failed", "nan_loss", "adapter_rejected", "stalled",
    "stale_samples_dropped", "train_job_out_of_order", "rank_mismatch", "train_job_invalid",
    "train_job_over_budget", "train_job_stale", "finished", "cancelled", "failed",
})


class ExperimentEvent(_Message, tag="experiment_event"):
    """Stream ``events``: something a user should see about an experiment.
    ``code`` is machine-readable (``EVENT_CODES``); a terminal one (a status
    of ``TERMINAL_STATUSES``, or ``invalid_spec``) is the scheduler's last
    word on the experiment."""

    experiment_id: str
    level: Literal["info", "warning", "error"]
    code: str
    message: str
    ts: float = 0.0


class StepMetrics(_Message, tag="step_metrics"):
    """Stream ``metrics``: one finished step of one experiment.

    - ``adapter_version``: the version that sampled the step's completions
      (the oldest one, off-policy; = ``step`` on-policy);
      ``produced_version``: the version the step's update produced
      (``step + 1``; None from senders that predate the field).
    - ``reward_mean`` / ``accuracy``: over the samples of the groups that were
      scored; None when none was (``failed_groups`` == ``groups``), so a
      reward service that is down never reads as a reward of 0.0. ``accuracy``
      is also None without a verifier.
    - ``groups``: groups (prompts) the step sampled; ``failed_groups``: those
      whose rollout or scoring failed, left out of training and of the means.
    - ``eval_accuracy``: held-out greedy accuracy of ``produced_version`` when
      measured (the last step's, measured before ``finished``), else None;
      ``start_eval_accuracy``: that of version 0 once measured, else None."""

    experiment_id: str
    step: int
    adapter_version: int
    reward_mean: float | None
    accuracy: float | None
    rollout_s: float
    train_s: float
    eval_accuracy: float | None = None
    ts: float = 0.0
    produced_version: int | None = None
    groups: int = 0
    failed_groups: int = 0
    start_eval_accuracy: float | None = None


# ---------------------------------------------------------------- streams

Message = (
    ExperimentSubmit
    | ExperimentCancel
    | TaskPush
    | RolloutRequest
    | Completion
    | ScoredCompletion
    | TrainJob
    | AdapterPublished
    | ExperimentEvent
    | StepMetrics
    | TinkerMessage  # the Tinker API's (shared/tinker_messages.py)
)

# Stream name (without prefix) -> the message kinds it carries. Sharded
# streams (``train_jobs``, ``reward``) get a ``:<suffix>`` when used.
STREAM_KINDS: dict[str, tuple[type[msgspec.Struct], ...]] = {
    "experiments": (ExperimentSubmit, ExperimentCancel),
    "tasks": (TaskPush,),
    "rollout_requests": (RolloutRequest,),
    "completions": (Completion,),
    "scored": (ScoredCompletion,),
    "train_jobs": (TrainJob,),
    "adapters": (AdapterPublished,),
    "events": (ExperimentEvent,),
    "metrics": (StepMetrics,),
    # operators only (the admin ACL user): cancel or push without an owner secret
    "admin": (ExperimentCancel, TaskPush),
    # external reward workers: requests are Completions, replies ScoredCompletions
    "reward": (Completion,),
    "reward_replies": (ScoredCompletion,),
    **TINKER_STREAM_KINDS,  # the Tinker API's: gateway <-> trainer, rollout
}

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[str, msgspec.msgpack.Decoder] = {
    # a union of a tuple of types known only at run time: only typing.Union spells it
    name: msgspec.msgpack.Decoder(
        Union[kinds] if len(kinds) > 1 else kinds[0]  # type: ignore[valid-type]  # noqa: UP007
    )
    for name, kinds in STREAM_KINDS.items()
}
_ANY_DECODER = msgspec.msgpack.Decoder(Message)


class _Envelope(msgspec.Struct):
    """Just enough of a message to check its schema before the strict decode."""

    schema: int = SCHEMA_VERSION
    kind: str = ""


_ENVELOPE_DECODER = msgspec.msgpack.Decoder(_Envelope)


def now() -> float:
    return time.time()


def encode(message: msgspec.Struct) -> bytes:
    """A message (or a nested part the services store, e.g. a ``ScoredGroup``) as msgpack."""
    return _ENCODER.encode(message)


def base_stream(stream: str) -> str:
    """``train_jobs:1`` -> ``train_jobs``."""
    return stream.split(":", 1)[0]


def decode(payload: bytes, stream: str | None = None) -> Message:
    """Decode and validate; raise ``MessageDecodeError`` with a readable reason.
    With ``stream`` given, only that stream's kinds are accepted.

    No other exception escapes: a payload is hostile input, and a consumer
    that died on one would read it again after every restart."""
    decoder = _ANY_DECODER if stream is None else _DECODERS.get(base_stream(stream))
    if decoder is None:
        raise MessageDecodeError(f"unknown stream {stream!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageDecodeError(f"payload is {type(payload).__name__}, not msgpack bytes")
    try:
        _check_schema(payload)
        return decoder.decode(payload)
    except MessageDecodeError:
        raise
    except msgspec.DecodeError as exc:
        raise MessageDecodeError(_explain(exc, stream)) from exc
    except RecursionError as exc:
        raise MessageDecodeError("payload is nested too deeply to be a message") from exc
    except Exception as exc:  # whatever else the decoder may raise on hostile bytes
        raise MessageDecodeError(f"payload cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _check_schema(payload: bytes) -> None:
    try:
        envelope = _ENVELOPE_DECODER.decode(payload)
    except msgspec.DecodeError:
        return  # not even a map: the strict decode says why
    schema = envelope.schema
    if schema > SCHEMA_VERSION:
        raise MessageDecodeError(
            f"schema {schema} is newer than this service understands ({SCHEMA_VERSION})"
        )
    oldest = MIN_SCHEMA_BY_KIND.get(envelope.kind, 0)
    if schema < oldest:
        raise MessageDecodeError(
            f"{envelope.kind} of schema {schema} is older than this service reads ({oldest}..{SCHEMA_VERSION}): "
            "its shape changed, upgrade the sender"
        )


def _explain(exc: msgspec.DecodeError, stream: str | None) -> str:
    text = str(exc)
    if "$.kind" in text:
        kinds = [k.__struct_config__.tag for k in STREAM_KINDS.get(base_stream(stream or ""), ())]
        expected = f"; stream {stream!r} carries {kinds}" if kinds else ""
        return f"unknown or missing message kind ({text}){expected}"
    return text


def stream_for(message: Message) -> str:
    """The stream (without prefix or shard suffix) that carries ``message``."""
    for name, kinds in STREAM_KINDS.items():
        if isinstance(message, kinds):
            return name
    raise TypeError(f"no stream carries {type(message).__name__}")


def kind_of(message: Message) -> str:
    return type(message).__struct_config__.tag  # type: ignore[return-value]
