"""Prometheus metrics of every service (``prometheus-client``).

Each service process serves its metrics over HTTP at ``/metrics`` on
``metrics_host:metrics_port`` (``CLORA_METRICS_HOST``, default 127.0.0.1;
``CLORA_METRICS_PORT``: -1 off, 0 a free port the OS picks, else that port).
The address in use goes into the heartbeat (``metrics_url``), so ``clora up``
clusters and tests find it without fixed ports; compose and Kubernetes set
fixed ports and bind 0.0.0.0.

Every series is defined here, once, named ``clora_*``. The generic ones come
from the bus and the runtime, so every service exports them: messages handled
and failed per stream and kind, handler latency, dead letters per stream and
reason class, and the lag and pending count of each consumer group the
service reads (polled every ``STREAM_POLL_INTERVAL_S``). The services add
their own with one-line hooks (engine rows, tokens, adapter slots, loads,
retires and load latency; rollout and train time per step; trainer tenant
swaps; scoring latency and failures per reward type; experiments by state).

Label values are bounded: streams, groups and kinds are the code's own; dead
letter reasons are reduced to a few classes; reward types outside the known
set read "other"; experiment ids go through ``ExperimentLabels`` (the first
``metrics_max_experiments`` ids seen get their own label, later ones "other").
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

OTHER = "other"  # the label value of everything past a cap or outside a known set
METRICS_OFF = -1  # metrics_port: no HTTP server
STREAM_POLL_INTERVAL_S = 5.0  # how often the runtime reads its groups' lag and pending counts
DEFAULT_MAX_EXPERIMENT_LABELS = 20

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# ---------------------------------------------------------------- generic (bus, runtime)

STREAM_LAG = Gauge("clora_stream_lag", "Entries of the stream not yet delivered to the consumer group",
                   ["stream", "group"])
STREAM_PENDING = Gauge("clora_stream_pending", "Entries delivered to the consumer group and not yet acked",
                       ["stream", "group"])
MESSAGES_HANDLED = Counter("clora_messages_handled", "Stream messages handled and acked", ["stream", "kind"])
MESSAGES_FAILED = Counter("clora_messages_failed", "Stream message handlings that raised (retried or dead-lettered)",
                          ["stream", "kind", "outcome"])
MESSAGE_SECONDS = Histogram("clora_message_handle_seconds", "Time one handler took for one message",
                            ["stream"], buckets=_LATENCY_BUCKETS_S)
DEAD_LETTERS = Counter("clora_dead_letters", "Entries written to the dead-letter stream", ["stream", "reason"])

# ---------------------------------------------------------------- rollout

ENGINE_ROWS = Gauge("clora_engine_rows", "Engine rows (sequences) by state: running or waiting", ["state"])
ENGINE_CAPACITY_ROWS = Gauge("clora_engine_capacity_rows", "Rows the engine decodes at once at most")
GENERATED_TOKENS = Counter("clora_generated_tokens", "Tokens generated, per experiment (capped)", ["experiment"])
DECODE_STEPS = Counter("clora_decode_steps", "Engine decode steps")
ADAPTER_SLOTS_IN_USE = Gauge("clora_adapter_slots_in_use", "Adapter versions registered in the engine")
ADAPTER_SLOTS = Gauge("clora_adapter_slots", "Adapter slots of the engine (max_loras)")
ADAPTER_LOADS = Counter("clora_adapter_loads", "Adapter versions hot-loaded into the engine")
ADAPTER_RETIRES = Counter("clora_adapter_retires", "Adapter versions retired from the engine")
ADAPTER_LOAD_SECONDS = Histogram("clora_adapter_load_seconds", "Hot-load latency: verify + register one version",
                                 buckets=_LATENCY_BUCKETS_S)
ROLLOUT_REQUEST_SECONDS = Histogram("clora_rollout_request_seconds", "One rollout request, received to completion",
                                    buckets=_STEP_BUCKETS_S)

# ---------------------------------------------------------------- trainer

TRAIN_STEP_SECONDS = Histogram("clora_train_step_seconds", "Trainer time of one train step", buckets=_STEP_BUCKETS_S)
TRAINER_TENANT_SWAPS = Counter("clora_trainer_tenant_swaps", "Times the trainer swapped another tenant in")
TRAIN_JOBS = Counter("clora_train_jobs", "Train jobs by outcome", ["outcome"])

# ---------------------------------------------------------------- reward

SCORING_SECONDS = Histogram("clora_scoring_seconds", "Scoring one completion, per reward type", ["reward_type"],
                            buckets=_LATENCY_BUCKETS_S)
SCORING_FAILURES = Counter("clora_scoring_failures", "Prompts whose scoring failed, per reward type",
                           ["reward_type"])

# ---------------------------------------------------------------- scheduler

EXPERIMENTS = Gauge("clora_experiments", "Experiments the scheduler holds, by state", ["state"])
STEP_ROLLOUT_SECONDS = Histogram("clora_step_rollout_seconds", "Rollout time of one experiment step",
                                 buckets=_STEP_BUCKETS_S)
STEP_TRAIN_SECONDS = Histogram("clora_step_train_seconds", "Train time of one experiment step (scheduler view)",
                               buckets=_STEP_BUCKETS_S)
STEPS_FINISHED = Counter("clora_steps_finished", "Experiment steps finished, per experiment (capped)", ["experiment"])

EXPERIMENT_STATES = ("queued", "running")


def series_names() -> set[str]:
    """Every series name a service may export (counters with ``_total``,
    histograms with ``_bucket``/``_sum``/``_count``)."""
    names = set()
    for metric in _ALL:
        base = metric._name  # noqa: SLF001 (prometheus-client keeps the name here)
        if isinstance(metric, Counter):
            names |= {f"{base}_total", f"{base}_created"}
        elif isinstance(metric, Histogram):
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return names


_ALL = (STREAM_LAG, STREAM_PENDING, MESSAGES_HANDLED, MESSAGES_FAILED, MESSAGE_SECONDS, DEAD_LETTERS, ENGINE_ROWS,
        ENGINE_CAPACITY_ROWS, GENERATED_TOKENS, DECODE_STEPS, ADAPTER_SLOTS_IN_USE, ADAPTER_SLOTS, ADAPTER_LOADS,
        ADAPTER_RETIRES, ADAPTER_LOAD_SECONDS, ROLLOUT_REQUEST_SECONDS, TRAIN_STEP_SECONDS, TRAINER_TENANT_SWAPS,
        TRAIN_JOBS, SCORING_SECONDS, SCORING_FAILURES, EXPERIMENTS, STEP_ROLLOUT_SECONDS, STEP_TRAIN_SECONDS,
        STEPS_FINISHED)


# ---------------------------------------------------------------- bounded labels


class ExperimentLabels:
    """Experiment id -> label value, at most ``cap`` distinct ids: the first
    ``cap`` ids seen keep their own label, every later one reads ``other``
    (as does anything that is not a well-formed id). Thread-safe."""

    def __init__(self, cap: int = DEFAULT_MAX_EXPERIMENT_LABELS) -> None:
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def label(self, experiment_id: str) -> str:
        from shared.messages import is_experiment_id  # messages imports nothing of ours: no cycle, kept lazy

        if not is_experiment_id(experiment_id):
            return OTHER
        with self._lock:
            if experiment_id in self._seen:
                return experiment_id
            if len(self._seen) < self.cap:
                self._seen.add(experiment_id)
                return experiment_id
        return OTHER


experiment_labels = ExperimentLabels()


def set_max_experiment_labels(cap: int) -> None:
    """The process's cap (``metrics_max_experiments``); set at service start."""
    experiment_labels.cap = cap


