"""The bus's one definition of the wire format, as pure functions (no Redis)."""

from __future__ import annotations

import msgpack
import pytest

from shared import messages
from shared.bus import (
    DeadLetter,
    EntryRejected,
    StreamEntry,
    check_stream_carries,
    decode_dead_letter_entry,
    decode_message_entry,
    entry_fields,
    parse_entries,
)

PREFIX = "p:"


def cancel(experiment_id: str) -> messages.ExperimentCancel:
    return messages.ExperimentCancel(experiment_id=experiment_id)


def test_an_entry_is_one_msg_field_that_decodes_back():
    fields = entry_fields(cancel("exp-a"))
    assert list(fields) == ["msg"]
    assert msgpack.unpackb(fields["msg"])["kind"] == "experiment_cancel"
    entry = StreamEntry("experiments", "1-0", {b"msg": fields["msg"]})
    message, payload = decode_message_entry(entry)
    assert message == cancel("exp-a") and payload == fields["msg"]


@pytest.mark.parametrize("stream, error", [
    ("metrics", TypeError),  # a stream that does not carry the kind
    ("no_such_stream", ValueError),
])
def test_a_stream_is_checked_against_the_kind(stream, error):
    with pytest.raises(error):
        check_stream_carries(stream, cancel("exp-a"))


def test_a_suffixed_stream_needs_its_suffix():
    job = messages.TrainJob(job_id="j", experiment_id="e", step=0, base_version=0, lora_rank=8, groups=[],
                            hyper=messages.TrainHyper(learning_rate=0.1))
    with pytest.raises(ValueError, match="suffix"):
        check_stream_carries("train_jobs", job)
    check_stream_carries("train_jobs:2", job)


def test_parse_entries_reads_both_reply_shapes_and_strips_the_prefix():
    resp2 = [[b"p:events", [(b"1-0", {b"msg": b"a"}), (b"2-0", {b"msg": b"b"})]],
             [b"p:metrics", [(b"3-0", None)]]]
    resp3 = {b"p:events": [[(b"1-0", {b"msg": b"a"}), (b"2-0", {b"msg": b"b"})]],
             b"p:metrics": [[(b"3-0", None)]]}
    expected = [StreamEntry("events", "1-0", {b"msg": b"a"}), StreamEntry("events", "2-0", {b"msg": b"b"}),
                StreamEntry("metrics", "3-0", {})]  # None: trimmed while pending
    assert parse_entries(resp2, PREFIX) == expected
    assert parse_entries(resp3, PREFIX) == expected
    assert parse_entries(None, PREFIX) == [] and parse_entries([], PREFIX) == []


@pytest.mark.parametrize("fields, reason", [
    ({b"other": b"x"}, "no 'msg' field"),
    ({b"msg": b"\xc1"}, "cannot decode message"),
    ({b"msg": msgpack.packb({"kind": "step_metrics"})}, "cannot decode message"),  # not this stream's kind
    ({b"msg": entry_fields(cancel("e"))["msg"], b"extra": b"1"}, "fields other than 'msg'"),
])
def test_an_entry_that_is_not_one_message_of_its_stream_is_rejected_with_the_reason(fields, reason):
    with pytest.raises(EntryRejected, match=reason):
        decode_message_entry(StreamEntry("experiments", "1-0", fields))


def test_an_oversized_entry_is_rejected_keeping_a_bounded_prefix():
    with pytest.raises(EntryRejected, match="over the limit") as rejected:
        decode_message_entry(StreamEntry("experiments", "1-0", {b"msg": b"x" * 5000}), max_entry_bytes=100)
    assert rejected.value.payload == b"x" * 1024


def test_a_dead_letter_entry_becomes_a_dead_letter():
    fields = {b"stream": b"completions", b"entry_id": b"5-1", b"group": b"reward", b"consumer": b"r1",
              b"deliveries": b"3", b"reason": b"boom", b"payload": b"\x01\x02"}
    letter, _ = decode_dead_letter_entry(StreamEntry("dead_letters", "9-0", fields))
    assert letter == DeadLetter(dead_letter_id="9-0", stream="completions", entry_id="5-1", group="reward",
                                consumer="r1", deliveries=3, reason="boom", payload=b"\x01\x02")


def test_a_dead_letter_with_only_the_required_fields_and_odd_bytes_is_still_one():
    fields = {b"stream": b"\xff\xfe", b"reason": b"\xff", b"payload": b"\xff", b"deliveries": b"many"}
    letter, _ = decode_dead_letter_entry(StreamEntry("dead_letters", "9-0", fields))
    assert (letter.stream, letter.reason, letter.payload) == ("\ufffd\ufffd", "\ufffd", b"\xff")
    assert (letter.entry_id, letter.group, letter.consumer, letter.deliveries) == ("", "", "", 0)


@pytest.mark.parametrize("fields, reason", [
    ({b"unrelated": b"fields"}, "not a dead letter: no 'stream', 'reason', 'payload' field"),
    ({b"stream": b"experiments", b"reason": b"r"}, "no 'payload' field"),
    ({b"stream": b"experiments", b"reason": b"r", b"payload": b"x" * 500}, "over the limit"),
])
def test_an_entry_that_is_not_a_dead_letter_is_rejected_with_the_reason(fields, reason):
    with pytest.raises(EntryRejected, match=reason):
        decode_dead_letter_entry(StreamEntry("dead_letters", "9-0", fields), max_entry_bytes=200)
