"""What one scheduler transition does, as plain data: the messages to
publish, the experiment hash fields to set or delete, the other Redis
writes, and log lines. The core (``core.SchedulerCore``) returns one
``Effects`` per input; the service commits it in one MULTI/EXEC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shared.messages import ExperimentEvent, Message

# The Redis commands a transition may queue (redis-py pipeline method names).
Level = Literal["info", "warning", "error"]  # of an event and of a log line
WriteCommand = Literal["hset", "hincrby", "rpush", "sadd", "srem", "zadd", "zrem", "expire", "persist", "delete",
                       "xdel"]


@dataclass(frozen=True)
class Outgoing:
    message: Message
    stream: str | None = None  # None: the stream of the message's kind


@dataclass(frozen=True)
class Write:
    """``pipe.<command>(key, *args)``."""

    command: WriteCommand
    key: str
    args: tuple = ()


@dataclass(frozen=True)
class LogLine:
    level: Level
    event: str
    fields: dict[str, Any]


@dataclass
class Effects:
    """Committed in this order: ``writes``, then ``fields``, then ``messages``
    (one transaction, so the order is invisible to readers except where a
    write replaces a key, e.g. deleting a refused experiment's hash before
    its new fields)."""

    messages: list[Outgoing] = field(default_factory=list)
    # experiment id -> hash field -> value; None deletes the field. A later set wins.
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)

    def publish(self, message: Message, stream: str | None = None) -> None:
        self.messages.append(Outgoing(message, stream))

    def set_fields(self, experiment_id: str, **values: Any) -> None:
        self.fields.setdefault(experiment_id, {}).update(values)

    def write(self, command: WriteCommand, key: str, *args: Any) -> None:
        self.writes.append(Write(command, key, args))

    def log(self, level: Level, event: str, **fields: Any) -> None:
        self.logs.append(LogLine(level, event, fields))

    def event(self, experiment_id: str, level: Level, code: str, message: str, now: float) -> None:
        self.publish(ExperimentEvent(experiment_id=experiment_id, level=level, code=code, message=message, ts=now))

    def extend(self, other: Effects) -> None:
        self.messages.extend(other.messages)
        for experiment_id, values in other.fields.items():
            self.set_fields(experiment_id, **values)
        self.writes.extend(other.writes)
        self.logs.extend(other.logs)

    # ------------------------------------------------------------ reading (tests, logs)

    def published(self, kind: type | None = None, stream: str | None = None) -> list[Message]:
        """The messages to publish, of ``kind`` and/or to ``stream`` when given."""
        return [o.message for o in self.messages
                if (kind is None or isinstance(o.message, kind)) and (stream is None or o.stream == stream)]

    def events(self, experiment_id: str | None = None) -> list[ExperimentEvent]:
        return [o.message for o in self.messages if isinstance(o.message, ExperimentEvent)
                and (experiment_id is None or o.message.experiment_id == experiment_id)]

    def event_codes(self, experiment_id: str | None = None) -> list[str]:
        return [e.code for e in self.events(experiment_id)]

    @property
    def empty(self) -> bool:
        return not (self.messages or self.fields or self.writes)
