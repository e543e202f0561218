"""The README's protocol section matches ``shared/messages.py``: every client
facing message has a table listing exactly its fields (required ones marked
"required"), and every stream is named with its prefix."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from shared import messages as m

README = Path(__file__).resolve().parents[2] / "README.md"

# struct -> the line (regex) that introduces its table in the README
TABLES = {
    m.ExperimentSubmit: r"^`experiment_submit` on `clora:experiments`",
    m.ExperimentSpec: r"^ExperimentSpec \(",
    m.TaskSource: r"^TaskSource \(",
    m.Prompt: r"^Prompt \(",
    m.RewardSpec: r"^RewardSpec \(",
    m.ExperimentCancel: r"^`experiment_cancel` on `clora:experiments`",
    m.TaskPush: r"^`task_push` on `clora:tasks`",
    m.ExperimentEvent: r"^`experiment_event` on `clora:events`",
    m.StepMetrics: r"^`step_metrics` on `clora:metrics`",
    m.AdapterPublished: r"^`adapter_published` on `clora:adapters`",
}
SUFFIXED = {"train_jobs": "clora:train_jobs:<shard>", "reward": "clora:reward:<worker>"}


def protocol_lines() -> list[str]:
    text = README.read_text()
    assert "<!-- protocol -->" in text, "README lacks the <!-- protocol --> marker"
    return text.split("<!-- protocol -->", 1)[1].splitlines()


def table_after(anchor: str) -> list[list[str]]:
    """Rows (cells without backticks) of the first table after the line matching ``anchor``."""
    lines = protocol_lines()
    start = next((i for i, line in enumerate(lines) if re.search(anchor, line)), None)
    assert start is not None, f"README: no line matching {anchor!r}"
    rows, seen_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen_table = True
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
        elif seen_table:
            break
    assert rows, f"README: no table after {anchor!r}"
    return rows[2:]  # skip the header and the |---| line


def documented_fields(struct: type) -> dict[str, bool]:
    """Field name -> required, as messages.py defines them (``schema`` is covered by the wire format)."""
    return {f.encode_name: f.required for f in msgspec.structs.fields(struct) if f.encode_name != "schema"}


@pytest.mark.parametrize("struct", list(TABLES), ids=lambda s: s.__name__)
def test_table_lists_exactly_the_fields(struct):
    rows = table_after(TABLES[struct])
    assert {row[0]: row[2] == "required" for row in rows} == documented_fields(struct)


def test_train_stats_fields_are_all_named():
    paragraph = next(line for line in protocol_lines() if line.startswith("TrainStats ("))
    text = " ".join(protocol_lines()[protocol_lines().index(paragraph):][:6])
    for name in documented_fields(m.TrainStats):
        assert f"`{name}`" in text, name


def test_every_stream_is_named_with_its_prefix():
    text = "\n".join(protocol_lines())
    for stream in m.STREAM_KINDS:
        assert f"`{SUFFIXED.get(stream, 'clora:' + stream)}`" in text, stream
    assert "`clora:dead_letters`" in text


def test_streams_table_names_the_kinds_each_stream_carries():
    rows = {row[0]: row[1] for row in table_after(r"^### Streams")}
    for stream, kinds in m.STREAM_KINDS.items():
        name = SUFFIXED.get(stream, "clora:" + stream)
        if name not in rows:
            continue  # reply streams are documented in prose
        for kind in kinds:
            assert kind.__struct_config__.tag in rows[name], (stream, kind)


def test_wire_format_names_the_field_and_the_tag_keys():
    text = "\n".join(protocol_lines())
    assert "single field `msg`" in text and "`kind`" in text and "`schema`" in text


SERVICES = README.parent / "services"
# how a service names the code of an event it sends: ("level", "code") (but not a log line's
# `effects.log("level", "event")`), code="...",
# the trainer's refusal codes, and the scheduler's terminal statuses (`_end(view, effects, "failed"`)
CODE_PATTERNS = [
    re.compile(r'(?<!\.log\()"(?:info|warning|error)",\s*"([a-z_]+)"'),  # not a log line: effects.log(level, event)
    re.compile(r'\bcode="([a-z_]+)"'),
    re.compile(r'return "([a-z_]+)", '),
    re.compile(r'_rejected\([^()]*(?:\([^()]*\)[^()]*)*,\s*"([a-z_]+)"\)', re.S),
    re.compile(r'self\._end\([a-z_]+, [a-z_]+, "([a-z_]+)"'),
]


def codes_in_services() -> set[str]:
    codes = set()
    for path in SERVICES.rglob("*.py"):
        if "cli" in path.parts:
            continue  # the CLI reads events, it sends none
        text = path.read_text()
        for pattern in CODE_PATTERNS:
            codes.update(pattern.findall(text))
    return codes - {"info", "warning", "error"}  # the levels themselves (e.g. a Literal of them) are no codes


def documented_codes() -> set[str]:
    rows = table_after(r"^Event codes")
    return {code.strip(" `") for row in rows for code in row[0].split(",")}


def test_event_code_table_lists_exactly_the_codes_services_send():
    sent = codes_in_services()
    # the scan works
    assert {"finished", "waiting_for_prompts", "duplicate_experiment", "train_job_over_budget"} <= sent
    assert sent <= m.EVENT_CODES, sent - m.EVENT_CODES
    assert documented_codes() == m.EVENT_CODES


def test_the_client_example_reads_from_the_current_end_and_stops_at_every_end_code():
    text = README.read_text()
    code = text.split("<!-- example:submit -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "xrevrange" in code and '"0"' not in code  # never replays the history from 0
    for end in ("finished", "cancelled", "failed", "invalid_spec"):
        assert f'"{end}"' in code
