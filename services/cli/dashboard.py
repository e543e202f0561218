"""``clora dashboard [--port P] [--host 127.0.0.1]``: a live page of every
experiment (state, reward and held-out accuracy curves), the engine's batch
composition (which tenants share decode steps) and the trainer's queue.

It reads only what the client ACL role may read: the experiment records and
their metrics lists, the ``adapters`` / ``events`` streams' group names
(``XINFO GROUPS``: each rollout worker and trainer shard keeps a private
group named after itself, which names its heartbeat key) and the rollout
and trainer heartbeats. A tenant has a train job queued when its record's
``train_sent`` is one past its ``version`` (one job per tenant at a time).

The page (``static/dashboard.html`` + ``.js``, no build step, nothing from a
CDN) polls ``GET /api/state`` and draws the curves on ``<canvas>``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
from redis.exceptions import NoPermissionError, ResponseError

from services.cli.experiments import CliError, add_connection_args, resolve_prefix, resolve_redis_url
from services.scheduler.state import parse_record
from shared.client import AsyncCloraClient
from shared.messages import StepMetrics, is_experiment_id
from shared.runtime import heartbeat_key

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_PORT = 8750
MAX_EXPERIMENTS = 50  # the most recently submitted ones
MAX_POINTS = 500  # per curve: the newest steps
MAX_PAIRS = 50
WORKER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
WATCH_GROUPS = {"rollout": ("adapters", "rollout-watch-"), "trainer": ("events", "trainer-watch-")}
ROLLOUT_COUNTERS = ("decode_steps", "generated_tokens", "adapter_loads", "running_rows")
TRAINER_COUNTERS = ("tenants", "jobs_trained", "jobs_republished")


# ---------------------------------------------------------------- what the page shows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def experiment_row(experiment_id: str, raw: dict[bytes, bytes]) -> dict[str, Any]:
    record = parse_record(experiment_id, raw)
    train_sent = raw.get(b"train_sent", b"0")
    queued = record.status == "running" and train_sent.isdigit() and int(train_sent) == record.version + 1
    return {"id": experiment_id, "status": record.status, "step": record.step, "steps": record.steps,
            "version": record.version, "reward_mean": record.reward_mean, "accuracy": record.accuracy,
            "start_accuracy": record.start_accuracy, "final_accuracy": record.final_accuracy,
            "error": record.error, "train_job_queued": queued}


def curves(metrics: list[StepMetrics]) -> dict[str, list[list[float]]]:
    """``reward``: [step, reward_mean]; ``held_out``: [adapter version,
    accuracy] (version 0 = ``start_eval_accuracy``), as the sink writes them."""
    reward: list[list[float]] = []
    held_out: dict[int, float] = {}
    for m in metrics:
        if (reward_mean := _number(m.reward_mean)) is not None:
            reward.append([m.step, reward_mean])
        if (start := _number(m.start_eval_accuracy)) is not None:
            held_out[0] = start
        if (accuracy := _number(m.eval_accuracy)) is not None:
            held_out[m.produced_version if m.produced_version is not None else m.step + 1] = accuracy
    return {"reward": reward, "held_out": [[version, value] for version, value in sorted(held_out.items())]}


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def rollout_view(name: str, heartbeat: dict[str, Any]) -> dict[str, Any]:
    status = _mapping(heartbeat.get("status"))
    pairs = _mapping(status.get("shared_steps"))
    shared = sorted(((str(k), v) for k, v in pairs.items() if isinstance(v, int)), key=lambda kv: -kv[1])
    return {"worker": name, "ts": _number(heartbeat.get("ts")),
            **{key: _number(status.get(key)) for key in ROLLOUT_COUNTERS},
            "shared_steps": [[pair, steps] for pair, steps in shared[:MAX_PAIRS]]}


def trainer_view(name: str, heartbeat: dict[str, Any]) -> dict[str, Any]:
    status = _mapping(heartbeat.get("status"))
    consumers = status.get("consumers")
    consumers = consumers if isinstance(consumers, list) else []
    in_flight = sum(c.get("in_flight", 0) for c in consumers
                    if isinstance(c, dict) and str(c.get("stream", "")).startswith("train_jobs")
                    and isinstance(c.get("in_flight"), int))
    return {"worker": name, "ts": _number(heartbeat.get("ts")), "training": in_flight,
            **{key: _number(status.get(key)) for key in TRAINER_COUNTERS}}


# ---------------------------------------------------------------- reading Redis as a client


class DashboardState:
    """Reads one snapshot of what the page shows, through the client's rights."""

    def __init__(self, client: AsyncCloraClient) -> None:
        self.client = client

    async def snapshot(self) -> dict[str, Any]:
        indexed: list[bytes] = await self.client.redis.zrange(  # type: ignore[assignment]
            self.client.keys.index, -MAX_EXPERIMENTS, -1)
        ids = [i for i in (_text(raw_id) for raw_id in indexed) if is_experiment_id(i)]
        experiments, all_curves = [], {}
        for experiment_id in ids:
            raw: dict[bytes, bytes] = await self.client.redis.hgetall(  # type: ignore[assignment]
                self.client.keys.exp(experiment_id))
            if raw:
                experiments.append(experiment_row(experiment_id, raw))
                all_curves[experiment_id] = curves(await self._metrics(experiment_id))
        rollout, trainer, note = await self._workers()
        queue = [row["id"] for row in experiments if row["train_job_queued"]]
        return {"experiments": experiments, "curves": all_curves, "rollout": rollout,
                "trainer": {"workers": trainer, "queue": queue}, "workers_note": note}

    async def _metrics(self, experiment_id: str) -> list[StepMetrics]:
        raw: list[bytes] = await self.client.redis.lrange(  # type: ignore[assignment]
            self.client.keys.metrics(experiment_id), -MAX_POINTS, -1)
        decoded = []
        for item in raw:
            try:
                decoded.append(msgspec.msgpack.decode(item, type=StepMetrics))
            except msgspec.DecodeError:
                continue  # a record we cannot read is left out, the page still shows the rest
        return decoded

    async def _workers(self) -> tuple[list[dict], list[dict], str | None]:
        views: dict[str, list[dict]] = {"rollout": [], "trainer": []}
        try:
            for service, (stream, group_prefix) in WATCH_GROUPS.items():
                for name in await self._worker_names(stream, group_prefix):
                    heartbeat = await self._heartbeat(service, name)
                    if heartbeat is not None:
                        view = rollout_view if service == "rollout" else trainer_view
                        views[service].append(view(name, heartbeat))
        except NoPermissionError:
            return [], [], ("this Redis user may not read the rollout / trainer heartbeats "
                            "(a deployment older than the dashboard: re-apply `clora acl`)")
        return views["rollout"], views["trainer"], None

    async def _worker_names(self, stream: str, group_prefix: str) -> list[str]:
        try:
            groups = await self.client.redis.xinfo_groups(self.client.bus.key(stream))
        except NoPermissionError:
            raise
        except ResponseError:
            return []  # no such stream yet
        names = [_text(g.get("name", b"")).removeprefix(group_prefix) for g in groups
                 if _text(g.get("name", b"")).startswith(group_prefix)]
        return sorted(n for n in names if WORKER_NAME.fullmatch(n))

    async def _heartbeat(self, service: str, name: str) -> dict[str, Any] | None:
        raw: bytes | None = await self.client.redis.get(  # type: ignore[assignment]
            heartbeat_key(self.client.prefix, service, name))
        if raw is None:
            return None
        try:
            heartbeat = msgspec.msgpack.decode(raw)
        except msgspec.DecodeError:
            return None
        return heartbeat if isinstance(heartbeat, dict) else None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- HTTP


def make_app(state: DashboardState):
    from aiohttp import web

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "dashboard.html")

    async def script(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "dashboard.js")

    async def api_state(request: web.Request) -> web.Response:
        return web.json_response(await state.snapshot(), headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/dashboard.js", script)
    app.router.add_get("/api/state", api_state)
    return app


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clora dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port (the URL is printed)")
    add_connection_args(parser)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    client = AsyncCloraClient.connect(resolve_redis_url(args), resolve_prefix(args), args.data_dir)
    runner = web.AppRunner(make_app(DashboardState(client)))
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1]  # the bound port (a free one with --port 0)
        print(f"clora dashboard: http://{args.host}:{port}/", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("clora dashboard: needs the `aiohttp` package (pip install aiohttp)", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except CliError as exc:
        print(f"clora dashboard: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
