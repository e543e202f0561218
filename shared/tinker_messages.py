"""Messages of the Tinker-compatible API: gateway <-> trainer and rollout.

Four streams (registered in ``shared.messages.STREAM_KINDS``, so the wire
format, decoding and the ``service`` ACL role are those of every stream):

- ``tinker_ops`` (gateway -> trainer): ``TinkerOp``, one training-side
  operation of one Tinker run (a tenant).
- ``tinker_results`` (trainer -> gateway): ``TinkerOpResult``, one per op.
- ``tinker_sample_requests`` (gateway -> rollout): ``TinkerSampleRequest``.
- ``tinker_samples`` (rollout -> gateway): ``TinkerSampleResult``, one per request.

This module imports nothing from ``shared.messages`` (which imports it);
its base class has the same wire conventions (tag ``kind``, ``schema``).
Every field is hostile input: the receiver validates ids, names, sizes.
"""

from __future__ import annotations

import re
from typing import Literal, Union

import msgspec

TINKER_RUN_PREFIX = "tk-"  # every Tinker run id starts so; no scheduler experiment id may
TINKER_SCHEMA_VERSION = 2  # equals shared.messages.SCHEMA_VERSION (checked there)
# A checkpoint name given by a user: it becomes part of a file name.
CHECKPOINT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TinkerOpKind = Literal[
    "create", "forward", "forward_backward", "optim_step", "save_weights", "save_state", "load_state",
    "compute_logprobs", "release",
]
LossFn = Literal["cross_entropy", "importance_sampling", "ppo"]


def is_checkpoint_name(value: object) -> bool:
    """True for a name a checkpoint file may be called by (no '/', no '..')."""
    return (isinstance(value, str) and CHECKPOINT_NAME_PATTERN.fullmatch(value) is not None
            and ".." not in value)


