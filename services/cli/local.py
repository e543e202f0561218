"""``clora up`` and ``clora demo``: the whole system as local processes.

``LocalCluster`` starts Redis (the embedded Valkey under ``<data_dir>/redis``
unless a URL is given) and the four services as subprocesses
(``python -m services.cli <service>``), each with ``REDIS_URL`` and a stable
consumer name (``rollout-0``, ``trainer-1``...) so that a restarted process
re-reads its own pending entries at once. Tests, the demo and the benchmarks
use it; ``kill`` / ``restart`` exercise crash and resume.

``acl=True`` (what ``clora up`` and ``clora demo`` use) starts the embedded
server with the ACL roles of ``shared.acl`` on the cluster's prefix: a
password per role generated once into ``<data_dir>/credentials/<role>``
(0600), the services connect as ``service`` (``CLORA_REDIS_USERNAME`` and
``CLORA_REDIS_PASSWORD_FILE``), and the client and the ``clora`` commands
find the ``client`` (or ``admin``) password there with no extra step
(``shared.client.find_credentials``). Without it (the default, and always
with a ``redis_url``) the cluster uses Redis as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared import acl
from shared.config import DEFAULT_MODEL_DIR
from shared.redis_server import EmbeddedRedis

STOP_ORDER = ("gateway", "scheduler", "rollout", "reward", "trainer")  # stop issuing work first
START_ORDER = ("trainer", "reward", "rollout", "scheduler")  # slowest to load first
STOP_TIMEOUT_S = 30.0  # SIGTERM -> SIGKILL
READY_TIMEOUT_S = 180.0
READY_POLL_S = 0.2
LOG_TAIL_LINES = 20
REDIS_URL_FILE = "redis_url"  # the address, while the cluster runs (shared.client.find_redis_url reads it)
STREAM_PREFIX_FILE = "stream_prefix"  # likewise, the key prefix
REDIS_PORT_FILE = "redis_port"  # the embedded server's port, kept: the next start reuses it when free


class ClusterError(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    """One service process of the cluster."""

    name: str  # e.g. "trainer-0"; also its consumer name
    service: str  # scheduler | rollout | reward | trainer
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def running(self) -> subprocess.Popen | None:
        """The process while it runs, else None."""
        return self.process if self.alive() else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalCluster:
    """Redis + scheduler + reward + rollout worker(s) + trainer shard(s).

    ``env`` goes to every service, ``service_env[service]`` to one kind
    (e.g. ``{"rollout": {"CLORA_MAX_ROWS": "64"}}``). Use as a context manager
    or call ``start()`` / ``stop()``."""

    data_dir: Path  # a str is accepted too: __post_init__ resolves it to a Path
    redis_url: str | None = None
    num_rollout_workers: int = 1
    num_trainer_shards: int = 1
    stream_prefix: str = "clora:"
    env: Mapping[str, str] = field(default_factory=dict)
    service_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    services: Sequence[str] = START_ORDER
    python: str = sys.executable
    acl: bool = False  # the embedded server with ACL roles on (ignored with a redis_url)
    gateway_port: int | None = None  # start the Tinker gateway (services/gateway) on this port too (0: any free)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self._redis: EmbeddedRedis | None = None
        self._url: str | None = self.redis_url
        self.processes: dict[str, ServiceProcess] = {}

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._url is None:
            raise ClusterError("the cluster is not started")
        return self._url

    @property
    def pids(self) -> dict[str, int | None]:
        """Each service process's pid, and the embedded Redis server's as ``redis``."""
        pids = {name: p.pid for name, p in self.processes.items()}
        if self._redis is not None:
            pids["redis"] = self._redis.pid
        return pids

    def start(self) -> "LocalCluster":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self._url is None:
            self._redis = EmbeddedRedis(self.data_dir / "redis", persist=True,
                                         port=_saved_port(self.data_dir / REDIS_PORT_FILE), acl=self._acl_text())
            self._url = self._redis.start()
            (self.data_dir / REDIS_PORT_FILE).write_text(f"{urlsplit(self._url).port}\n")
        (self.data_dir / REDIS_URL_FILE).write_text(self._url + "\n")
        (self.data_dir / STREAM_PREFIX_FILE).write_text(self.stream_prefix + "\n")
        self.processes = {p.name: p for p in self._plan()}
        for process in self.processes.values():
            self._spawn(process)
        return self

    def stop(self) -> None:
        """Stop the services in ``STOP_ORDER`` (SIGTERM, then SIGKILL after
        ``STOP_TIMEOUT_S``), then the embedded Redis."""
        for service in STOP_ORDER:
            group = [p for p in self.processes.values() if p.service == service]
            for process in group:
                popen = process.running()
                if popen is not None:
                    popen.send_signal(signal.SIGTERM)
            for process in group:
                _wait_or_kill(process)
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
            self._url = self.redis_url
        (self.data_dir / REDIS_URL_FILE).unlink(missing_ok=True)  # no command may find a stopped Redis
        (self.data_dir / STREAM_PREFIX_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    # ------------------------------------------------------------ credentials

    @property
    def acl_on(self) -> bool:
        """Whether this cluster's own embedded server runs with ACL roles."""
        return self.acl and self.redis_url is None

    def _acl_text(self) -> str | None:
        if not self.acl_on:
            return None
        return acl.acl_file_text(self.stream_prefix, acl.ensure_passwords(acl.credentials_dir(self.data_dir)))

    def credentials(self, role: str) -> dict[str, str]:
        """redis-py ``username`` / ``password`` options of ``role`` ({} without ACLs)."""
        if not self.acl_on:
            return {}
        return {"username": role, "password": acl.read_password_file(acl.password_file(self.data_dir, role))}

    def redis_client(self, role: str = "admin"):
        """A ``redis.Redis`` to the cluster's Redis as ``role``."""
        import redis

        return redis.Redis.from_url(self.url, **self.credentials(role))

    def service_credentials_env(self) -> dict[str, str]:
        """The services' ACL user and password file ({} without ACLs)."""
        if not self.acl_on:
            return {}
        return {acl.USERNAME_ENV: "service", acl.PASSWORD_FILE_ENV: str(acl.password_file(self.data_dir, "service")),
                acl.PASSWORD_ENV: ""}

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------ crash and resume

    def select(self, name: str) -> list[ServiceProcess]:
        """``"trainer-0"`` one process; ``"trainer"`` every trainer process."""
        if name in self.processes:
            return [self.processes[name]]
        found = [p for p in self.processes.values() if p.service == name]
        if not found:
            raise ClusterError(f"no process {name!r}; have {sorted(self.processes)}")
        return found

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` (default SIGKILL) to the process(es) ``name`` and wait
        for them to exit; returns their pids."""
        pids = []
        for process in self.select(name):
            popen = process.running()
            if popen is not None:
                pids.append(popen.pid)
                popen.send_signal(sig)
                _wait_or_kill(process)
        return pids

    def restart(self, name: str, sig: int = signal.SIGTERM) -> dict[str, int]:
        """Stop (``sig``, default a clean SIGTERM) and start again; new pids."""
        self.kill(name, sig)
        return {process.name: self._spawn(process) for process in self.select(name)}

    def start_service(self, name: str) -> None:
        """Start the process(es) ``name`` again after a ``kill``."""
        for process in self.select(name):
            if not process.alive():
                self._spawn(process)

    # ------------------------------------------------------------ health

    def dead(self) -> list[ServiceProcess]:
        return [p for p in self.processes.values() if not p.alive()]

    def check_alive(self) -> None:
        dead = self.dead()
        if dead:
            details = "\n".join(f"--- {p.name} exited {p.returncode}; log tail:\n{p.log_tail()}" for p in dead)
            raise ClusterError(f"service process(es) died: {', '.join(p.name for p in dead)}\n{details}")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, names: Sequence[str] | None = None) -> None:
        """Wait until every process (or ``names``) has a live heartbeat."""
        from shared.runtime import heartbeat_key

        wanted = [p for p in self.processes.values() if names is None or p.name in names or p.service in names]
        client = self.redis_client("admin")
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self.check_alive()
                keys = [heartbeat_key(self.stream_prefix, p.service, p.name) for p in wanted]
                if all(client.exists(key) for key in keys):
                    return
                if time.monotonic() > deadline:
                    missing = [p.name for p, k in zip(wanted, keys, strict=True) if not client.exists(k)]
                    raise ClusterError(f"not ready after {timeout_s:.0f}s: {missing}")
                time.sleep(READY_POLL_S)
        finally:
            client.close()

    def metrics_urls(self) -> dict[str, str]:
        """Process name -> its Prometheus endpoint, from the live heartbeats
        (each service binds a free port unless CLORA_METRICS_PORT says otherwise)."""
        from shared.runtime import decode_heartbeat, heartbeat_key

        client = self.redis_client("admin")
        try:
            urls = {}
            for process in self.processes.values():
                value = client.get(heartbeat_key(self.stream_prefix, process.service, process.name))
                url = decode_heartbeat(value).get("metrics_url", "") if value else ""
                if url:
                    urls[process.name] = url
            return urls
        finally:
            client.close()

    # ------------------------------------------------------------ internals

    def _plan(self) -> list[ServiceProcess]:
        plan = []
        for service in START_ORDER:
            if service not in self.services:
                continue
            count = {"rollout": self.num_rollout_workers, "trainer": self.num_trainer_shards}.get(service, 1)
            for index in range(count):
                name = f"{service}-{index}" if service in ("rollout", "trainer") else service
                env = {**self._base_env(name), **self._service_specific_env(service, index),
                       **self.service_env.get(service, {})}
                plan.append(ServiceProcess(name, service, env, self.data_dir / "logs" / f"{name}.log"))
        if self.gateway_port is not None:
            env = {**self._base_env("gateway"), "CLORA_GATEWAY_PORT": str(self.gateway_port),
                   **self.service_env.get("gateway", {})}
            plan.append(ServiceProcess("gateway", "gateway", env, self.data_dir / "logs" / "gateway.log"))
        return plan

    def _base_env(self, name: str) -> dict[str, str]:
        return {
            "CLORA_DATA_DIR": str(self.data_dir),
            "CLORA_STREAM_PREFIX": self.stream_prefix,
            "CLORA_CONSUMER_NAME": name,
            **self.env,
        }

    def _service_specific_env(self, service: str, index: int) -> dict[str, str]:
        if service == "scheduler":
            return {"CLORA_NUM_TRAINER_SHARDS": str(self.num_trainer_shards), **self._model_context_env()}
        if service == "trainer":
            return {"CLORA_SHARD": str(index), "CLORA_NUM_SHARDS": str(self.num_trainer_shards)}
        return {}

    def _model_context_env(self) -> dict[str, str]:
        """The scheduler does not load the model; tell it the model's context,
        so that a spec whose max_tokens cannot fit is refused at submission."""
        if "CLORA_MAX_MODEL_LEN" in {**os.environ, **self.env}:
            return {}
        model_dir = Path(self.env.get("CLORA_MODEL_DIR") or os.environ.get("CLORA_MODEL_DIR") or DEFAULT_MODEL_DIR)
        try:
            context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # a hub id or an unusual config: unknown, not checked
        return {"CLORA_MAX_MODEL_LEN": str(int(context))}

    def _spawn(self, process: ServiceProcess) -> int:
        """Start ``process``; its pid."""
        env = {**os.environ, **process.env, "REDIS_URL": self.url, **self.service_credentials_env()}
        with open(process.log_path, "ab") as log_file:
            popen = process.process = subprocess.Popen(
                [self.python, "-m", "services.cli", process.service],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop them in order
            )
        process.starts += 1
        return popen.pid


def _saved_port(path: Path) -> int | None:
    """The port of the last start when it is still free (else None: any free port)."""
    try:
        port = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


def _wait_or_kill(process: ServiceProcess) -> None:
    if process.process is None:
        return
    try:
        process.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.process.kill()
        process.process.wait()


# ---------------------------------------------------------------- clora up


class _StopRequested(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _StopRequested(signal.Signals(signum).name)


def _add_engine_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["torch", "vllm"], default=os.environ.get("CLORA_ENGINE", "torch"),
                        help="the rollout's generation engine (vllm: `bash deploy/setup.sh --vllm` first)")


def _engine_env(engine: str) -> dict[str, dict[str, str]]:
    return {"rollout": {"CLORA_ENGINE": engine}}


def up(argv: list[str]) -> int:
    """``clora up``: Redis + the four services until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="clora up", description="run Redis and all four services locally")
    parser.add_argument("--data-dir", default=os.environ.get("CLORA_DATA_DIR", ".clora"))
    parser.add_argument("--rollout-workers", type=int, default=1)
    parser.add_argument("--trainer-shards", type=int, default=1)
    parser.add_argument("--stream-prefix", default=os.environ.get("CLORA_STREAM_PREFIX", "clora:"))
    parser.add_argument("--gateway-port", type=int, default=None,
                        help="also run the Tinker-compatible gateway on this port (keys: CLORA_GATEWAY_API_KEYS "
                             "or CLORA_GATEWAY_API_KEYS_FILE)")
    _add_engine_argument(parser)
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.data_dir, redis_url=os.environ.get("REDIS_URL") or None,
                           num_rollout_workers=args.rollout_workers, num_trainer_shards=args.trainer_shards,
                           stream_prefix=args.stream_prefix, service_env=_engine_env(args.engine), acl=True,
                           gateway_port=args.gateway_port)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        cluster.start()
        print(f"REDIS_URL={cluster.url}", flush=True)
        print(f"CLORA_STREAM_PREFIX={cluster.stream_prefix}")
        print(f"clora up: Redis at {cluster.url} (written to {cluster.data_dir / REDIS_URL_FILE}; every clora "
              f"command run from here finds it); logs in {cluster.data_dir / 'logs'}")
        if cluster.acl_on:
            print(f"  Redis ACL users service, client, admin; passwords in {acl.credentials_dir(cluster.data_dir)} "
                  "(this user only)")
        print("  " + ", ".join(f"{name} (pid {pid})" for name, pid in cluster.pids.items()))
        print("  other programs: eval \"$(clora env)\"   submit: clora submit SPEC.yaml   Ctrl-C stops everything",
              flush=True)
        metrics_shown = False
        while True:
            cluster.check_alive()
            metrics_shown = metrics_shown or _print_metrics_urls(cluster)
            time.sleep(1.0)
    except _StopRequested as stop:
        print(f"clora up: {stop}; stopping services")
    except ClusterError as exc:
        print(f"clora up: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not break the ordered stop
        cluster.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_code


# ---------------------------------------------------------------- clora demo

# The demo's experiments; change them here. A tiny-model eval.json with a
# "demo" map (spec fields, optionally "families") overrides these defaults.
DEMO_FAMILIES = ("add", "sub", "reverse", "sort")
DEMO_SPEC = {
    "steps": 20,
    "prompts_per_step": 8,
    "group_size": 8,
    "max_tokens": 8,
    "temperature": 1.0,
    "learning_rate": 2e-3,
    "lora_rank": 8,
    "eval_size": 64,
}
DEMO_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json"}
DEMO_TIMEOUT_S = 570.0  # the demo must end within 10 minutes, startup included
DEMO_MODEL_EVAL = Path(__file__).resolve().parents[2] / "shared" / "models" / "clora-tiny" / "eval.json"


def _print_metrics_urls(cluster: LocalCluster) -> bool:
    """Print each process's Prometheus endpoint once all of them beat; True when printed."""
    urls = cluster.metrics_urls()
    if len(urls) < len(cluster.processes):
        return False
    print("  metrics: " + ", ".join(f"{name} {url}" for name, url in urls.items()), flush=True)
    return True


def demo_settings(eval_path: Path = DEMO_MODEL_EVAL) -> tuple[tuple[str, ...], dict]:
    """(families, spec fields) for the demo, with the tiny model's advice applied."""
    families, spec_fields = DEMO_FAMILIES, dict(DEMO_SPEC)
    try:
        advice = json.loads(eval_path.read_text()).get("demo") or {}
    except (OSError, ValueError):
        advice = {}
    if isinstance(advice, dict):
        families = tuple(advice.get("families", families))
        spec_fields.update({k: v for k, v in advice.items() if k != "families"})
    return families, spec_fields


def demo_specs(families: Sequence[str], spec_fields: dict, seed: int = 0) -> list:
    from shared.messages import ExperimentSpec, RewardSpec, TaskSource

    return [
        ExperimentSpec(experiment_id=f"demo-{family.replace('_', '-')}", task=TaskSource(family=family),
                       reward=RewardSpec(type="family", family=family), seed=seed + index, **spec_fields)
        for index, family in enumerate(families)
    ]


def demo(argv: list[str]) -> int:
    """``clora demo``: four experiments at once on the tiny model, live."""
    families, spec_fields = demo_settings()
    parser = argparse.ArgumentParser(prog="clora demo", description="four concurrent RL experiments, live")
    parser.add_argument("--data-dir", default=None, help="default: a temporary directory, removed at the end")
    parser.add_argument("--plot", default="clora-demo.png", help="PNG of reward and held-out accuracy per step")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    parser.add_argument("--families", default=",".join(families), help="comma-separated task families")
    parser.add_argument("--steps", type=int, default=spec_fields["steps"])
    parser.add_argument("--timeout", type=float, default=DEMO_TIMEOUT_S)
    _add_engine_argument(parser)
    args = parser.parse_args(argv)
    spec_fields["steps"] = args.steps
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="clora-demo-")) if temporary else Path(args.data_dir)
    try:
        return _demo(args, data_dir, demo_specs([f for f in args.families.split(",") if f], spec_fields))
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)  # the demo leaves nothing behind but its results


def _demo(args: argparse.Namespace, data_dir: Path, specs: list) -> int:
    from shared.client import SpecRefused

    started = time.monotonic()
    print(f"clora demo: {len(specs)} experiments, {args.steps} steps each; data in {data_dir}")
    with LocalCluster(data_dir, env=DEMO_ENV, service_env=_engine_env(args.engine), acl=True) as cluster:
        try:
            cluster.wait_ready()
            print(f"services ready after {time.monotonic() - started:.1f}s")
            records, history = _run_demo(cluster, specs, args.timeout - (time.monotonic() - started))
        except ClusterError as exc:
            print(f"clora demo: {exc}", file=sys.stderr)
            return 1
        except SpecRefused as exc:  # e.g. --data-dir of an earlier demo: its experiment ids are taken
            print(f"clora demo: refused: {'; '.join(exc.reasons)} (use a fresh --data-dir)", file=sys.stderr)
            return 2
    rows = _demo_rows(specs, records)
    _print_demo_table(rows)
    plot_path = Path(args.plot)
    plot_rewards(history, plot_path, held_out={r["id"]: (r["start_accuracy"], r["final_accuracy"]) for r in rows},
                 steps=args.steps)
    print(f"reward and held-out accuracy per step: {plot_path}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"experiments": rows}, indent=2) + "\n")
        print(f"results: {args.json_path}")
    print(f"total {time.monotonic() - started:.1f}s")
    return 0 if all(r["status"] == "finished" for r in rows) else 1


def _run_demo(cluster: LocalCluster, specs: list, timeout_s: float):
    import warnings

    from services.cli.experiments import ProgressDisplay, reward_history, watch_until_done
    from shared.client import CloraClient, NoDeploymentWarning

    with CloraClient(cluster.redis_client("client"), cluster.stream_prefix) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoDeploymentWarning)  # the demo's specs fit the defaults too
            ids = [client.submit(spec) for spec in specs]

        def should_stop() -> bool:
            cluster.check_alive()  # raises with the dead process's log tail
            return False

        records = watch_until_done(client, None, ids, timeout_s=max(timeout_s, 1.0), display=ProgressDisplay(),
                                   should_stop=should_stop)
        history = {i: reward_history(client, None, i) for i in ids}
        return records, history


def _demo_rows(specs: list, records: list) -> list[dict]:
    rows = []
    for spec, record in zip(specs, records, strict=True):
        wall_s = None
        if record is not None and record.finished_at and record.submitted_at:
            wall_s = round(record.finished_at - record.submitted_at, 1)
        rows.append({
            "id": spec.experiment_id, "family": spec.task.family,
            "status": record.status if record else "unknown",
            "start_accuracy": record.start_accuracy if record else None,
            "final_accuracy": record.final_accuracy if record else None,
            "steps": record.step if record else 0, "wall_s": wall_s,
        })
    return rows


def _print_demo_table(rows: list[dict]) -> None:
    from services.cli.experiments import format_table

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    table = [["EXPERIMENT", "FAMILY", "STATUS", "STEPS", "START ACC", "FINAL ACC", "CHANGE", "WALL S"]]
    for r in rows:
        change = ("-" if r["start_accuracy"] is None or r["final_accuracy"] is None
                  else f"{100 * (r['final_accuracy'] - r['start_accuracy']):+.1f} pts")
        table.append([r["id"], r["family"], r["status"], str(r["steps"]), pct(r["start_accuracy"]),
                      pct(r["final_accuracy"]), change, "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"])
    print()
    print(format_table(table))


def plot_rewards(history: Mapping[str, list[tuple[int, float | None]]], path: Path,
                 held_out: Mapping[str, tuple[float | None, float | None]] | None = None,
                 steps: int | None = None) -> None:
    """Top: mean reward of each step's train samples. Bottom: held-out greedy
    accuracy before training (step 0) and after the last step. One colour per
    experiment, whole-step ticks (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    held_out = held_out or {}
    figure, (reward_axes, accuracy_axes) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for index, (experiment_id, points) in enumerate(history.items()):
        colour = f"C{index}"
        if points:
            rewards = [float("nan") if r is None else r for _, r in points]  # a step nothing scored: a gap
            reward_axes.plot([s + 1 for s, _ in points], rewards, marker=".", color=colour, label=experiment_id)
        start, final = held_out.get(experiment_id, (None, None))
        known = [(x, a) for x, a in ((0, start), (steps or len(points), final)) if a is not None]
        if known:
            accuracy_axes.plot([x for x, _ in known], [a for _, a in known], marker="o", linestyle="--",
                               color=colour, label=experiment_id)
    reward_axes.set_ylabel("mean reward\n(train samples, T=1)")
    accuracy_axes.set_ylabel("held-out accuracy\n(greedy)")
    accuracy_axes.set_xlabel("step (adapter version after it)")
    for axes in (reward_axes, accuracy_axes):
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="lower right", fontsize="small")
    reward_axes.set_title("C-LoRA demo: concurrent experiments on one base model")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
