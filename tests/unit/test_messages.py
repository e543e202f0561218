"""The message codec: round trips, and every way a payload is rejected."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from shared import messages as m
from shared import tinker_messages as t

PROMPT = m.Prompt(prompt_id="p0", text="12+30=", answer="42")
REWARD = m.RewardSpec(type="family", family="addition")
SAMPLING = m.SamplingParams(n=4, temperature=0.7, max_tokens=8, seed=3)
SAMPLE = m.Sample(token_ids=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], text="42", finish_reason="stop")
SPEC = m.ExperimentSpec(experiment_id="exp-1", task=m.TaskSource(family="addition"), reward=REWARD, steps=3)
RESULT = m.PromptResult(prompt=PROMPT, prompt_token_ids=[1, 2, 3], samples=[SAMPLE])
COMPLETION = m.Completion(
    request_id="exp-1:s0", experiment_id="exp-1", step=0, purpose="train",
    results=[RESULT, m.PromptResult(prompt=PROMPT, error="empty after tokenization")], adapter_version=0,
    reward=REWARD, timings=m.RolloutTimings(queue_wait_s=0.5), worker="rollout-a",
)
SCORE = m.PromptScore(rewards=[1.0], correct=[True], reward_metrics={"len": 2.0})
SCORED = m.ScoredCompletion(completion=COMPLETION, scores=[SCORE, m.PromptScore(reward_error="generation failed")])
GROUP = m.ScoredGroup(adapter_version=0, result=RESULT, score=SCORE)

ONE_OF_EACH: list[m.Message] = [
    m.ExperimentSubmit(spec=SPEC, ts=1.5),
    m.ExperimentCancel(experiment_id="exp-1"),
    m.TaskPush(experiment_id="exp-1", prompts=[PROMPT, m.Prompt(prompt_id="p1", text="no answer")]),
    m.RolloutRequest(
        request_id="exp-1:e2", experiment_id="exp-1", step=2, purpose="eval", prompts=[PROMPT], adapter_version=2,
        adapter_path="/adapters/exp-1/v2", sampling=SAMPLING, reward=REWARD,
    ),
    COMPLETION,
    SCORED,
    m.TrainJob(job_id="exp-1:s0", experiment_id="exp-1", step=0, base_version=0, lora_rank=8, groups=[GROUP],
               hyper=m.TrainHyper(learning_rate=1e-3)),
    m.AdapterPublished(experiment_id="exp-1", version=1, step=0, path="/a/v1", digest="abc",
                       stats=m.TrainStats(loss=0.5, num_tokens=12)),
    m.ExperimentEvent(experiment_id="exp-1", level="error", code="invalid_spec", message="steps must be > 0"),
    m.StepMetrics(experiment_id="exp-1", step=0, adapter_version=0, reward_mean=0.25, accuracy=None,
                  rollout_s=1.0, train_s=0.5, eval_accuracy=0.75),
]


def raw(kind: str, **fields) -> bytes:
    """A payload as a third-party client writes it: plain msgpack."""
    return msgpack.packb({"kind": kind, "schema": m.SCHEMA_VERSION, **fields})


# the Tinker API's (shared/tinker_messages.py)
TINKER_ONES: list[m.Message] = [
    t.TinkerOp(op_id="op-1", run_id="tk-1", op="forward_backward", data=[t.Datum(
        model_input=[1, 2], loss_fn_inputs={"target_tokens": t.TensorData(data=[2.0, 3.0], dtype="int64")})],
        adam=t.AdamParams(learning_rate=0.1)),
    t.TinkerOpResult(op_id="op-1", run_id="tk-1", op="forward", ok=True, metrics={"loss:sum": 1.5},
                     loss_fn_outputs=[{"logprobs": t.TensorData(data=[-0.5, -1.0])}]),
    t.TinkerSampleRequest(request_id="r-1", run_id="tk-1", adapter_version=2, prompt_token_ids=[1, 2],
                          sampling=t.TinkerSampling(max_tokens=4, stop=["\n"])),
    t.TinkerSampleResult(request_id="r-1", run_id="tk-1", sequences=[
        t.TinkerSequence(token_ids=[3], logprobs=[-0.1], stop_reason="length")]),
]
ALL_KINDS = ONE_OF_EACH + TINKER_ONES


@pytest.mark.parametrize("message", ALL_KINDS, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips_on_its_stream(message):
    stream = m.stream_for(message)
    assert m.decode(m.encode(message), stream) == message
    assert m.decode(m.encode(message)) == message  # without a stream: any kind


@pytest.mark.parametrize("message", ALL_KINDS, ids=lambda msg: type(msg).__name__)
def test_wire_map_carries_kind_and_schema(message):
    wire = msgpack.unpackb(m.encode(message))
    assert wire["kind"] == m.kind_of(message)
    assert wire["schema"] == m.SCHEMA_VERSION


def test_every_message_kind_has_a_stream():
    kinds_on_streams = {kind for kinds in m.STREAM_KINDS.values() for kind in kinds}
    assert {type(msg) for msg in ALL_KINDS} == set(m.Message.__args__) <= kinds_on_streams


def test_sharded_stream_names_decode_by_their_base():
    job = ONE_OF_EACH[6]
    assert m.base_stream("train_jobs:3") == "train_jobs"
    assert m.decode(m.encode(job), "train_jobs:3") == job


def test_plain_msgpack_from_a_client_decodes_with_defaults():
    spec = {"experiment_id": "exp-2", "task": {"family": "addition"},
            "reward": {"type": "family", "family": "addition"}}
    message = m.decode(msgpack.packb({"kind": "experiment_submit", "spec": spec}), "experiments")
    assert isinstance(message, m.ExperimentSubmit)
    assert message.schema == m.SCHEMA_VERSION  # omitted schema: the current one
    assert message.spec.steps == 20 and message.spec.group_size == 8
    assert message.spec.task == m.TaskSource(family="addition")


def test_newer_schema_is_rejected():
    newer = m.SCHEMA_VERSION + 1
    with pytest.raises(m.MessageDecodeError, match=f"schema {newer} is newer"):
        m.decode(msgpack.packb({"kind": "experiment_cancel", "schema": newer, "experiment_id": "e"}), "experiments")


@pytest.mark.parametrize("message", [COMPLETION, SCORED], ids=lambda msg: type(msg).__name__)
def test_a_changed_kind_of_an_older_schema_is_refused_with_the_reason(message):
    """Schema 2 put every prompt of a step in one request: an old sender's
    one-prompt completion (or an old reward worker's reply) is refused, not misread."""
    old = msgspec.msgpack.decode(m.encode(message))
    old["schema"] = 1
    with pytest.raises(m.MessageDecodeError, match="of schema 1 is older than this service reads"):
        m.decode(msgpack.packb(old), m.stream_for(message))


def test_current_and_older_schema_are_accepted():
    assert m.decode(msgpack.packb({"kind": "experiment_cancel", "schema": 0, "experiment_id": "e"})).schema == 0


@pytest.mark.parametrize("payload, fragment", [
    (raw("experiment_cancel", experiment_id="e", priority=3), "unknown field `priority`"),
    (raw("experiment_submit", spec={"experiment_id": "e", "task": {}, "reward": {"type": "regex"}, "colour": 1}),
     "unknown field `colour`"),
    (raw("task_push", experiment_id="e", prompts=[{"prompt_id": "p", "text": "t", "hint": "x"}]),
     "unknown field `hint`"),
], ids=["top-level", "nested", "in-list"])
def test_unknown_fields_are_rejected(payload, fragment):
    with pytest.raises(m.MessageDecodeError, match=fragment):
        m.decode(payload)


@pytest.mark.parametrize("payload, path", [
    (raw("experiment_cancel", experiment_id=123), "$.experiment_id"),
    (raw("experiment_event", experiment_id="e", level="fatal", code="c", message="m"), "$.level"),
    (raw("step_metrics", experiment_id="e", step="one", adapter_version=0, reward_mean=0.0, accuracy=None,
         rollout_s=0.0, train_s=0.0), "$.step"),
    (raw("task_push", experiment_id="e", prompts=[{"prompt_id": "p", "text": 7}]), "$.prompts[0].text"),
], ids=["str-got-int", "bad-literal", "int-got-str", "nested-in-list"])
def test_wrong_types_are_rejected_with_the_field_path(payload, path):
    with pytest.raises(m.MessageDecodeError) as caught:
        m.decode(payload)
    assert path in str(caught.value)


def test_missing_required_field_is_named():
    with pytest.raises(m.MessageDecodeError, match="experiment_id"):
        m.decode(raw("experiment_cancel"), "experiments")


def test_wrong_kind_for_a_stream_names_what_the_stream_carries():
    metrics = ONE_OF_EACH[-1]
    with pytest.raises(m.MessageDecodeError) as caught:
        m.decode(m.encode(metrics), "experiments")
    reason = str(caught.value)
    assert "step_metrics" in reason
    assert "experiment_submit" in reason and "experiment_cancel" in reason
    assert m.decode(m.encode(metrics), "metrics") == metrics


def test_unknown_kind_is_rejected():
    with pytest.raises(m.MessageDecodeError, match="kind"):
        m.decode(raw("experiment_pause", experiment_id="e"))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3]),
                                     msgpack.packb("a string")])
