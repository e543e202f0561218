"""Reading dead letters that concern an experiment. A dead letter is hostile
input too: its payload may be anything, so every reader here returns None
rather than raise on what it cannot read."""

from __future__ import annotations

import msgpack

from services.scheduler import spec as spec_rules
from shared import messages
from shared.messages import Completion, PromptResult, PromptScore, RolloutRequest, ScoredCompletion


def raw_experiment_id(payload: bytes) -> str | None:
    """The experiment id of a submission that did not decode, if it has one."""
    raw = _raw_map(payload)
    if raw is None or raw.get("kind") == "experiment_cancel":
        return None
    spec = raw.get("spec")
    candidate = spec.get("experiment_id") if isinstance(spec, dict) else raw.get("experiment_id")
    return candidate if isinstance(candidate, str) and candidate else None


def explain_refusal(payload: bytes, reason: str) -> str:
    """The spec rules' wording of why a raw submission's spec does not fit
    the schema (field first); the bus's reason when the spec itself is fine
    or cannot even be read."""
    raw = _raw_map(payload)
    if raw is None or "spec" not in raw:
        return reason
    try:
        spec_rules.convert_spec(raw["spec"], source="")
    except spec_rules.SpecFileError as exc:
        return str(exc)
    except (ValueError, TypeError, RecursionError):
        return reason
    return reason


def decoded(payload: bytes, stream: str) -> messages.Message | None:
    """A dead letter's message, or None when it does not decode (whatever
    the decoder raises)."""
    try:
        return messages.decode(payload, stream)
    except (ValueError, TypeError, RecursionError):  # MessageDecodeError is a ValueError
        return None


def failed_group_from(payload: bytes, stream: str, reason: str) -> ScoredCompletion | None:
    """A failed ``ScoredCompletion`` standing for a dead-lettered request or
    completion: every group of it fails."""
    message = decoded(payload, stream)
    failure = f"dead-lettered: {reason}"
    if isinstance(message, RolloutRequest):
        completion = Completion(
            request_id=message.request_id, experiment_id=message.experiment_id, step=message.step,
            purpose=message.purpose, results=[PromptResult(prompt=p, error=failure) for p in message.prompts],
            adapter_version=message.adapter_version, reward=message.reward, error=failure,
        )
        return ScoredCompletion(completion=completion, scores=[PromptScore() for _ in message.prompts])
    if isinstance(message, Completion):
        return ScoredCompletion(completion=message, scores=[
            PromptScore(rewards=[0.0] * len(r.samples), reward_error=failure) for r in message.results])
    return None


def _raw_map(payload: bytes) -> dict | None:
    """The payload as a plain map, or None when it is not one. Malformed,
    unhashable keys or too deeply nested (msgpack raises ValueError or
    RecursionError): all just "not a map" here."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
        return None
    return raw if isinstance(raw, dict) else None
