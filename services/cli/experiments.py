"""``clora submit | status | watch | cancel | push | env | allowlist``: the user's side.

Owners: ``clora submit`` keeps the experiment's owner secret in the user's
owners file (``shared.owner_secrets``); ``clora cancel`` and ``clora push``
present it. ``--admin`` sends on the operators' stream instead (no secret;
it needs the admin Redis user).

Every command talks through ``shared.client.CloraClient`` and finds Redis the
same way (``shared.client.find_redis_url``): ``--redis-url``, else
``REDIS_URL``, else the address ``clora up`` wrote to ``<data dir>/redis_url``
(data dir: ``--data-dir``, ``CLORA_DATA_DIR`` or ``.clora``); the key prefix
through ``--stream-prefix``, ``CLORA_STREAM_PREFIX``, the one ``clora up``
wrote, else ``clora:``. Credentials: ``shared.client.find_credentials`` (the
``client`` role; ``admin`` for ``clora allowlist``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import msgspec
import redis

from services.scheduler.spec import SpecFileError, convert_spec, load_spec_file, parse_spec_text
from services.scheduler.state import ExperimentRecord
from shared.acl import AclError, url_has_credentials, with_credentials
from shared.client import (
    ClientError,
    CloraClient,
    NoDeploymentWarning,
    NotOwner,
    SpecRefused,
    UnknownExperiment,
    cluster_credentials,
    find_prefix,
    find_redis_url,
    redis_connection,
)
from shared.deployment import allowlist_key, read_allowlist
from shared.messages import Prompt

WATCH_INTERVAL_S = 0.5
WATCH_GRACE_S = 1.0  # `clora submit X && clora watch X`: the scheduler may not have recorded X yet
BAR_WIDTH = 24
EXIT_USAGE = 2
LEGEND = ("reward: mean reward of the last step's train samples (sampled at the spec's temperature); "
          "acc: their fraction correct, shown when it differs from reward; "
          "held-out: greedy accuracy on held-out prompts, start -> latest (final once finished)")


class CliError(RuntimeError):
    """A user-facing failure: printed without a traceback."""


# ---------------------------------------------------------------- connection


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="default: REDIS_URL, else the one `clora up` wrote")
    parser.add_argument("--stream-prefix", default=None, help="default: CLORA_STREAM_PREFIX, the one `clora up` "
                                                              "wrote, or clora:")
    parser.add_argument("--data-dir", default=None, help="default: CLORA_DATA_DIR or .clora")


def resolve_redis_url(args: argparse.Namespace) -> str:
    try:
        return find_redis_url(args.redis_url, args.data_dir)
    except ClientError as exc:
        raise CliError(str(exc)) from None


def resolve_prefix(args: argparse.Namespace) -> str:
    return find_prefix(args.stream_prefix, args.data_dir)


def connect(args: argparse.Namespace, role: str = "client") -> CloraClient:
    url = resolve_redis_url(args)
    try:
        client = CloraClient(redis_connection(url, role, args.data_dir), resolve_prefix(args))
        client.redis.ping()
    except AclError as exc:
        raise CliError(str(exc)) from None
    except redis.exceptions.AuthenticationError as exc:
        raise CliError(f"Redis refused the credentials: {exc}") from None
    except redis.exceptions.ConnectionError as exc:
        raise CliError(f"cannot reach Redis: {exc}") from None
    return client


def _run(command, argv: Sequence[str]) -> int:
    try:
        return command(list(argv))
    except CliError as exc:
        print(f"clora: {exc}", file=sys.stderr)
        return 1
    except redis.exceptions.NoPermissionError as exc:
        print(f"clora: Redis refused: {exc} (the ACL user in use may not do this; see CLORA_REDIS_USERNAME)",
              file=sys.stderr)
        return 1


# ---------------------------------------------------------------- submit / cancel


def submit(argv: list[str]) -> int:
    """``clora submit SPEC.yaml|SPEC.json [--id ID]``: print the experiment id.
    A spec the scheduler would refuse (it does not parse, does not fit the
    schema, breaks a rule, exceeds the deployment's limits, reuses an id, or
    names an HTTP reward off the allow-list) is refused here with every
    reason, exit 2, and nothing is sent."""
    return _run(_submit, argv)


def _submit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora submit", description="submit an experiment spec")
    parser.add_argument("spec", help="YAML or JSON file")
    parser.add_argument("--id", dest="experiment_id", default=None, help="override the spec's experiment_id")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    path = Path(args.spec)
    try:
        data = parse_spec_text(path.read_text(encoding="utf-8"), str(path))
        if isinstance(data, dict) and args.experiment_id:
            data["experiment_id"] = args.experiment_id
        spec = convert_spec(data, str(path))
    except OSError as exc:
        print(f"clora submit: {path}: cannot read ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_USAGE
    except SpecFileError as exc:
        print(f"clora submit: refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    client = connect(args)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NoDeploymentWarning)
            client.submit(spec)
        for warning in caught:
            print(f"clora submit: warning: {warning.message}", file=sys.stderr)
    except SpecRefused as refused:
        print(f"clora submit: {path}: refused, nothing sent:", file=sys.stderr)
        for reason in refused.reasons:
            print(f"  {reason}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:  # e.g. the owners file cannot be written: nothing was sent
        raise CliError(str(exc)) from None
    finally:
        client.close()
    print(spec.experiment_id)
    return 0


def cancel(argv: list[str]) -> int:
    """``clora cancel EXP [EXP...]``."""
    return _run(_cancel, argv)


def _cancel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora cancel", description="cancel experiments (yours, or any with --admin)")
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--admin", action="store_true", help="operators: cancel without the owner secret "
                                                              "(the admin stream; needs the admin Redis user)")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    client = connect(args, role="admin" if args.admin else "client")
    exit_code = 0
    for experiment_id in args.experiments:
        try:
            if args.admin:
                client.admin_cancel(experiment_id)
                print(f"{experiment_id}: cancel requested (as an operator)")
                continue
            record = client.cancel(experiment_id)
        except (UnknownExperiment, NotOwner) as exc:
            print(f"clora cancel: {exc}", file=sys.stderr)
            exit_code = 1
            continue
        except ClientError as exc:
            raise CliError(str(exc)) from None
        print(f"{experiment_id}: cancel requested (was {record.status})")
    client.close()
    return exit_code


def push(argv: list[str]) -> int:
    """``clora push EXP PROMPTS.json|.jsonl [--admin]``: feed a streamed
    experiment (a JSON array of prompts, or one JSON prompt per line:
    ``{"prompt_id": ..., "text": ..., "answer": ...}``), with its owner secret."""
    return _run(_push, argv)


def _push(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora push", description="push prompts to a streamed experiment")
    parser.add_argument("experiment")
    parser.add_argument("prompts", help="JSON array of prompts, or JSON lines (one prompt per line)")
    parser.add_argument("--admin", action="store_true", help="operators: push without the owner secret")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    try:
        prompts = read_prompts(Path(args.prompts))
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        print(f"clora push: {args.prompts}: refused, nothing sent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    client = connect(args, role="admin" if args.admin else "client")
    try:
        if args.admin:
            client.admin_push(args.experiment, prompts)
        else:
            client.push_prompts(args.experiment, prompts)
    except ClientError as exc:
        raise CliError(str(exc)) from None
    finally:
        client.close()
    print(f"{args.experiment}: {len(prompts)} prompts pushed")
    return 0


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts from a JSON array or JSON lines; ``ValueError`` / ``msgspec.ValidationError`` says what is wrong."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        items = json.loads(text)
    else:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not items:
        raise ValueError("no prompts in it")
    return [msgspec.convert(item, Prompt) for item in items]


# ---------------------------------------------------------------- status


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def accuracy_text(record: ExperimentRecord) -> str:
    if record.start_accuracy is None and record.final_accuracy is None:
        return "-"
    return f"{_fmt(record.start_accuracy)}->{_fmt(record.final_accuracy)}"


def status_rows(records: list[ExperimentRecord]) -> list[list[str]]:
    rows = [["EXPERIMENT", "STATUS", "STEP", "REWARD", "HELD-OUT START->FINAL", "ERROR/REASON"]]
    for r in records:
        rows.append([r.experiment_id, r.status, f"{r.step}/{r.steps}", _fmt(r.reward_mean),
                     accuracy_text(r), (r.error or (f"{r.errors} failed groups" if r.errors else ""))])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
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
    client = connect(args)
    records = _select(client, args.experiments)
    client.close()
    if args.json:
        print(json.dumps({"experiments": [msgspec.to_builtins(r) for r in records]}, indent=2))
    elif not records:
        print("no experiments")
    else:
        print(format_table(status_rows(records)))
    return 0 if len(records) >= len(args.experiments) else 1


def _select(client: CloraClient, experiment_ids: list[str]) -> list[ExperimentRecord]:
    if not experiment_ids:
        return client.experiments()
    records = []
    for experiment_id in experiment_ids:
        record = client.experiment(experiment_id)
        if record is None:
            print(f"clora: unknown experiment {experiment_id!r}", file=sys.stderr)
        else:
            records.append(record)
    return records


# ---------------------------------------------------------------- watch


def phase(record: ExperimentRecord) -> str:
    """The state to show: ``final eval`` once every step trained but the
    held-out evaluation of the last version is still running."""
    if record.status == "running" and record.steps and record.step >= record.steps:
        return "final eval"
    return record.status if record.error is None else f"{record.status}: {record.error}"


def held_out_text(record: ExperimentRecord, latest: float | None = None) -> str:
    """``start -> final`` once finished, ``start -> latest`` (or ``...``) while running."""
    if record.start_accuracy is None and record.final_accuracy is None and latest is None:
        return "-"
    end = record.final_accuracy if record.final_accuracy is not None else latest
    return f"{_fmt(record.start_accuracy)} -> {'...' if end is None else _fmt(end)}"


def progress_line(record: ExperimentRecord, id_width: int = 16, latest_eval: float | None = None) -> str:
    """One terminal line (see ``LEGEND``):
    ``add-1  [#########.......]   9/20  reward 0.41  held-out 0.22 -> ...  running``."""
    fraction = min(record.step / record.steps, 1.0) if record.steps else 0.0
    filled = int(round(fraction * BAR_WIDTH))
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    accuracy = ""
    if (record.accuracy is not None and record.reward_mean is not None
            and abs(record.accuracy - record.reward_mean) > 1e-9):
        accuracy = f"  acc {record.accuracy:.2f}"
    return (f"{record.experiment_id:<{id_width}} [{bar}] {record.step:>3}/{record.steps:<3} "
            f"reward {_fmt(record.reward_mean)}{accuracy}  held-out {held_out_text(record, latest_eval)}  "
            f"{phase(record)}")


class ProgressDisplay:
    """Redraws one line per experiment in place on a terminal; elsewhere
    prints a line only when it changed. The legend is printed once, first.
    ``latest_eval`` (experiment -> latest held-out accuracy from its step
    metrics) is filled by ``watch_until_done``."""

    def __init__(self, stream=None, legend: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.legend = legend
        self.latest_eval: dict[str, float | None] = {}
        self._drawn = 0
        self._last: dict[str, str] = {}

    def show(self, records: list[ExperimentRecord]) -> None:
        if self.legend:
            self.stream.write(LEGEND + "\n")
            self.legend = False
        width = max([16, *(len(r.experiment_id) for r in records)])
        lines = [progress_line(r, width, self.latest_eval.get(r.experiment_id)) for r in records]
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            self.stream.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            for record, line in zip(records, lines, strict=True):
                if self._last.get(record.experiment_id) != line:
                    self.stream.write(line + "\n")
                    self._last[record.experiment_id] = line
        self.stream.flush()


def watch(argv: list[str]) -> int:
    """``clora watch [EXP...]``: live progress until every experiment is
    finished, cancelled, invalid or failed (exit 0 when none failed/invalid).
    An unknown id is an error at once (exit 1)."""
    return _run(_watch, argv)


def _watch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora watch", description="live progress of experiments")
    parser.add_argument("experiments", nargs="*", help="default: every queued or running experiment")
    parser.add_argument("--interval", type=float, default=WATCH_INTERVAL_S, help="seconds between refreshes")
    parser.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    client = connect(args)
    ids = args.experiments or [r.experiment_id for r in client.experiments() if not r.terminal]
    if not ids:
        print("nothing to watch: no queued or running experiment")
        return 0
    unknown = _unknown_ids(client, ids)
    if unknown:
        raise CliError(f"unknown experiment(s): {', '.join(map(repr, unknown))} (see `clora status`; "
                       f"a submission the scheduler has not recorded yet: is it running? `clora check scheduler`)")
    records = watch_until_done(client, None, ids, interval_s=args.interval, timeout_s=args.timeout)
    client.close()
    return 0 if all(r is not None and r.status in ("finished", "cancelled") for r in records) else 1


def _unknown_ids(client: CloraClient, experiment_ids: list[str]) -> list[str]:
    """Ids without a record after ``WATCH_GRACE_S`` (a just-sent submission gets that long)."""
    deadline = time.monotonic() + WATCH_GRACE_S
    while True:
        unknown = [i for i in experiment_ids if client.experiment(i) is None]
        if not unknown or time.monotonic() >= deadline:
            return unknown
        time.sleep(0.1)


def watch_until_done(client, keys, experiment_ids: list[str], *, interval_s: float = WATCH_INTERVAL_S,
                     timeout_s: float = 0.0, display: ProgressDisplay | None = None,
                     should_stop=None) -> list[ExperimentRecord | None]:
    """Poll and redraw until every experiment is terminal (or the timeout, or
    ``should_stop()``); returns the last records. ``client``: a ``CloraClient``
    (``keys`` None) or a ``redis.Redis`` with its ``Keys``."""
    clora = client if isinstance(client, CloraClient) else CloraClient(client, keys.prefix)
    display = display or ProgressDisplay()
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while True:
        records = [clora.experiment(i) for i in experiment_ids]
        if hasattr(display, "latest_eval"):
            display.latest_eval = {i: latest_eval_accuracy(clora, i) for i in experiment_ids}
        display.show([r if r is not None else ExperimentRecord(experiment_id=i, status="submitted")
                      for i, r in zip(experiment_ids, records, strict=True)])
        done = all(r is not None and r.terminal for r in records)
        if done or (deadline is not None and time.monotonic() >= deadline) or (should_stop and should_stop()):
            return records
        time.sleep(interval_s)


def latest_eval_accuracy(client: CloraClient, experiment_id: str) -> float | None:
    measured = [m.eval_accuracy for m in client.metrics(experiment_id) if m.eval_accuracy is not None]
    return measured[-1] if measured else None


def reward_history(client, keys, experiment_id: str) -> list[tuple[int, float | None]]:
    """(step, reward_mean) of every finished step; None: no group of that step was scored."""
    clora = client if isinstance(client, CloraClient) else CloraClient(client, keys.prefix)
    return [(m.step, m.reward_mean) for m in clora.metrics(experiment_id)]


# ---------------------------------------------------------------- env / allowlist


def env(argv: list[str]) -> int:
    """``clora env``: ``export`` lines for the Redis and prefix every command
    would use (``eval "$(clora env)"`` in another shell). On a ``clora up``
    cluster with ACLs the URL carries the ``client`` user and its password,
    so any Redis program run from that shell connects as the client role."""
    return _run(_env, argv)


def _env(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora env", description="print export lines for REDIS_URL and the prefix")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    url = resolve_redis_url(args)
    credentials = cluster_credentials(url, "client", args.data_dir) if not url_has_credentials(url) else {}
    print(f"export REDIS_URL={shlex.quote(with_credentials(url, **credentials))}")
    print(f"export CLORA_STREAM_PREFIX={resolve_prefix(args)}")
    return 0


def allowlist(argv: list[str]) -> int:
    """``clora allowlist list | add URL | remove URL``: the reward service's
    HTTP allow-list, changed while running (Redis set ``<prefix>reward_allowlist``);
    the prefixes the reward service was configured with stay allowed."""
    return _run(_allowlist, argv)


def _allowlist(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora allowlist", description="HTTP reward URL prefixes allowed")
    parser.add_argument("action", choices=("list", "add", "remove"))
    parser.add_argument("urls", nargs="*", help="URL prefixes, e.g. http://127.0.0.1:8088/score")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    if args.action != "list" and not args.urls:
        parser.error(f"{args.action} needs at least one URL")
    client = connect(args, role="admin")
    configured = client.deployment().http_allowlist if args.action != "add" else []
    key = allowlist_key(client.prefix)
    exit_code = 0
    for url in args.urls:
        problem = _allowlist_entry_problem(url)
        if problem:
            print(f"clora allowlist: {url!r}: {problem}", file=sys.stderr)
            exit_code = 2
        elif args.action == "add":
            client.redis.sadd(key, url)
        elif url in configured:
            print(f"clora allowlist: {url!r} is in the reward service's configuration (CLORA_HTTP_ALLOWLIST); "
                  "it stays allowed until that changes", file=sys.stderr)
            exit_code = 1
        elif not client.redis.srem(key, url):
            print(f"clora allowlist: {url!r} was not on the list", file=sys.stderr)
            exit_code = 1
    for url in client.deployment().http_allowlist if args.action == "list" else []:
        print(f"{url}  (configured)")
    for url in read_allowlist(client.redis, client.prefix):
        print(url)
    client.close()
    return exit_code


def _allowlist_entry_problem(url: str) -> str | None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an allow-list entry is an http:// or https:// URL prefix"
    if parts.username or parts.password:
        return "an allow-list entry must not carry credentials"
    return None


__all__ = [
    "submit", "status", "watch", "cancel", "push", "read_prompts",
    "env", "allowlist", "progress_line", "ProgressDisplay",
    "watch_until_done", "format_table", "status_rows", "reward_history", "load_spec_file", "CliError", "LEGEND",
]