def test_garbage_is_rejected_not_guessed(payload):
    with pytest.raises(m.MessageDecodeError):
        m.decode(payload, "experiments")


def test_unknown_stream_is_rejected():
    with pytest.raises(m.MessageDecodeError, match="unknown stream"):
        m.decode(m.encode(ONE_OF_EACH[1]), "nowhere")


def test_stream_for_each_kind():
    assert [m.stream_for(msg) for msg in ONE_OF_EACH] == [
        "experiments", "experiments", "tasks", "rollout_requests", "completions", "scored", "train_jobs",
        "adapters", "events", "metrics",
    ]
    with pytest.raises(TypeError):
        m.stream_for(PROMPT)  # a nested part, not a message


def test_decode_error_is_a_value_error_with_the_cause_kept():
    with pytest.raises(ValueError) as caught:
        m.decode(b"\xc1")
    assert isinstance(caught.value.__cause__, msgspec.DecodeError)


# ---------------------------------------------------------------- hostile payloads (issue 12)

DEEP_MAPS = b"\x81\xa1a" * 100_000 + b"\xc0"  # {"a": {"a": ... nil}} 100k levels
DEEP_ARRAYS = b"\x91" * 100_000 + b"\xc0"
DEEP_INSIDE_A_VALID_LOOKING_MESSAGE = (
    b"\x82\xa4kind\xb1experiment_cancel\xadexperiment_id" + DEEP_MAPS
)