class _Part(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for nested parts: strict about unknown fields."""


class _TinkerMessage(_Part, tag_field="kind", kw_only=True):
    schema: int = TINKER_SCHEMA_VERSION


class TensorData(_Part):
    """A dense tensor: ``data`` flat (row-major), ``shape`` (empty: 1-D of
    len(data)). ``int64`` values travel as numbers and are read as ints."""

    data: list[float]
    dtype: Literal["int64", "float32"] = "float32"
    shape: list[int] = []


class Datum(_Part):
    """One training sequence: ``model_input`` the input token ids (position i
    predicts target i); ``loss_fn_inputs`` name -> tensor of the same length:
    cross_entropy: ``target_tokens``, ``weights`` (default all 1);
    importance_sampling: ``target_tokens``, ``logprobs`` (sampling), ``advantages``;
    ppo: as importance_sampling."""

    model_input: list[int]
    loss_fn_inputs: dict[str, TensorData] = {}


class AdamParams(_Part):
    """Tinker's Adam (decoupled weight decay); ``grad_clip_norm`` 0: no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class TinkerSampling(_Part):
    """How to sample, in C-LoRA's conventions: ``top_k`` 0 and ``top_p`` 1
    mean no truncation, ``temperature`` 0 greedy, ``seed`` None random.
    ``stop``: stop strings; ``stop_token_ids``: stop tokens (EOS always stops)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    seed: int | None = None


class TinkerSequence(_Part):
    """One sampled sequence: ``logprobs`` per token of ``token_ids``."""

    token_ids: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


# ---------------------------------------------------------------- messages


class TinkerOp(_TinkerMessage, tag="tinker_op"):
    """Stream ``tinker_ops``: one operation on Tinker run ``run_id`` (a tenant
    id that passes ``is_experiment_id``, e.g. "tk-<hex>", chosen by the gateway).

    - ``create``: a fresh adapter of ``lora_rank`` (seeded by ``seed``),
      version 0, Adam state empty. Creating an existing run is an error.
    - ``forward``: per datum ``logprobs`` (and ``elementwise_loss``) of
      ``loss_fn``, no gradient.
    - ``forward_backward``: as ``forward``, and the loss's gradient is ADDED
      to the run's accumulated gradient (kept until ``optim_step``).
    - ``optim_step``: one Adam step with ``adam`` on the accumulated
      gradient, which is then cleared.
    - ``save_weights``: the adapter as it is becomes the run's next immutable
      version in the adapter store (AdapterPublished on ``adapters``, so the
      rollout hot-loads it); result: ``adapter_version``; ``name`` is kept with it.
    - ``save_state`` / ``load_state``: adapter + Adam state to / from the
      trainer's checkpoint ``name`` (``is_checkpoint_name``) of run
      ``source_run_id`` (None: ``run_id``); ``load_state`` with
      ``with_optimizer`` False loads only the weights. ``load_state`` may
      target a run not created yet (it creates it with the checkpoint's rank).
    - ``compute_logprobs``: per datum the log-probability of each token of
      ``model_input`` given the ones before (output ``logprobs``, the first
      NaN: nothing precedes it), under adapter version ``adapter_version`` of the run (0: base model).
    - ``release``: forget the run's in-memory state (its versions stay).

    Loss sums over tokens (Tinker's definitions): cross_entropy
    ``-sum(weights * logp)``; importance_sampling ``-sum(exp(logp - q) * A)``;
    ppo ``-sum(min(r * A, clip(r, low, high) * A))`` with ``loss_fn_config``
    ``clip_low_threshold`` (0.8) and ``clip_high_threshold`` (1.2)."""

    op_id: str
    run_id: str
    op: TinkerOpKind
    lora_rank: int = 8
    seed: int = 0
    data: list[Datum] = []
    loss_fn: LossFn = "cross_entropy"
    loss_fn_config: dict[str, float] = {}
    adam: AdamParams | None = None
    name: str = ""
    source_run_id: str | None = None
    with_optimizer: bool = True
    adapter_version: int = 0
    ts: float = 0.0


class TinkerOpResult(_TinkerMessage, tag="tinker_op_result"):
    """Stream ``tinker_results``: the outcome of one ``TinkerOp`` (same
    ``op_id``). ``ok`` False: ``error`` says why (nothing was changed);
    ``error_kind`` "user" for a bad request, "server" for a failure of ours.
    ``loss_fn_outputs``: one map per datum (``logprobs``, ``elementwise_loss``);
    ``metrics``: e.g. ``loss:sum``; ``adapter_version``: after save_weights
    the new version, else the run's latest saved one; ``lora_rank`` of the run."""

    op_id: str
    run_id: str
    op: str
    ok: bool
    error: str | None = None
    error_kind: Literal["user", "server"] = "user"
    loss_fn_outputs: list[dict[str, TensorData]] = []
    metrics: dict[str, float] = {}
    adapter_version: int = 0
    lora_rank: int = 0
    name: str = ""
    trainer: str = ""
    ts: float = 0.0


class TinkerSampleRequest(_TinkerMessage, tag="tinker_sample_request"):
    """Stream ``tinker_sample_requests``: ``num_samples`` completions of
    ``prompt_token_ids`` under adapter ``adapter_version`` of ``run_id``
    (0: the base model; a version the rollout verifies from the adapter
    store like any other)."""

    request_id: str
    run_id: str
    adapter_version: int
    prompt_token_ids: list[int]
    num_samples: int = 1
    sampling: TinkerSampling = msgspec.field(default_factory=TinkerSampling)
    ts: float = 0.0


class TinkerSampleResult(_TinkerMessage, tag="tinker_sample_result"):
    """Stream ``tinker_samples``: the sequences of one ``TinkerSampleRequest``
    (same ``request_id``). ``error`` not None: nothing was sampled."""

    request_id: str
    run_id: str
    sequences: list[TinkerSequence] = []
    error: str | None = None
    worker: str = ""
    ts: float = 0.0


TinkerMessage = Union[TinkerOp, TinkerOpResult, TinkerSampleRequest, TinkerSampleResult]  # noqa: UP007

TINKER_STREAM_KINDS: dict[str, tuple[type[msgspec.Struct], ...]] = {
    "tinker_ops": (TinkerOp,),
    "tinker_results": (TinkerOpResult,),
    "tinker_sample_requests": (TinkerSampleRequest,),
    "tinker_samples": (TinkerSampleResult,),
}