def bounded(value: str, known: Iterable[str]) -> str:
    """``value`` when it is one of ``known``, else ``other``."""
    return value if value in set(known) else OTHER


_REASON_CLASSES = (  # first match wins; the reason texts are shared.bus's
    ("too_large", re.compile(r"entry is \d+ bytes, over the limit")),
    ("malformed", re.compile(r"entry has no |entry has fields other|payload is |not a dead letter")),
    ("undecodable", re.compile(r"cannot decode message")),
    ("max_deliveries", re.compile(r"delivered \d+ times without an ack")),
    ("handler_failed", re.compile(r"failed \d+ deliveries")),
    ("permanent", re.compile(r"permanent error")),
)
REASON_CLASSES = tuple(name for name, _ in _REASON_CLASSES) + (OTHER,)


def reason_class(reason: str) -> str:
    """A dead letter's free-text reason reduced to one of ``REASON_CLASSES``."""
    for name, pattern in _REASON_CLASSES:
        if pattern.match(reason):
            return name
    return OTHER


# ---------------------------------------------------------------- hooks


def message_settled(stream: str, kind: str, outcome: str, took_s: float) -> None:
    """One handler run ended: ``outcome`` ok, or why it failed."""
    MESSAGE_SECONDS.labels(stream).observe(took_s)
    if outcome == "ok":
        MESSAGES_HANDLED.labels(stream, kind).inc()
    else:
        MESSAGES_FAILED.labels(stream, kind, outcome).inc()


def dead_lettered(stream: str, reason: str) -> None:
    DEAD_LETTERS.labels(stream, reason_class(reason)).inc()


def set_group_backlog(stream: str, group: str, lag: int | None, pending: int) -> None:
    """A group's lag (None: Redis could not say, e.g. after a trim) and pending count."""
    if lag is not None:
        STREAM_LAG.labels(stream, group).set(lag)
    STREAM_PENDING.labels(stream, group).set(pending)


class CounterFollower:
    """Advance a counter to a running total read elsewhere (e.g. engine
    stats): ``follow(counter, total, *labels)`` adds what grew since the
    last call (a total that went down, a restarted engine, adds nothing)."""

    def __init__(self) -> None:
        self._last: dict[tuple, float] = {}

    def follow(self, counter: Counter, total: float, *labels: str) -> None:
        key = (id(counter), labels)
        grown = total - self._last.get(key, 0.0)
        self._last[key] = total
        if grown > 0:
            (counter.labels(*labels) if labels else counter).inc(grown)


# ---------------------------------------------------------------- serving


class MetricsServer:
    """The process's ``/metrics`` HTTP endpoint (a daemon thread of
    prometheus-client); ``port`` is the one bound (0 asks the OS for one)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self._server, self._thread = start_http_server(port, addr=host)
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