@pytest.mark.parametrize("payload", [DEEP_MAPS, DEEP_ARRAYS, DEEP_INSIDE_A_VALID_LOOKING_MESSAGE],
                         ids=["maps", "arrays", "inside-a-message"])
@pytest.mark.parametrize("stream", ["experiments", "rollout_requests", "adapters", "events", None])
def test_deep_nesting_is_a_decode_error_not_a_recursion_error(payload, stream):
    with pytest.raises(m.MessageDecodeError) as caught:
        m.decode(payload, stream)
    assert "nested too deeply" in str(caught.value) or "Expected" in str(caught.value)


def test_deep_nesting_reason_says_what_is_wrong():
    with pytest.raises(m.MessageDecodeError, match="nested too deeply"):
        m.decode(DEEP_MAPS, "events")


@pytest.mark.parametrize("payload", ["a str", None, 42, ["msg"], {"kind": "experiment_cancel"}],
                         ids=["str", "none", "int", "list", "dict"])
def test_a_payload_that_is_not_bytes_is_a_decode_error(payload):
    with pytest.raises(m.MessageDecodeError, match=f"payload is {type(payload).__name__}, not msgpack bytes"):
        m.decode(payload, "experiments")


def test_bytes_like_payloads_still_decode():
    cancel = ONE_OF_EACH[1]
    assert m.decode(bytearray(m.encode(cancel)), "experiments") == cancel
    assert m.decode(memoryview(m.encode(cancel)), "experiments") == cancel


