"""``clora submit | status | watch | cancel``: the user's side of experiments.

Every command finds Redis through ``--redis-url``, else ``REDIS_URL``, else
the URL that ``clora up`` wrote to ``<data dir>/redis_url`` (data dir:
``--data-dir``, ``CLORA_DATA_DIR`` or ``.clora``); the key prefix through
``--stream-prefix`` or ``CLORA_STREAM_PREFIX`` (default ``clora:``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import redis

from services.scheduler.spec import SpecFileError, convert_spec, load_spec_file, parse_spec_text
from services.scheduler.state import ExperimentRecord, Keys, list_experiments, read_experiment, read_metrics
from shared.messages import SCHEMA_VERSION, ExperimentCancel, ExperimentSubmit, encode, now

DEFAULT_PREFIX = "clora:"
DEFAULT_DATA_DIR = ".clora"
REDIS_URL_FILE = "redis_url"  # written by `clora up` into its data dir
WATCH_INTERVAL_S = 0.5
BAR_WIDTH = 24
EXIT_USAGE = 2


class CliError(RuntimeError):
    """A user-facing failure: printed without a traceback."""


# ---------------------------------------------------------------- connection


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="default: REDIS_URL, else the one `clora up` wrote")
    parser.add_argument("--stream-prefix", default=None, help="default: CLORA_STREAM_PREFIX or clora:")
    parser.add_argument("--data-dir", default=None, help="default: CLORA_DATA_DIR or .clora")


def resolve_redis_url(args: argparse.Namespace) -> str:
    if args.redis_url:
        return args.redis_url
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    data_dir = Path(args.data_dir or os.environ.get("CLORA_DATA_DIR") or DEFAULT_DATA_DIR)
    url_file = data_dir / REDIS_URL_FILE
    if url_file.is_file():
        return url_file.read_text().strip()
    raise CliError(f"no Redis to talk to: pass --redis-url, set REDIS_URL, or start `clora up` "
                   f"(it writes {url_file})")


def resolve_prefix(args: argparse.Namespace) -> str:
    return args.stream_prefix or os.environ.get("CLORA_STREAM_PREFIX") or DEFAULT_PREFIX


def connect(args: argparse.Namespace) -> tuple[redis.Redis, Keys]:
    client = redis.Redis.from_url(resolve_redis_url(args))
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        raise CliError(f"cannot reach Redis: {exc}") from None
    return client, Keys(resolve_prefix(args))


def publish(client: redis.Redis, keys: Keys, stream: str, payload: bytes) -> None:
    client.xadd(keys.stream(stream), {"msg": payload}, maxlen=100_000, approximate=True)


def _run(command, argv: Sequence[str]) -> int:
    try:
        return command(list(argv))
    except CliError as exc:
        print(f"clora: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- submit / cancel


def submit(argv: list[str]) -> int:
    """``clora submit SPEC.yaml|SPEC.json [--id ID]``: print the experiment id.
    A file that does not parse or does not fit the schema: the reason, exit 2
    (one with an ``experiment_id`` is still sent, so ``clora status`` lists the
    refusal alongside the scheduler's own ones)."""
    return _run(_submit, argv)


def _submit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora submit", description="submit an experiment spec")
    parser.add_argument("spec", help="YAML or JSON file")
    parser.add_argument("--id", dest="experiment_id", default=None, help="override the spec's experiment_id")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    path = Path(args.spec)
    try:
        text = path.read_text(encoding="utf-8")
        data = parse_spec_text(text, str(path))
    except OSError as exc:
        print(f"clora submit: {path}: cannot read ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_USAGE
    except SpecFileError as exc:
        print(f"clora submit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(data, dict) and args.experiment_id:
        data["experiment_id"] = args.experiment_id
    try:
        spec = convert_spec(data, str(path))
    except SpecFileError as exc:
        print(f"clora submit: refused: {exc}", file=sys.stderr)
        _send_refused(args, data)
        return EXIT_USAGE
    client, keys = connect(args)
    publish(client, keys, "experiments", encode(ExperimentSubmit(spec=spec, ts=now())))
    print(spec.experiment_id)
    return 0


def _send_refused(args: argparse.Namespace, data) -> None:
    """Send a spec that failed the schema as it is: the scheduler records it as
    invalid with the decoder's reason (only when it names an experiment_id)."""
    if not isinstance(data, dict) or not isinstance(data.get("experiment_id"), str):
        return
    try:
        client, keys = connect(args)
        payload = msgspec.msgpack.encode({"kind": "experiment_submit", "schema": SCHEMA_VERSION,
                                          "spec": data, "ts": now()})
        publish(client, keys, "experiments", payload)
    except (CliError, TypeError, redis.exceptions.RedisError) as exc:
        print(f"clora submit: (the refusal was not recorded: {exc})", file=sys.stderr)


def cancel(argv: list[str]) -> int:
    """``clora cancel EXP [EXP...]``."""
    return _run(_cancel, argv)


def _cancel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora cancel", description="cancel experiments")
    parser.add_argument("experiments", nargs="+")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    client, keys = connect(args)
    exit_code = 0
    for experiment_id in args.experiments:
        record = read_experiment(client, keys, experiment_id)
        if record is None:
            print(f"clora cancel: unknown experiment {experiment_id!r}", file=sys.stderr)
            exit_code = 1
            continue
        publish(client, keys, "experiments", encode(ExperimentCancel(experiment_id=experiment_id, ts=now())))
        print(f"{experiment_id}: cancel requested (was {record.status})")
    return exit_code


# ---------------------------------------------------------------- status


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def accuracy_text(record: ExperimentRecord) -> str:
    if record.start_accuracy is None and record.final_accuracy is None:
        return "-"
    return f"{_fmt(record.start_accuracy)}->{_fmt(record.final_accuracy)}"


def status_rows(records: list[ExperimentRecord]) -> list[list[str]]:
    rows = [["EXPERIMENT", "STATUS", "STEP", "REWARD", "ACCURACY", "ERROR/REASON"]]
    for r in records:
        rows.append([r.experiment_id, r.status, f"{r.step}/{r.steps}", _fmt(r.reward_mean),
                     accuracy_text(r), (r.error or (f"{r.errors} failed groups" if r.errors else ""))])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def status(argv: list[str]) -> int:
    """``clora status [EXP...] [--json]``: one row per experiment."""
    return _run(_status, argv)


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora status", description="list experiments")
    parser.add_argument("experiments", nargs="*", help="only these (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    client, keys = connect(args)
    records = _select(client, keys, args.experiments)
    if args.json:
        print(json.dumps({"experiments": [msgspec.to_builtins(r) for r in records]}, indent=2))
    elif not records:
        print("no experiments")
    else:
        print(format_table(status_rows(records)))
    return 0 if len(records) >= len(args.experiments) else 1


def _select(client: redis.Redis, keys: Keys, experiment_ids: list[str]) -> list[ExperimentRecord]:
    if not experiment_ids:
        return list_experiments(client, keys)
    records = []
    for experiment_id in experiment_ids:
        record = read_experiment(client, keys, experiment_id)
        if record is None:
            print(f"clora: unknown experiment {experiment_id!r}", file=sys.stderr)
        else:
            records.append(record)
    return records


# ---------------------------------------------------------------- watch


def progress_line(record: ExperimentRecord, id_width: int = 16) -> str:
    """One terminal line: ``add-1  [#########.......]  9/20  reward 0.41  acc 0.25->-  running``."""
    fraction = record.step / record.steps if record.steps else 0.0
    filled = int(round(fraction * BAR_WIDTH))
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    accuracy = "-" if record.accuracy is None else f"{record.accuracy:.2f}"
    tail = record.status if record.error is None else f"{record.status}: {record.error}"
    return (f"{record.experiment_id:<{id_width}} [{bar}] {record.step:>3}/{record.steps:<3} "
            f"reward {_fmt(record.reward_mean)}  acc {accuracy}  held-out {accuracy_text(record)}  {tail}")


class ProgressDisplay:
    """Redraws one line per experiment in place on a terminal; elsewhere
    prints a line only when it changed."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._drawn = 0
        self._last: dict[str, str] = {}

    def show(self, records: list[ExperimentRecord]) -> None:
        width = max([16, *(len(r.experiment_id) for r in records)])
        lines = [progress_line(r, width) for r in records]
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            self.stream.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            for record, line in zip(records, lines):
                if self._last.get(record.experiment_id) != line:
                    self.stream.write(line + "\n")
                    self._last[record.experiment_id] = line
        self.stream.flush()


def watch(argv: list[str]) -> int:
    """``clora watch [EXP...]``: live progress until every experiment is
    finished, cancelled, invalid or failed (exit 0 when none failed/invalid)."""
    return _run(_watch, argv)


def _watch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora watch", description="live progress of experiments")
    parser.add_argument("experiments", nargs="*", help="default: every queued or running experiment")
    parser.add_argument("--interval", type=float, default=WATCH_INTERVAL_S, help="seconds between refreshes")
    parser.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    client, keys = connect(args)
    ids = args.experiments or [r.experiment_id for r in list_experiments(client, keys) if not r.terminal]
    if not ids:
        print("nothing to watch: no queued or running experiment")
        return 0
    records = watch_until_done(client, keys, ids, interval_s=args.interval, timeout_s=args.timeout)
    if any(r is None for r in records):
        return 1
    return 0 if all(r.status in ("finished", "cancelled") for r in records) else 1


def watch_until_done(client: redis.Redis, keys: Keys, experiment_ids: list[str], *, interval_s: float = WATCH_INTERVAL_S,
                     timeout_s: float = 0.0, display: ProgressDisplay | None = None,
                     should_stop=None) -> list[ExperimentRecord | None]:
    """Poll the state and redraw until every experiment is terminal (or the
    timeout, or ``should_stop()``); returns the last records."""
    display = display or ProgressDisplay()
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while True:
        records = [read_experiment(client, keys, i) for i in experiment_ids]
        display.show([r if r is not None else ExperimentRecord(experiment_id=i, status="unknown")
                      for i, r in zip(experiment_ids, records)])
        done = all(r is not None and r.terminal for r in records)
        if done or (deadline is not None and time.monotonic() >= deadline) or (should_stop and should_stop()):
            return records
        time.sleep(interval_s)


def reward_history(client: redis.Redis, keys: Keys, experiment_id: str) -> list[tuple[int, float]]:
    """(step, reward_mean) of every finished step."""
    return [(m.step, m.reward_mean) for m in read_metrics(client, keys, experiment_id)]


__all__ = [
    "submit", "status", "watch", "cancel", "progress_line", "ProgressDisplay", "watch_until_done",
    "format_table", "status_rows", "reward_history", "load_spec_file", "CliError",
]
