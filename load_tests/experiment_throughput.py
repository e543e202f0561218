"""Experiment throughput: K identical RL experiments, one at a time vs N at once.

Every experiment has the same spec (one task family, the tiny model's
recommended demo settings from ``services.cli.local.demo_settings``) and its
own seed (experiment i has seed ``--seed + i`` in every mode, so the modes
train the same K experiments). Modes:

- ``serial-warm``: one at a time on one ``LocalCluster`` that stays up; the
  next experiment is submitted when the previous one finished;
- ``serial-cold``: one at a time, each on a fresh ``LocalCluster`` (fresh data
  dir, Redis and the four service processes started, model loaded): the cold
  start C-LoRA removes. An experiment's time includes its cluster's startup
  (start to every heartbeat); stopping the cluster afterwards is not counted
  (reported as ``stop_s``), which favours the baseline;
- ``concurrent`` for each N of ``--concurrency`` (e.g. ``1,2,4,8,16,32``): all
  K = max(N, ``--experiments``) experiments submitted at once to a fresh
  cluster whose scheduler admits N at a time (``CLORA_MAX_CONCURRENT``), so
  N=32 runs 32 experiments even with ``--experiments 8``; the services keep
  their default configuration otherwise (e.g. the rollout's ``max_rows`` 256
  and ``max_loras`` 32: at large N requests wait for rows and versions may be
  evicted and reloaded, which is part of the cost measured).
  Startup of warm clusters is not counted (reported as ``startup_s``); each
  warm cluster first runs one uncounted 1-step warm-up experiment
  (``--no-warmup`` skips it), so it is as warm as after any earlier one.

Per mode: experiments per hour = finished experiments / the mode's wall time
(first submission to the last ``finished_at``; serial-cold: the sum of
startup + submission-to-finished of each experiment) and the ratios to
serial-warm and serial-cold; mean experiment time (submission -> finished,
which includes queueing when N < K; ``mean_run_s`` is admission -> finished);
per-step rollout time (``StepMetrics.rollout_s``: rollout requests published
-> last group scored) and train time (``train_s``: the trainer's model thread
for the step; writing the version runs beside the next step and is not in
it); submission -> first scored rollout group
(``first_scored_at``); held-out greedy accuracy at start and end (mean,
population std, min, max). Where the time goes: ``trainer_busy_s`` (sum of
``train_s``; one trainer trains one tenant at a time, so this is serial work)
and ``rollout_busy_s`` (union over every completion of [handed to the engine,
published], from the ``completions`` stream: time the engine had work), each
also as a fraction of the wall time; the service near 1.0 is the bottleneck.
And the machine's side (Linux): CPU seconds each process of the cluster
(services and the embedded Redis) used over the counted time, per
experiment step (``cpu_s_per_step``), the cores kept busy on average, and
``cpu_bound_ratio_vs_serial_warm``: serial-warm's wall time per step over
(this mode's CPU per step / the cores), the most this mode could gain on
this machine without spending less CPU per step; for concurrent modes
``fraction_of_cpu_bound`` = ``throughput_ratio_vs_serial_warm`` / that bound
(1.0: the mode gets all the machine allows). How cost grows with N: each
process's resident memory (``/proc/<pid>/status`` VmRSS, ``rss_mb``, read at
the end of the counted time; ``peak_rss_mb`` VmHWM, the peak up to then) and
``rss_mb_per_tenant`` (``rss_mb`` / N), beside the step times, in the growth
table (warm modes only; serial-cold has none).

``--floor`` also runs ``load_tests/floor.py``, in a child process right
after each warm cluster mode (serial-warm: N=1; concurrent N: that N; once
per N), so each pair is measured back to back on this shared machine, whose
speed drifts by a fifth over minutes: the same K
experiments (same specs, seeds, sampling, evaluations, adapter files) through
the same engine, reward and trainer code in ONE process, no Redis, no
services, ``serial`` (N=1) and ``interleaved`` for each N (see its docstring
for what is shared and how threads are set: ``CLORA_TORCH_THREADS`` from the
same service environment). Its rows go to ``floor`` in the JSON; each warm
row gets ``floor_cpu_s_per_step`` and ``cpu_per_step_vs_floor`` = the
cluster's CPU per experiment step (all its processes, Redis included) / the
floor's (serial-warm vs the floor's serial, concurrent N vs the floor's N
interleaved; serial-cold none).

``--peer trl`` also runs ``load_tests/peer_trl.py``: the same K experiments
with TRL's GRPOTrainer + PEFT, one fresh Python process each, one after
another (needs ``pip install trl``; tiny model only). ``peer`` in the JSON
holds its summary (experiments/hour with process start counted, spawn ->
exit, and ``_warm``, from after its imports to the end of its final
evaluation; held-out accuracies; TRL's version), ``peer_experiments`` each
experiment; every row gets ``throughput_ratio_vs_peer`` (its experiments/hour
/ the peer's incl. process start) and ``throughput_ratio_vs_peer_warm``
(/ the peer's warm figure); ``peer_comparison`` and the top-level
``throughput_ratio_vs_peer`` / ``_warm`` are those of concurrent N=8 (else the
largest N run), with C-LoRA's and the peer's final accuracy and
serial-warm's figures. The peer runs after the cluster modes; a failure of
the floor or the peer is reported in ``error`` (the cluster rows stay).

    python load_tests/experiment_throughput.py --experiments 8 --steps 10 \\
        --json /tmp/throughput.json --plot-dir /tmp/throughput
    python load_tests/experiment_throughput.py --quick          # smoke: K=2, S=2, N in 1,2
    python load_tests/experiment_throughput.py --experiments 8 --steps 10 --concurrency 1,8 \
        --floor --peer trl --json /tmp/throughput.json            # the issue-19 comparison

``--gpu`` (throughput only, needs CUDA; accuracy means nothing there): writes
a Qwen3-4B-shaped model with random weights (``shared.models.qwen3_4b``, bf16,
~8 GB) plus the tiny model's character tokenizer (``build_tiny.build_tokenizer``;
the config's bos/eos/pad ids are set to that tokenizer's, the vocabulary size
stays 151,936, ids outside the tokenizer decode to nothing) to
``<data root>/qwen3-4b-random`` with ``save_pretrained``, and runs rollout and
trainer with ``CLORA_MODEL_DIR`` = that directory, ``CLORA_DEVICE=cuda``,
``CLORA_DTYPE=bfloat16``, ``CLORA_TORCH_THREADS=4``, ``CLORA_ENGINE`` =
``--engine`` (default torch); spec: ``max_tokens`` 128, ``eval_size`` 16,
default ``--steps`` 5. ``--model-dir`` runs any other model directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODES = ("serial-warm", "serial-cold", "concurrent")
DEFAULT_EXPERIMENTS = 8
DEFAULT_STEPS = 10
DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_FAMILY = "add"
DEFAULT_TIMEOUT_S = 4 * 3600.0  # the whole benchmark, every mode
QUICK = {"experiments": 2, "steps": 2, "concurrency": (1, 2), "eval_size": 16}
GPU_SPEC = {"max_tokens": 128, "eval_size": 16}
GPU_DEFAULT_STEPS = 5
GPU_ENV = {"CLORA_DEVICE": "cuda", "CLORA_DTYPE": "bfloat16", "CLORA_TORCH_THREADS": "4"}
GPU_MODEL_SUBDIR = "qwen3-4b-random"
WARMUP_EVAL_SIZE = 8  # held-out prompts of the uncounted warm-up experiment
POLL_S = 0.1  # state polling while waiting for experiments
STARTUP_TIMEOUT_S = 600.0  # one cluster's start (model loads included)
COMPLETIONS_PAGE = 1000  # XRANGE page size
BUSY_BOTTLENECK_FRACTION = 0.8  # a service busy this much of the wall time is the bottleneck
PEERS = ("trl",)
PEER_N = 8  # the concurrent N the peer is compared with (else the largest N run)
LOAD_TESTS = Path(__file__).resolve().parent


class BenchmarkTimeout(RuntimeError):
    """The global ``--timeout-s`` ran out."""


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    experiments: int = DEFAULT_EXPERIMENTS
    steps: int = DEFAULT_STEPS
    modes: tuple[str, ...] = MODES
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    family: str = DEFAULT_FAMILY
    seed: int = 0
    spec_fields: dict = field(default_factory=dict)  # ExperimentSpec fields (steps included)
    env: dict = field(default_factory=dict)  # extra env for every service
    gpu: bool = False
    model_dir: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    json_path: str | None = None
    plot_dir: str | None = None
    data_dir: str | None = None
    keep_data: bool = False
    quick: bool = False
    warmup: bool = True  # one uncounted 1-step experiment on each warm cluster
    floor: bool = False  # also run load_tests/floor.py (serial and each N interleaved)
    peer: str | None = None  # "trl": also run load_tests/peer_trl.py


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> (1, 2, 4, 8); sorted, unique, each >= 1."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency: {text!r} is not a comma-separated list of integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--concurrency: {text!r} needs integers >= 1")
    return tuple(values)


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"--modes: unknown {unknown or text!r}; choose from {', '.join(MODES)}")
    return tuple(m for m in MODES if m in modes)  # run in the canonical order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=None, help=f"K (default {DEFAULT_EXPERIMENTS})")
    parser.add_argument("--steps", type=int, default=None, help=f"S per experiment (default {DEFAULT_STEPS})")
    parser.add_argument("--modes", type=parse_modes, default=MODES, help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--concurrency", type=parse_concurrency, default=None, help="N values (default 1,2,4,8)")
    parser.add_argument("--family", default=None, help="task family (default: the tiny model's demo advice, else add)")
    parser.add_argument("--seed", type=int, default=0, help="experiment i gets seed SEED + i")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out prompts per eval")
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--gpu", action="store_true", help="Qwen3-4B-shaped random model on CUDA (throughput only)")
    parser.add_argument("--engine", default=None, help="rollout engine: torch | vllm (default torch)")
    parser.add_argument("--model-dir", default=None, help="model directory for rollout and trainer")
    parser.add_argument("--set", dest="extra_env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every service, e.g. CLORA_TORCH_THREADS=2 (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="bound on the whole run")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    parser.add_argument("--plot-dir", default=None, help="write throughput.png and step_times.png here")
    parser.add_argument("--data-dir", default=None, help="root of the clusters' data dirs (default: a temp dir)")
    parser.add_argument("--keep-data", action="store_true", help="keep the data dirs (logs) afterwards")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the uncounted 1-step warm-up experiment on each warm cluster")
    parser.add_argument("--quick", action="store_true", help="smoke run: K=2, S=2, N in 1,2, eval_size 16")
    parser.add_argument("--floor", action="store_true",
                        help="also run the in-process floor (load_tests/floor.py) and compare CPU per step")
    parser.add_argument("--peer", choices=PEERS, default=None,
                        help="also run a peer on the same experiments (trl: load_tests/peer_trl.py, needs trl)")
    return parser


def parse_args(argv: Sequence[str] | None = None, demo_advice: tuple[Sequence[str], dict] | None = None) -> Settings:
    """Flags -> Settings. ``demo_advice`` = (families, spec fields), by default
    ``services.cli.local.demo_settings()`` (the tiny model's eval.json advice)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if demo_advice is None:
        from services.cli.local import demo_settings

        demo_advice = demo_settings()
    families, spec_fields = demo_advice[0], dict(demo_advice[1])
    quick = QUICK if args.quick else {}
    if args.gpu:
        spec_fields.update(GPU_SPEC)
    default_steps = quick.get("steps", GPU_DEFAULT_STEPS if args.gpu else DEFAULT_STEPS)
    spec_fields["steps"] = _first(args.steps, default_steps)
    overrides = {"eval_size": _first(args.eval_size, quick.get("eval_size")),
                 "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                 "max_tokens": args.max_tokens}
    spec_fields.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(
        experiments=_first(args.experiments, quick.get("experiments", DEFAULT_EXPERIMENTS)),
        steps=spec_fields["steps"], modes=args.modes,
        concurrency=_first(args.concurrency, quick.get("concurrency", DEFAULT_CONCURRENCY)),
        family=args.family or (families[0] if families else DEFAULT_FAMILY), seed=args.seed,
        spec_fields=spec_fields, env=_service_env(args), gpu=args.gpu, model_dir=args.model_dir,
        timeout_s=args.timeout_s, json_path=args.json_path, plot_dir=args.plot_dir, data_dir=args.data_dir,
        keep_data=args.keep_data, quick=args.quick, warmup=args.warmup, floor=args.floor, peer=args.peer,
    )
    if settings.experiments < 1 or settings.steps < 1:
        raise SystemExit("--experiments and --steps must be >= 1")
    return settings


def _first(value, default):
    return default if value is None else value


def _service_env(args: argparse.Namespace) -> dict:
    env = dict(GPU_ENV) if args.gpu else {}
    if args.engine:
        env["CLORA_ENGINE"] = args.engine
    if args.model_dir:
        env["CLORA_MODEL_DIR"] = str(Path(args.model_dir).resolve())
    for item in args.extra_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


# ---------------------------------------------------------------- per-experiment outcome (pure)


@dataclass
class ExperimentOutcome:
    experiment_id: str
    seed: int
    status: str
    steps_done: int
    steps_total: int
    wall_s: float | None  # submission -> finished (+ startup_s in serial-cold)
    run_s: float | None  # admitted -> finished
    first_rollout_s: float | None  # submission -> first scored rollout group (+ startup_s in serial-cold)
    startup_s: float  # the cluster start charged to this experiment (serial-cold only)
    start_accuracy: float | None
    final_accuracy: float | None
    rollout_step_s: list[float]
    train_step_s: list[float]
    step_wall_s: float | None  # (last step's metrics - admitted) / steps (those follow the final eval)
    reward_first: float | None
    reward_last: float | None
    finished_at: float | None


def experiment_outcome(experiment_id: str, seed: int, submitted_at: float, record, metrics: Sequence,
                       startup_s: float = 0.0) -> ExperimentOutcome:
    """One experiment from its ``ExperimentRecord`` (None if the scheduler
    never recorded it) and its ``StepMetrics`` list."""
    status = record.status if record is not None else "unknown"
    finished_at = record.finished_at if record is not None and status == "finished" else None
    started_at = record.started_at if record is not None else None
    return ExperimentOutcome(
        experiment_id=experiment_id, seed=seed, status=status,
        steps_done=record.step if record is not None else 0,
        steps_total=record.steps if record is not None else 0,
        wall_s=_span(submitted_at, finished_at, startup_s),
        run_s=_span(started_at, finished_at),
        first_rollout_s=_span(submitted_at, _first_rollout_at(record, metrics), startup_s),
        startup_s=startup_s,
        start_accuracy=record.start_accuracy if record is not None else None,
        final_accuracy=record.final_accuracy if record is not None else None,
        rollout_step_s=[m.rollout_s for m in metrics],
        train_step_s=[m.train_s for m in metrics],
        step_wall_s=(metrics[-1].ts - started_at) / len(metrics) if metrics and started_at else None,
        reward_first=metrics[0].reward_mean if metrics else None,
        reward_last=metrics[-1].reward_mean if metrics else None,
        finished_at=finished_at,
    )


def _span(start: float | None, end: float | None, extra: float = 0.0) -> float | None:
    return None if start is None or end is None else max(0.0, end - start) + extra


def _first_rollout_at(record, metrics: Sequence) -> float | None:
    """``first_scored_at``; without it, step 0's metrics time less its train time."""
    if record is not None and record.first_scored_at is not None:
        return record.first_scored_at
    if metrics:
        return metrics[0].ts - metrics[0].train_s
    return None


# ---------------------------------------------------------------- aggregation (pure)


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals (overlaps once)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def completion_interval(entry_id: str, time_to_first_token_s: float, decode_s: float) -> tuple[float, float]:
    """[handed to the engine, published] of one completion; the stream entry id
    carries the publish time in ms."""
    end_s = int(entry_id.split("-")[0]) / 1000.0
    return end_s - max(0.0, time_to_first_token_s) - max(0.0, decode_s), end_s


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _spread(values: Sequence[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


@dataclass
class ModeRun:
    """What one mode measured; ``summarize_mode`` turns it into a result row."""

    mode: str
    n: int  # experiments admitted at once (1 for the serial modes)
    wall_s: float
    outcomes: list[ExperimentOutcome]
    rollout_busy_s: float
    startup_s: float = 0.0  # cluster start(s); counted in wall_s only for serial-cold
    stop_s: float = 0.0  # cluster stop(s); never counted
    completions: int = 0
    timed_out: bool = False
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process over the counted time
    rss_mb: dict[str, float] = field(default_factory=dict)  # resident memory per process at the end of it
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # each process's peak resident memory by then


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (Linux ``/proc``), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory_mb(pid: int | None) -> tuple[float, float] | None:
    """(resident, peak resident) MB of a live process (Linux ``/proc``: VmRSS, VmHWM), else None."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (OSError, TypeError):
        return None
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024.0  # kB
    return (values["VmRSS"], values["VmHWM"]) if len(values) == 2 else None


def cluster_memory_mb(cluster) -> tuple[dict[str, float], dict[str, float]]:
    """({process: resident MB}, {process: peak resident MB}) of a cluster's processes."""
    readings = {name: process_memory_mb(pid) for name, pid in cluster.pids.items()}
    readings = {name: reading for name, reading in readings.items() if reading is not None}
    return ({name: r[0] for name, r in readings.items()}, {name: r[1] for name, r in readings.items()})


def experiments_for(n: int, experiments: int) -> int:
    """K for a concurrent mode of N: at least N experiments, so all N slots fill."""
    return max(n, experiments)


def cluster_cpu_s(cluster) -> dict[str, float]:
    """``process_cpu_s`` of every process of a cluster (those it can read)."""
    readings = {name: process_cpu_s(pid) for name, pid in cluster.pids.items()}
    return {name: seconds for name, seconds in readings.items() if seconds is not None}


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two ``cluster_cpu_s`` readings."""
    return {name: after[name] - before[name] for name in after if name in before}


def add_cpu_used(total: dict[str, float], used: dict[str, float]) -> dict[str, float]:
    return {name: total.get(name, 0.0) + used.get(name, 0.0) for name in {*total, *used}}


def summarize_mode(run: ModeRun) -> dict:
    """One ``results`` row (ratios are added by ``add_throughput_ratios``)."""
    finished = [o for o in run.outcomes if o.status == "finished"]
    rollout_steps = [s for o in run.outcomes for s in o.rollout_step_s]
    train_steps = [s for o in run.outcomes for s in o.train_step_s]
    trainer_busy_s = sum(train_steps)
    steps_done = sum(o.steps_done for o in run.outcomes)
    final = _spread([o.final_accuracy for o in finished if o.final_accuracy is not None])
    start = _spread([o.start_accuracy for o in finished if o.start_accuracy is not None])
    per_hour = 3600.0 * len(finished) / run.wall_s if run.wall_s > 0 and finished else 0.0
    row = {
        "mode": run.mode, "n": run.n, "experiments": len(run.outcomes), "finished": len(finished),
        "all_finished": len(finished) == len(run.outcomes) and not run.timed_out,
        "wall_s": run.wall_s, "experiments_per_hour": per_hour,
        "throughput_ratio_vs_serial_warm": None, "throughput_ratio_vs_serial_cold": None,
        "mean_experiment_s": _mean([o.wall_s for o in finished if o.wall_s is not None]),
        "mean_run_s": _mean([o.run_s for o in finished if o.run_s is not None]),
        "first_rollout_s": _mean([o.first_rollout_s for o in run.outcomes if o.first_rollout_s is not None]),
        "rollout_step_s": _mean(rollout_steps), "train_step_s": _mean(train_steps),
        "step_wall_s": _mean([o.step_wall_s for o in run.outcomes if o.step_wall_s is not None]),
        "steps_done": steps_done,
        "trainer_busy_s": trainer_busy_s, "rollout_busy_s": run.rollout_busy_s,
        "trainer_busy_fraction": trainer_busy_s / run.wall_s if run.wall_s > 0 else None,
        "rollout_busy_fraction": run.rollout_busy_s / run.wall_s if run.wall_s > 0 else None,
        "final_accuracy_mean": final["mean"], "final_accuracy_std": final["std"],
        "final_accuracy_min": final["min"], "final_accuracy_max": final["max"],
        "start_accuracy_mean": start["mean"], "start_accuracy_std": start["std"],
        "startup_s": run.startup_s, "stop_s": run.stop_s, "completions": run.completions,
        "timed_out": run.timed_out,
        "cpu_s": dict(sorted(run.cpu_s.items())),
        "cpu_s_per_step": {name: s / max(steps_done, 1) for name, s in sorted(run.cpu_s.items())},
        "cores_busy": sum(run.cpu_s.values()) / run.wall_s if run.wall_s > 0 and run.cpu_s else None,
        "cpu_bound_ratio_vs_serial_warm": None, "fraction_of_cpu_bound": None,
        "floor_cpu_s_per_step": None, "cpu_per_step_vs_floor": None,
        "throughput_ratio_vs_peer": None, "throughput_ratio_vs_peer_warm": None,
        "rss_mb": dict(sorted(run.rss_mb.items())), "peak_rss_mb": dict(sorted(run.peak_rss_mb.items())),
        "rss_mb_per_tenant": {name: mb / max(run.n, 1) for name, mb in sorted(run.rss_mb.items())},
    }
    row["bottleneck"] = bottleneck(row)
    return row


def bottleneck(row: dict) -> str:
    """"trainer" / "rollout" when that service was busy at least
    ``BUSY_BOTTLENECK_FRACTION`` of the wall time (the busier one if both),
    else "neither" (time goes to waiting between services)."""
    trainer, rollout = row.get("trainer_busy_fraction") or 0.0, row.get("rollout_busy_fraction") or 0.0
    if max(trainer, rollout) < BUSY_BOTTLENECK_FRACTION:
        return "neither"
    return "trainer" if trainer >= rollout else "rollout"


def add_throughput_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``throughput_ratio_vs_serial_warm/cold`` (None without that baseline)."""
    baselines = {r["mode"]: r["experiments_per_hour"] for r in rows if r["mode"] in ("serial-warm", "serial-cold")}
    for row in rows:
        for mode, key in (("serial-warm", "throughput_ratio_vs_serial_warm"),
                          ("serial-cold", "throughput_ratio_vs_serial_cold")):
            base = baselines.get(mode)
            row[key] = row["experiments_per_hour"] / base if base else None
    return rows


def add_cpu_bounds(rows: list[dict], cores: int) -> list[dict]:
    """Fill ``cpu_bound_ratio_vs_serial_warm``: the most a mode could gain over
    serial-warm on ``cores`` cores with the CPU it spent per step, i.e.
    serial-warm's wall time per step / (that mode's CPU seconds per step /
    cores). A mode near its bound is limited by the machine's cores, not by
    waiting."""
    warm = next((r for r in rows if r["mode"] == "serial-warm"), None)
    if warm is None or not warm["steps_done"]:
        return rows
    warm_step_s = warm["wall_s"] / warm["steps_done"]
    for row in rows:
        cpu_per_step = sum((row.get("cpu_s_per_step") or {}).values())
        if cpu_per_step > 0:
            row["cpu_bound_ratio_vs_serial_warm"] = warm_step_s / (cpu_per_step / cores)
        ratio, bound = row.get("throughput_ratio_vs_serial_warm"), row["cpu_bound_ratio_vs_serial_warm"]
        if row["mode"] == "concurrent" and ratio is not None and bound:
            row["fraction_of_cpu_bound"] = ratio / bound
    return rows


def floor_row_for(row: dict, floor_rows: Sequence[dict]) -> dict | None:
    """The floor mode a cluster row is measured against: serial-warm vs the
    floor's serial (N=1), concurrent N vs the floor's N interleaved; None for
    serial-cold (its CPU includes no cluster start, but it is not a warm mode)."""
    if row["mode"] == "serial-warm":
        wanted = 1
    elif row["mode"] == "concurrent":
        wanted = row["n"]
    else:
        return None
    return next((f for f in floor_rows if f["n"] == wanted), None)


def add_floor_ratios(rows: list[dict], floor_rows: Sequence[dict]) -> list[dict]:
    """Fill ``floor_cpu_s_per_step`` and ``cpu_per_step_vs_floor`` (cluster CPU
    per experiment step, all its processes, / the floor's)."""
    for row in rows:
        floor = floor_row_for(row, floor_rows)
        cluster = sum((row.get("cpu_s_per_step") or {}).values())
        if floor is None or not floor.get("cpu_s_per_step") or cluster <= 0:
            continue
        row["floor_cpu_s_per_step"] = floor["cpu_s_per_step"]
        row["cpu_per_step_vs_floor"] = cluster / floor["cpu_s_per_step"]
    return rows


def add_peer_ratios(rows: list[dict], peer: dict | None) -> list[dict]:
    """Fill ``throughput_ratio_vs_peer`` (this mode's experiments/hour / the
    peer's with its process start counted) and ``..._warm`` (left out)."""
    if not peer:
        return rows
    for row in rows:
        for key, peer_key in (("throughput_ratio_vs_peer", "experiments_per_hour"),
                              ("throughput_ratio_vs_peer_warm", "experiments_per_hour_warm")):
            row[key] = row["experiments_per_hour"] / peer[peer_key] if peer.get(peer_key) else None
    return rows


def peer_comparison(rows: Sequence[dict], peer: dict | None) -> dict | None:
    """The headline: C-LoRA at N=``PEER_N`` (else the largest N run) vs the peer,
    both ratios and both accuracies; serial-warm's figures beside them."""
    concurrent = sorted((r for r in rows if r["mode"] == "concurrent"), key=lambda r: r["n"])
    if not peer or not concurrent:
        return None
    row = next((r for r in concurrent if r["n"] == PEER_N), concurrent[-1])
    warm = next((r for r in rows if r["mode"] == "serial-warm"), None)
    return {
        "peer": peer.get("peer"), "peer_version": peer.get("trl_version"), "c_lora_n": row["n"],
        "c_lora_experiments_per_hour": row["experiments_per_hour"],
        "peer_experiments_per_hour": peer.get("experiments_per_hour"),
        "peer_experiments_per_hour_warm": peer.get("experiments_per_hour_warm"),
        "throughput_ratio_vs_peer": row["throughput_ratio_vs_peer"],
        "throughput_ratio_vs_peer_warm": row["throughput_ratio_vs_peer_warm"],
        "c_lora_final_accuracy": row["final_accuracy_mean"], "peer_final_accuracy": peer.get("final_accuracy_mean"),
        "c_lora_serial_warm_experiments_per_hour": warm["experiments_per_hour"] if warm else None,
        "c_lora_serial_warm_final_accuracy": warm["final_accuracy_mean"] if warm else None,
    }


def results_table(rows: list[dict]) -> str:
    from services.cli.experiments import format_table

    def num(value, digits=1, suffix=""):
        return "-" if value is None else f"{value:.{digits}f}{suffix}"

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    table = [["MODE", "N", "DONE", "EXP/H", "xWARM", "xCOLD", "MEAN EXP S", "1ST ROLLOUT S", "ROLLOUT/STEP S",
              "TRAIN/STEP S", "TRAINER BUSY", "ROLLOUT BUSY", "START ACC", "FINAL ACC (std)", "BOTTLENECK"]]
    for r in rows:
        final = ("-" if r["final_accuracy_mean"] is None
                 else f"{pct(r['final_accuracy_mean'])} ({pct(r['final_accuracy_std'])})")
        table.append([r["mode"], str(r["n"]), f"{r['finished']}/{r['experiments']}", num(r["experiments_per_hour"]),
                      num(r["throughput_ratio_vs_serial_warm"], 2, "x"),
                      num(r["throughput_ratio_vs_serial_cold"], 2, "x"),
                      num(r["mean_experiment_s"]), num(r["first_rollout_s"]), num(r["rollout_step_s"], 2),
                      num(r["train_step_s"], 3), pct(r["trainer_busy_fraction"]) + "%",
                      pct(r["rollout_busy_fraction"]) + "%", pct(r["start_accuracy_mean"]), final, r["bottleneck"]])
    return format_table(table)


def cpu_table(rows: list[dict]) -> str:
    """CPU seconds per experiment step of each process, the cores the cluster
    kept busy on average, and the CPU bound (``add_cpu_bounds``): where the
    machine's time went."""
    from services.cli.experiments import format_table

    names = sorted({name for r in rows for name in r.get("cpu_s_per_step") or {}})
    table = [["MODE", "N", *[f"{name.upper()} CPU/STEP S" for name in names], "TOTAL", "CORES BUSY",
              "CPU-BOUND xWARM"]]
    for r in rows:
        per_step = r.get("cpu_s_per_step") or {}
        bound = r.get("cpu_bound_ratio_vs_serial_warm")
        table.append([r["mode"], str(r["n"]),
                      *["-" if name not in per_step else f"{per_step[name]:.3f}" for name in names],
                      f"{sum(per_step.values()):.3f}" if per_step else "-",
                      "-" if r.get("cores_busy") is None else f"{r['cores_busy']:.2f}",
                      "-" if bound is None else f"{bound:.2f}x"])
    return format_table(table)


def growth_table(rows: list[dict]) -> str:
    """How cost grows with N: step time and each process's resident memory
    (at the end of the counted time), in all and per tenant (MB / N)."""
    from services.cli.experiments import format_table

    names = sorted({name for r in rows for name in r.get("rss_mb") or {}})
    table = [["MODE", "N", "K", "STEP WALL S", "ROLLOUT/STEP S", "TRAIN/STEP S",
              *[f"{name.upper()} RSS MB (/TENANT)" for name in names]]]
    for r in rows:
        rss, per_tenant = r.get("rss_mb") or {}, r.get("rss_mb_per_tenant") or {}
        table.append([r["mode"], str(r["n"]), str(r["experiments"]), _num(r["step_wall_s"], 3),
                      _num(r["rollout_step_s"], 3), _num(r["train_step_s"], 3),
                      *["-" if name not in rss else f"{rss[name]:.0f} ({per_tenant[name]:.0f})" for name in names]])
    return format_table(table)


def comparison_table(rows: list[dict]) -> str:
    """Against the floor, the CPU bound and the peer."""
    from services.cli.experiments import format_table

    table = [["MODE", "N", "CPU/STEP S", "FLOOR CPU/STEP S", "xFLOOR", "xWARM", "CPU-BOUND xWARM",
              "OF CPU BOUND", "xPEER", "xPEER WARM"]]
    for r in rows:
        cpu = sum((r.get("cpu_s_per_step") or {}).values())
        fraction = r.get("fraction_of_cpu_bound")
        table.append([r["mode"], str(r["n"]), f"{cpu:.4f}" if cpu else "-",
                      _num(r.get("floor_cpu_s_per_step"), 4), _num(r.get("cpu_per_step_vs_floor"), 2, "x"),
                      _num(r.get("throughput_ratio_vs_serial_warm"), 2, "x"),
                      _num(r.get("cpu_bound_ratio_vs_serial_warm"), 2, "x"),
                      "-" if fraction is None else f"{100 * fraction:.0f}%",
                      _num(r.get("throughput_ratio_vs_peer"), 2, "x"),
                      _num(r.get("throughput_ratio_vs_peer_warm"), 2, "x")])
    return format_table(table)


def _num(value, digits=1, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


# ---------------------------------------------------------------- running the modes


def experiment_specs(settings: Settings, mode_tag: str, count: int | None = None) -> list:
    """K specs (``count``, default ``--experiments``), identical but for id and
    seed (``demo_specs`` builds them)."""
    import msgspec

    from services.cli.local import demo_specs

    specs = []
    for index in range(settings.experiments if count is None else count):
        (spec,) = demo_specs([settings.family], settings.spec_fields, seed=settings.seed + index)
        specs.append(msgspec.structs.replace(spec, experiment_id=f"tp-{mode_tag}-{index}"))
    return specs


class Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.at = time.monotonic() + timeout_s

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise BenchmarkTimeout("the global --timeout-s ran out")
        return left


class _QuietDisplay:
    def show(self, records) -> None:
        return None


class ThroughputBenchmark:
    """Runs the modes, one fresh ``LocalCluster`` per mode (per experiment in
    serial-cold), and always stops what it started."""

    def __init__(self, settings: Settings, data_root: Path) -> None:
        self.settings = settings
        self.data_root = data_root
        self.deadline = Deadline(settings.timeout_s)
        self.env = {**self._demo_env(), **settings.env}
        self.runs: list[ModeRun] = []  # kept when a mode raises
        self.floor_rows: list[dict] = []  # --floor: one row per N, each run right after its cluster mode
        self.floor_errors: list[str] = []

    @staticmethod
    def _demo_env() -> dict:
        from services.cli.local import DEMO_ENV

        return dict(DEMO_ENV)

    def run(self) -> tuple[list[ModeRun], str | None]:
        """Every mode in order; on the global timeout the modes so far (the
        interrupted one marked ``timed_out``) and the reason."""
        runs = self.runs
        plan = [(m, 1) for m in self.settings.modes if m != "concurrent"]
        if "concurrent" in self.settings.modes:
            plan += [("concurrent", n) for n in self.settings.concurrency]
        for mode, n in plan:
            k = experiments_for(n, self.settings.experiments) if mode == "concurrent" else self.settings.experiments
            print(f"== {mode} N={n}: {k} experiments x {self.settings.steps} steps", flush=True)
            runs.append(self.run_serial_cold() if mode == "serial-cold" else self.run_warm(mode, n))
            print(f"   {mode} N={n}: {runs[-1].wall_s:.1f}s, "
                  f"{sum(o.status == 'finished' for o in runs[-1].outcomes)}/{len(runs[-1].outcomes)} finished",
                  flush=True)
            if runs[-1].timed_out:
                return runs, "the global --timeout-s ran out"
            if mode != "serial-cold":
                self.run_floor_for(n)
        return runs, None

    def run_floor_for(self, n: int) -> None:
        """With ``--floor``: the floor for ``n`` right after the cluster mode it
        is compared with (once per N), so both are measured minutes apart at
        most: this shared machine's speed drifts by a fifth over a run."""
        if not self.settings.floor or any(row["n"] == n for row in self.floor_rows):
            return
        rows, error = run_floor(self.settings, self.data_root, n, self.deadline.left())
        self.floor_rows += rows
        self.floor_errors += [error] if error else []

    # ------------------------------------------------------------ modes

    def run_warm(self, mode: str, n: int) -> ModeRun:
        """serial-warm (submit the next when the previous finished) or
        concurrent (submit all; the scheduler admits ``n`` at a time)."""
        tag = f"{'sw' if mode == 'serial-warm' else 'c'}{n}"
        specs = experiment_specs(self.settings, tag, experiments_for(n, self.settings.experiments))
        cluster, startup_s = self._start_cluster(tag, max_concurrent=n)
        submitted: dict[str, float] = {}
        timed_out, cpu_s, rss_mb, peak_rss_mb = False, {}, {}, {}
        try:
            client, keys = self._connect(cluster)
            try:
                self._warm_up(cluster, client, keys, tag)
                batches = [[s] for s in specs] if mode == "serial-warm" else [specs]
                cpu_before = cluster_cpu_s(cluster)
                for batch in batches:
                    submitted.update(self._submit(client, keys, batch))
                    if not self._wait(cluster, client, keys, [s.experiment_id for s in batch]):
                        timed_out = True
                        break
                cpu_s = cpu_used(cpu_before, cluster_cpu_s(cluster))
                rss_mb, peak_rss_mb = cluster_memory_mb(cluster)
                outcomes, ends = self._collect(client, keys, specs, submitted)
                busy_s, completions = self._rollout_busy(client, keys, since=min(submitted.values(), default=0.0))
            finally:
                client.close()
        finally:
            stop_s = self._stop_cluster(cluster)
        first_submit = min(submitted.values()) if submitted else time.time()
        wall_s = (max(ends) if ends and not timed_out else time.time()) - first_submit
        return ModeRun(mode, n, wall_s, outcomes, busy_s, startup_s, stop_s, completions, timed_out, cpu_s,
                       rss_mb, peak_rss_mb)

    def run_serial_cold(self) -> ModeRun:
        specs = experiment_specs(self.settings, "sc")
        outcomes, wall_s, busy_s, completions, total_startup, total_stop = [], 0.0, 0.0, 0, 0.0, 0.0
        timed_out, cpu_s = False, {}
        for index, spec in enumerate(specs):
            began = time.time()
            cluster, startup_s = self._start_cluster(f"sc-{index}", max_concurrent=1)
            try:
                client, keys = self._connect(cluster)
                try:
                    cpu_before = cluster_cpu_s(cluster)
                    submitted = self._submit(client, keys, [spec])
                    timed_out = not self._wait(cluster, client, keys, [spec.experiment_id])
                    cpu_s = add_cpu_used(cpu_s, cpu_used(cpu_before, cluster_cpu_s(cluster)))
                    (outcome,), ends = self._collect(client, keys, [spec], submitted, startup_s)
                    spec_busy, spec_completions = self._rollout_busy(client, keys)
                finally:
                    client.close()
            finally:
                total_stop += self._stop_cluster(cluster)
            outcomes.append(outcome)
            wall_s += (max(ends) if ends and not timed_out else time.time()) - began
            busy_s, completions = busy_s + spec_busy, completions + spec_completions
            total_startup += startup_s
            if timed_out:
                break
        return ModeRun("serial-cold", 1, wall_s, outcomes, busy_s, total_startup, total_stop, completions, timed_out,
                       cpu_s)

    def _warm_up(self, cluster, client, keys, tag: str) -> None:
        """One uncounted 1-step experiment, so a warm cluster is warm (first
        forward/backward passes, allocator, adapter slots) as it would be
        after any earlier experiment; its rollouts are excluded from the
        busy time by ``_rollout_busy(since=...)``."""
        if not self.settings.warmup:
            return
        import msgspec

        (spec,) = experiment_specs(self.settings, tag)[:1]
        spec = msgspec.structs.replace(spec, experiment_id=f"tp-{tag}-warmup", steps=1,
                                       eval_size=min(spec.eval_size, WARMUP_EVAL_SIZE))
        self._submit(client, keys, [spec])
        if not self._wait(cluster, client, keys, [spec.experiment_id]):
            raise BenchmarkTimeout("the global --timeout-s ran out during the warm-up")

    # ------------------------------------------------------------ cluster + Redis

    def _start_cluster(self, tag: str, max_concurrent: int):
        """A fresh cluster, ready; (cluster, seconds from start to ready)."""
        from services.cli.local import LocalCluster

        cluster = LocalCluster(self.data_root / tag, env=self.env,
                               service_env={"scheduler": {"CLORA_MAX_CONCURRENT": str(max_concurrent)}})
        began = time.monotonic()
        try:
            cluster.start()
            cluster.wait_ready(timeout_s=min(STARTUP_TIMEOUT_S, self.deadline.left()))
        except BaseException:
            cluster.stop()
            raise
        return cluster, time.monotonic() - began

    @staticmethod
    def _stop_cluster(cluster) -> float:
        began = time.monotonic()
        cluster.stop()
        return time.monotonic() - began

    @staticmethod
    def _connect(cluster):
        """(a ``CloraClient`` on the cluster, its ``Keys``: only for the completions stream)."""
        from shared.client import CloraClient

        client = CloraClient.connect(cluster.url, cluster.stream_prefix)
        return client, client.keys

    @staticmethod
    def _submit(client, keys, specs: Sequence) -> dict[str, float]:
        """Submit through the client (validated as ``clora submit`` does); id -> when sent."""
        from shared.messages import now

        submitted = {}
        for spec in specs:
            submitted[spec.experiment_id] = now()
            client.submit(spec)
        return submitted

    def _wait(self, cluster, client, keys, experiment_ids: list[str]) -> bool:
        """Until every experiment is terminal (True) or the global deadline (False);
        a dead service process raises ``ClusterError`` with its log tail."""
        from services.cli.experiments import watch_until_done

        try:
            timeout_s = self.deadline.left()
        except BenchmarkTimeout:
            return False

        def should_stop() -> bool:
            cluster.check_alive()
            return False

        records = watch_until_done(client, None, experiment_ids, interval_s=POLL_S, timeout_s=timeout_s,
                                   display=_QuietDisplay(), should_stop=should_stop)
        return all(r is not None and r.terminal for r in records)

    def _collect(self, client, keys, specs: Sequence, submitted: dict[str, float],
                 startup_s: float = 0.0) -> tuple[list[ExperimentOutcome], list[float]]:
        outcomes = []
        for spec in specs:
            if spec.experiment_id not in submitted:
                outcomes.append(experiment_outcome(spec.experiment_id, spec.seed, 0.0, None, []))
                continue
            outcomes.append(experiment_outcome(
                spec.experiment_id, spec.seed, submitted[spec.experiment_id],
                client.experiment(spec.experiment_id), client.metrics(spec.experiment_id),
                startup_s))
        return outcomes, [o.finished_at for o in outcomes if o.finished_at is not None]

    @staticmethod
    def _rollout_busy(client, keys, since: float = 0.0) -> tuple[float, int]:
        """(union of the engine intervals of the completions published after
        ``since`` (unix s), number of those completions)."""
        from shared.messages import decode

        stream = keys.stream("completions")
        intervals, start = [], f"{int(since * 1000)}-0" if since > 0 else "-"
        while True:
            # the engines' own timings: a service stream, read raw (the client has no reader for it)
            page = client.redis.xrange(stream, min=start, max="+", count=COMPLETIONS_PAGE)
            for entry_id, fields in page:
                completion = decode(fields[b"msg"], "completions")
                intervals.append(completion_interval(entry_id.decode(), completion.timings.time_to_first_token_s,
                                                     completion.timings.decode_s))
            if len(page) < COMPLETIONS_PAGE:
                return union_seconds(intervals), len(intervals)
            start = "(" + page[-1][0].decode()


# ---------------------------------------------------------------- GPU preset


def write_gpu_model_dir(directory: Path) -> Path:
    """Qwen3-4B-shaped random weights (bf16, on CUDA) + the tiny char tokenizer."""
    import torch

    from shared.models.build_tiny import build_tokenizer
    from shared.models.qwen3_4b import build_random_qwen3_4b

    if (directory / "config.json").is_file():
        return directory
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    tokenizer = build_tokenizer()
    model = build_random_qwen3_4b("cuda", torch.bfloat16)
    # Keep the 151,936-row vocabulary (its cost is part of the shape); only the special ids follow the tokenizer.
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.bos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


# ---------------------------------------------------------------- report


def write_plots(rows: list[dict], plot_dir: Path) -> list[Path]:
    """throughput.png (experiments/hour vs N, serial baselines as lines) and
    step_times.png (per-step rollout/train time and busy fractions vs N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    concurrent = sorted((r for r in rows if r["mode"] == "concurrent"), key=lambda r: r["n"])
    ns = [r["n"] for r in concurrent]
    figure, axes = plt.subplots(figsize=(6.5, 4))
    if concurrent:
        axes.plot(ns, [r["experiments_per_hour"] for r in concurrent], marker="o", label="concurrent (C-LoRA)")
    for mode, style in (("serial-warm", "--"), ("serial-cold", ":")):
        for r in rows:
            if r["mode"] == mode:
                axes.axhline(r["experiments_per_hour"], linestyle=style, color="gray", label=mode)
    axes.set_xlabel("experiments admitted at once (N)")
    axes.set_ylabel("experiments per hour")
    axes.set_xticks(ns or [1])
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("Experiment throughput")
    figure.tight_layout()
    paths = [plot_dir / "throughput.png"]
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['mode']}" if r["mode"] != "concurrent" else f"N={r['n']}" for r in rows]
    positions = range(len(rows))
    width = 0.4
    left.bar([p - width / 2 for p in positions], [r["rollout_step_s"] or 0 for r in rows], width,
             label="rollout / step")
    left.bar([p + width / 2 for p in positions], [r["train_step_s"] or 0 for r in rows], width, label="train / step")
    left.set_xticks(list(positions), labels, rotation=20)
    left.set_ylabel("seconds")
    left.set_title("Per-step rollout and train time")
    left.legend()
    right.bar([p - width / 2 for p in positions], [r["rollout_busy_fraction"] or 0 for r in rows], width,
              label="rollout busy")
    right.bar([p + width / 2 for p in positions], [r["trainer_busy_fraction"] or 0 for r in rows], width,
              label="trainer busy")
    right.set_xticks(list(positions), labels, rotation=20)
    right.set_ylabel("fraction of the mode's wall time")
    right.set_title("Where the time goes")
    right.legend()
    figure.tight_layout()
    paths.append(plot_dir / "step_times.png")
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


def floor_table(floor_rows: list[dict]) -> str:
    from services.cli.experiments import format_table

    table = [["FLOOR MODE", "N", "K", "EXP/H", "CPU/STEP S", "WALL/STEP S", "PEAK RSS MB", "START ACC", "FINAL ACC"]]
    for f in floor_rows:
        table.append([f["mode"], str(f["n"]), str(f["experiments"]), _num(f["experiments_per_hour"]),
                      _num(f["cpu_s_per_step"], 4), _num(f["wall_s_per_step"], 4), _num(f["peak_rss_mb"], 0),
                      _pct(f["start_accuracy_mean"]), _pct(f["final_accuracy_mean"])])
    return format_table(table)


def peer_summary_table(peer: dict, comparison: dict | None) -> str:
    """The peer beside C-LoRA's serial-warm and N=``PEER_N`` figures."""
    from services.cli.experiments import format_table

    table = [["SYSTEM", "EXP/H", "EXP/H WARM", "FINAL ACC"],
             [f"{peer.get('peer')} {peer.get('trl_version') or ''} (one process each)",
              _num(peer.get("experiments_per_hour")), _num(peer.get("experiments_per_hour_warm")),
              _pct(peer.get("final_accuracy_mean"))]]
    if comparison:
        table.append(["C-LoRA serial-warm", _num(comparison["c_lora_serial_warm_experiments_per_hour"]), "-",
                      _pct(comparison["c_lora_serial_warm_final_accuracy"])])
        table.append([f"C-LoRA N={comparison['c_lora_n']}", _num(comparison["c_lora_experiments_per_hour"]), "-",
                      _pct(comparison["c_lora_final_accuracy"])])
        table.append(["C-LoRA / peer", _num(comparison["throughput_ratio_vs_peer"], 2, "x"),
                      _num(comparison["throughput_ratio_vs_peer_warm"], 2, "x"), "-"])
    return format_table(table)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def settings_record(settings: Settings) -> dict:
    record = asdict(settings)
    record["modes"], record["concurrency"] = list(settings.modes), list(settings.concurrency)
    record["cpu_count"] = len(os.sched_getaffinity(0))
    record["load_average_at_start"] = list(os.getloadavg())
    return record


def _clean(value):
    """JSON-safe: NaN/inf -> None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def side_run(command: list[str], json_path: Path, timeout_s: float) -> tuple[dict | None, str | None]:
    """Run one of the side scripts (floor, peer) as a child process, its output
    streamed; (its JSON report, None) or (None, why not)."""
    import subprocess

    try:
        result = subprocess.run(command, cwd=REPO_ROOT, timeout=max(timeout_s, 1.0),
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    except subprocess.TimeoutExpired:
        return None, f"{Path(command[1]).name}: the global --timeout-s ran out"
    if result.returncode != 0 or not json_path.is_file():
        return None, f"{Path(command[1]).name} exited {result.returncode}"
    return json.loads(json_path.read_text()), None


def run_floor(settings: Settings, data_root: Path, n: int, timeout_s: float) -> tuple[list[dict], str | None]:
    """``load_tests/floor.py`` for one N (1: serial), with the benchmark's K,
    spec fields, seeds and service environment."""
    out = data_root / f"floor-{n}.json"
    command = [sys.executable, str(LOAD_TESTS / "floor.py"), "--experiments", str(settings.experiments),
               "--concurrency", str(n), "--family", settings.family, "--seed", str(settings.seed),
               "--spec-json", json.dumps(settings.spec_fields), "--json", str(out),
               "--data-dir", str(data_root / f"floor-{n}"),
               *[f"--set={key}={value}" for key, value in settings.env.items()]]
    if not settings.warmup:
        command.append("--no-warmup")
    print(f"== floor N={n} (one process, no Redis, no services)", flush=True)
    report, error = side_run(command, out, timeout_s)
    return (report or {}).get("results", []), error


def run_peer(settings: Settings, data_root: Path, timeout_s: float) -> tuple[dict | None, str | None]:
    """``load_tests/peer_trl.py``: the benchmark's K experiments with TRL, one process each."""
    out = data_root / "peer.json"
    command = [sys.executable, str(LOAD_TESTS / "peer_trl.py"), "--experiments", str(settings.experiments),
               "--family", settings.family, "--seed", str(settings.seed),
               "--spec-json", json.dumps(settings.spec_fields), "--json", str(out)]
    print(f"== peer {settings.peer}: {settings.experiments} experiments, one process each", flush=True)
    return side_run(command, out, timeout_s)


def run_side_runs(settings: Settings, data_root: Path, started: float) -> tuple[dict | None, list[str]]:
    """The peer when asked for: (peer summary, errors)."""
    if not settings.peer:
        return None, []
    peer, error = run_peer(settings, data_root, settings.timeout_s - (time.monotonic() - started))
    return peer, [error] if error else []


def run_benchmark(settings: Settings) -> dict:
    """Run every mode; the report (also written to ``--json`` / ``--plot-dir``)."""
    data_root = Path(settings.data_dir or tempfile.mkdtemp(prefix="clora-throughput-")).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    settings_at_start = settings_record(settings)
    started = time.monotonic()
    from services.cli.local import ClusterError

    benchmark = None
    try:
        try:
            if settings.gpu and not settings.model_dir:
                model_dir = write_gpu_model_dir(data_root / GPU_MODEL_SUBDIR)
                settings.env["CLORA_MODEL_DIR"] = str(model_dir)
            benchmark = ThroughputBenchmark(settings, data_root)
            runs, error = benchmark.run()
        except (BenchmarkTimeout, ClusterError) as exc:
            runs, error = (benchmark.runs if benchmark else []), f"{type(exc).__name__}: {exc}"
            settings.keep_data = True  # the service logs say why
        floor_rows = benchmark.floor_rows if benchmark else []
        peer, side_errors = run_side_runs(settings, data_root, started) if error is None else (None, [])
        side_errors = (benchmark.floor_errors if benchmark else []) + side_errors
    finally:
        if not settings.keep_data:
            shutil.rmtree(data_root, ignore_errors=True)
    error = "; ".join([error] if error else side_errors) or None
    rows = add_cpu_bounds(add_throughput_ratios([summarize_mode(run) for run in runs]), len(os.sched_getaffinity(0)))
    add_peer_ratios(add_floor_ratios(rows, floor_rows), peer)
    comparison = peer_comparison(rows, peer)
    report = _clean({
        "settings": {**settings_at_start, "env": settings.env},
        "results": rows, "floor": floor_rows,
        "peer": {k: v for k, v in peer.items() if k != "experiments_detail"} if peer else None,
        "peer_experiments": peer.get("experiments_detail") if peer else None,
        "peer_comparison": comparison,
        "throughput_ratio_vs_peer": comparison["throughput_ratio_vs_peer"] if comparison else None,
        "throughput_ratio_vs_peer_warm": comparison["throughput_ratio_vs_peer_warm"] if comparison else None,
        "experiments": {f"{run.mode}:{run.n}": [asdict(o) for o in run.outcomes] for run in runs},
        "error": error, "total_s": time.monotonic() - started,
        "data_dir": str(data_root) if settings.keep_data else None,
    })
    print()
    print(results_table(rows) if rows else "no results")
    if any(r.get("cpu_s") for r in rows):
        print()
        print(cpu_table(rows))
    if any(r.get("rss_mb") for r in rows):
        print()
        print(growth_table(rows))
    if floor_rows:
        print()
        print(floor_table(floor_rows))
    if floor_rows or peer or any(r.get("fraction_of_cpu_bound") is not None for r in rows):
        print()
        print(comparison_table(rows))
    if peer:
        print()
        print(peer_summary_table(peer, comparison))
    if error:
        print(f"stopped early: {error}")
    if settings.json_path:
        Path(settings.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results: {settings.json_path}")
    if settings.plot_dir and rows:
        for path in write_plots(rows, Path(settings.plot_dir)):
            print(f"plot: {path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every mode ran and every experiment finished."""
    report = run_benchmark(parse_args(argv))
    ok = report["error"] is None and report["results"] and all(r["all_finished"] for r in report["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
