"""The metrics sink: follows the ``metrics``, ``adapters`` and ``events``
streams as a client (the client ACL role may read all three; it may not
read consumer groups, so the sink tails them with ``StreamTail``) and writes
each experiment's curves to the configured writers (``services.sink.writers``).

Resuming: after each batch of entries the writers are flushed, then the
state file (``<tensorboard dir>/.clora-sink.json`` unless given) records the
stream positions and the ledger of points written
(``services.sink.points.Ledger``). A restarted sink reads on from those
positions and writes no point twice. A fresh sink starts from the oldest
entry the streams still hold (they are capped: ``exp:<id>:metrics`` keeps
the full history of a step's metrics, what ``clora status`` shows).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from services.sink.points import Ledger, points_of
from shared.bus import (
    MAX_REDIS_RETRY_DELAY_S,
    RETRYABLE_REDIS_ERRORS,
    TAIL_RETRY_FIRST_DELAY_S,
    EntryRejected,
    StreamBus,
    StreamEntry,
    StreamTail,
    decode_message_entry,
)
from shared.client import END_CODES
from shared.messages import AdapterPublished, ExperimentEvent, StepMetrics, is_experiment_id

log = structlog.get_logger(__name__)

STREAMS = ["metrics", "adapters", "events"]
STATE_FILE = ".clora-sink.json"
MAX_NOTE_CHARS = 2000


class Writer(Protocol):
    def write(self, points: list) -> None: ...
    def note(self, experiment_id: str, step: int, text: str) -> None: ...
    def end(self, experiment_id: str, status: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class SinkState:
    """What survives a restart: the stream positions and the points written."""

    last_ids: dict[str, str] = field(default_factory=lambda: {s: "0-0" for s in STREAMS})
    ledger: Ledger = field(default_factory=Ledger)
    last_step: dict[str, int] = field(default_factory=dict)  # per experiment: for events' x position

    def save(self, path: Path) -> None:
        text = json.dumps({"last_ids": self.last_ids, "ledger": self.ledger.to_json(), "last_step": self.last_step})
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(text)
        os.replace(temp, path)

    @classmethod
    def load(cls, path: Path) -> "SinkState":
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        state = cls(ledger=Ledger.from_json(raw.get("ledger")))
        for stream in STREAMS:
            value = raw.get("last_ids", {}).get(stream)
            if isinstance(value, str) and _is_entry_id(value):
                state.last_ids[stream] = value
        state.last_step = {k: v for k, v in raw.get("last_step", {}).items()
                           if is_experiment_id(k) and isinstance(v, int)}
        return state


def _is_entry_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit()


class MetricsSink:
    """One long-lived reader: ``setup()``, ``run()`` until ``stop()``, ``close()``."""

    def __init__(self, bus: StreamBus, writers: list[Writer], state_path: Path) -> None:
        self.bus = bus
        self.writers = writers
        self.state_path = state_path
        self.stopping = asyncio.Event()
        self.state = SinkState()
        self.tail = StreamTail(bus, list(STREAMS), retry_event="sink_read_retrying")
        self.entries_handled = 0

    def setup(self) -> None:
        self.state = SinkState.load(self.state_path)
        self.tail.last_ids.update(self.state.last_ids)
        log.info("sink_started", state_file=str(self.state_path), positions=self.state.last_ids)

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        delay_s = TAIL_RETRY_FIRST_DELAY_S
        while not self.stopping.is_set():
            try:
                entries = await self.tail.read()
                delay_s = TAIL_RETRY_FIRST_DELAY_S
            except RETRYABLE_REDIS_ERRORS as exc:
                log.warning("sink_read_retrying", error=repr(exc), retry_in_s=delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, MAX_REDIS_RETRY_DELAY_S)
                continue
            if entries:  # the writers' file and HTTP calls run off the loop
                await asyncio.to_thread(self.handle_batch, entries)

    def handle_batch(self, entries: list[StreamEntry]) -> None:
        """Write the batch's points, flush, then record the new positions."""
        for entry in entries:
            self._handle(entry)
            self.tail.advance(entry)
        for writer in self.writers:
            writer.flush()
        self.state.last_ids = dict(self.tail.last_ids)
        self.state.save(self.state_path)
        self.entries_handled += len(entries)

    def _handle(self, entry: StreamEntry) -> None:
        try:
            message, _payload = decode_message_entry(entry)
        except EntryRejected as exc:
            log.warning("sink_entry_skipped", stream=entry.stream, entry_id=entry.entry_id, reason=exc.reason)
            return
        experiment_id = getattr(message, "experiment_id", "")
        if not is_experiment_id(experiment_id):
            return
        if isinstance(message, (StepMetrics, AdapterPublished)):
            self._write_points(message)
        elif isinstance(message, ExperimentEvent):
            self._note(message)

    def _write_points(self, message: StepMetrics | AdapterPublished) -> None:
        points = self.state.ledger.new_points(points_of(message))
        if isinstance(message, StepMetrics):
            last = self.state.last_step.get(message.experiment_id, -1)
            self.state.last_step[message.experiment_id] = max(last, message.step)
        if points:
            for writer in self.writers:
                writer.write(points)

    def _note(self, event: ExperimentEvent) -> None:
        step = self.state.last_step.get(event.experiment_id, 0)
        text = f"{event.level} {event.code}: {event.message}"[:MAX_NOTE_CHARS]
        for writer in self.writers:
            writer.note(event.experiment_id, step, text)
            if event.code in END_CODES:
                writer.end(event.experiment_id, event.code)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def status(self) -> dict[str, Any]:
        return {"entries_handled": self.entries_handled, "positions": dict(self.tail.last_ids)}