@pytest.mark.parametrize("payload", [
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e", "schema": 2**63}),
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e", "schema": -(2**63)}),
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e", "schema": float("nan")}),
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e", "schema": "1"}),
    msgpack.packb({"kind": 7, "experiment_id": "e"}),
    msgpack.packb({b"kind": b"experiment_cancel", b"experiment_id": b"e"}, use_bin_type=True),
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e"}) + b"trailing",
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e"})[:-1],
    b"\xdf\xff\xff\xff\xff",  # a map header claiming 4 billion entries, then nothing
    b"\xdb\xff\xff\xff\xff",  # a str header claiming 4 GiB, then nothing
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "e", 1: 2}),
    msgpack.packb({"kind": "experiment_cancel", "experiment_id": "x" * 2_000_000, "pad": "y"}),
], ids=["schema-huge", "schema-very-negative", "schema-nan", "schema-str", "kind-int", "bin-keys", "trailing-bytes",
        "truncated", "map-header-lie", "str-header-lie", "int-key", "huge-string-unknown-field"])
def test_hostile_payloads_raise_only_message_decode_error(payload):
    try:
        message = m.decode(payload, "experiments")
    except m.MessageDecodeError as exc:
        assert str(exc).strip(), "the reason must not be empty"
    else:  # the only acceptable outcome besides a decode error: a valid, typed message
        assert isinstance(message, m.ExperimentCancel)


def test_random_bytes_never_raise_anything_but_message_decode_error():
    import random

    rng = random.Random(12)
    decoded = 0
    for _ in range(3000):
        payload = rng.randbytes(rng.randrange(0, 64))
        for stream in ("experiments", "completions", "train_jobs:0", "reward_replies"):
            try:
                m.decode(payload, stream)
                decoded += 1
            except m.MessageDecodeError as exc:
                assert str(exc)
    assert decoded == 0  # random bytes never happen to be a valid message


def test_non_finite_floats_decode_as_floats_and_round_trip():
    """NaN/inf are representable msgpack floats; deciding whether a value may be
    non-finite is each consumer's job (a NaN reward is a failed sample, say)."""
    scored = m.ScoredCompletion(completion=COMPLETION, scores=[m.PromptScore(rewards=[float("nan")])])
    decoded = m.decode(m.encode(scored), "scored")
    assert decoded.scores[0].rewards[0] != decoded.scores[0].rewards[0]


def test_step_metrics_from_an_older_sender_decodes_with_the_new_fields_defaulted():
    old = msgpack.packb({"kind": "step_metrics", "schema": 1, "experiment_id": "exp-1", "step": 2,
                         "adapter_version": 2, "reward_mean": 0.5, "accuracy": None, "rollout_s": 1.0,
                         "train_s": 0.5})
    metrics = m.decode(old, "metrics")
    assert (metrics.produced_version, metrics.groups, metrics.failed_groups, metrics.start_eval_accuracy) == \
        (None, 0, 0, None)


def test_step_metrics_with_no_group_scored_carries_a_nil_reward():
    metrics = m.StepMetrics(experiment_id="exp-1", step=0, adapter_version=0, reward_mean=None, accuracy=None,
                            rollout_s=1.0, train_s=0.5, produced_version=1, groups=4, failed_groups=4)
    raw = msgpack.unpackb(m.encode(metrics))
    assert raw["reward_mean"] is None and raw["failed_groups"] == raw["groups"] == 4
    assert m.decode(m.encode(metrics), "metrics") == metrics


def test_every_terminal_status_but_invalid_is_an_event_code():
    assert m.TERMINAL_STATUSES - {"invalid"} <= m.EVENT_CODES
    assert "invalid" not in m.EVENT_CODES and "invalid_spec" in m.EVENT_CODES


def test_owner_secrets_are_defaulted_and_the_admin_stream_carries_cancels_and_pushes():
    import msgpack

    plain = msgpack.packb({"kind": "experiment_cancel", "schema": 1, "experiment_id": "a"})
    assert m.decode(plain, "experiments").owner_secret is None  # a sender that predates the field
    for message in (m.ExperimentCancel(experiment_id="a", owner_secret="s" * 16),
                    m.TaskPush(experiment_id="a", prompts=[], owner_secret="s" * 16)):
        assert m.decode(m.encode(message), "admin") == message
    with pytest.raises(m.MessageDecodeError):
        m.decode(m.encode(m.ExperimentSubmit(spec=m.ExperimentSpec(
            experiment_id="a", task=m.TaskSource(family="add"), reward=m.RewardSpec(type="family")))), "admin")
    assert m.stream_for(m.ExperimentCancel(experiment_id="a")) == "experiments"  # admin only when asked for
    assert "not_owner" in m.EVENT_CODES
