"""The message codec: round trips, and every way a payload is rejected."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from shared import messages as m

PROMPT = m.Prompt(prompt_id="p0", text="12+30=", answer="42")
REWARD = m.RewardSpec(type="family", family="addition")
SAMPLING = m.SamplingParams(n=4, temperature=0.7, max_tokens=8, seed=3)
SAMPLE = m.Sample(token_ids=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], text="42", finish_reason="stop")
SPEC = m.ExperimentSpec(experiment_id="exp-1", task=m.TaskSource(family="addition"), reward=REWARD, steps=3)
COMPLETION = m.Completion(
    request_id="exp-1:s0:p0", experiment_id="exp-1", step=0, purpose="train", prompt=PROMPT,
    prompt_token_ids=[1, 2, 3], samples=[SAMPLE], adapter_version=0, reward=REWARD,
    timings=m.RolloutTimings(queue_wait_s=0.5), worker="rollout-a",
)
SCORED = m.ScoredCompletion(completion=COMPLETION, rewards=[1.0], correct=[True], reward_metrics={"len": 2.0})

ONE_OF_EACH: list[m.Message] = [
    m.ExperimentSubmit(spec=SPEC, ts=1.5),
    m.ExperimentCancel(experiment_id="exp-1"),
    m.TaskPush(experiment_id="exp-1", prompts=[PROMPT, m.Prompt(prompt_id="p1", text="no answer")]),
    m.RolloutRequest(
        request_id="exp-1:s0:p0", experiment_id="exp-1", step=0, purpose="eval", prompt=PROMPT, adapter_version=2,
        adapter_path="/adapters/exp-1/v2", sampling=SAMPLING, reward=REWARD,
    ),
    COMPLETION,
    SCORED,
    m.TrainJob(job_id="exp-1:s0", experiment_id="exp-1", step=0, base_version=0, lora_rank=8, groups=[SCORED],
               hyper=m.TrainHyper(learning_rate=1e-3)),
    m.AdapterPublished(experiment_id="exp-1", version=1, step=0, path="/a/v1", digest="abc",
                       stats=m.TrainStats(loss=0.5, num_tokens=12)),
    m.ExperimentEvent(experiment_id="exp-1", level="error", code="invalid_spec", message="steps must be > 0"),
    m.StepMetrics(experiment_id="exp-1", step=0, adapter_version=0, reward_mean=0.25, accuracy=None,
                  rollout_s=1.0, train_s=0.5, eval_accuracy=0.75),
]


def raw(kind: str, **fields) -> bytes:
    """A payload as a third-party client writes it: plain msgpack."""
    return msgpack.packb({"kind": kind, "schema": 1, **fields})


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips_on_its_stream(message):
    stream = m.stream_for(message)
    assert m.decode(m.encode(message), stream) == message
    assert m.decode(m.encode(message)) == message  # without a stream: any kind


@pytest.mark.parametrize("message", ONE_OF_EACH, ids=lambda msg: type(msg).__name__)
def test_wire_map_carries_kind_and_schema(message):
    wire = msgpack.unpackb(m.encode(message))
    assert wire["kind"] == m.kind_of(message)
    assert wire["schema"] == m.SCHEMA_VERSION


def test_every_message_kind_has_a_stream():
    kinds_on_streams = {kind for kinds in m.STREAM_KINDS.values() for kind in kinds}
    assert {type(msg) for msg in ONE_OF_EACH} == set(m.Message.__args__) <= kinds_on_streams


def test_sharded_stream_names_decode_by_their_base():
    job = ONE_OF_EACH[6]
    assert m.base_stream("train_jobs:3") == "train_jobs"
    assert m.decode(m.encode(job), "train_jobs:3") == job


def test_plain_msgpack_from_a_client_decodes_with_defaults():
    spec = {"experiment_id": "exp-2", "task": {"family": "addition"}, "reward": {"type": "family", "family": "addition"}}
    message = m.decode(msgpack.packb({"kind": "experiment_submit", "spec": spec}), "experiments")
    assert isinstance(message, m.ExperimentSubmit)
    assert message.schema == m.SCHEMA_VERSION  # omitted schema: the current one
    assert message.spec.steps == 20 and message.spec.group_size == 8
    assert message.spec.task == m.TaskSource(family="addition")


def test_newer_schema_is_rejected():
    with pytest.raises(m.MessageDecodeError, match="schema 2 is newer"):
        m.decode(msgpack.packb({"kind": "experiment_cancel", "schema": 2, "experiment_id": "e"}), "experiments")


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
