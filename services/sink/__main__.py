"""``clora sink --tensorboard DIR [--mlflow-uri URI] [--wandb-project P]``:
write every experiment's curves where people already look (see
``services.sink.service``). Runs until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from services.cli.experiments import add_connection_args, resolve_prefix, resolve_redis_url
from shared.logging import configure_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clora sink", description="write experiment curves to TensorBoard "
                                     "event files and, when asked, to MLflow and Weights & Biases")
    parser.add_argument("--tensorboard", required=True, help="directory: one run directory per experiment")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI, e.g. file:/path or sqlite:///x.db")
    parser.add_argument("--mlflow-experiment", default="clora", help="MLflow experiment holding the runs")
    parser.add_argument("--wandb-project", default=None, help="W&B project (offline unless WANDB_MODE says else)")
    parser.add_argument("--state-file", default=None, help="default: <tensorboard dir>/.clora-sink.json")
    parser.add_argument("--log-level", default="info")
    add_connection_args(parser)
    return parser.parse_args(argv)


def make_writers(args: argparse.Namespace) -> list:
    from services.sink.writers import MlflowWriter, TensorBoardWriter, WandbWriter

    writers: list = [TensorBoardWriter(args.tensorboard)]
    if args.mlflow_uri:
        writers.append(MlflowWriter(args.mlflow_uri, args.mlflow_experiment))
    if args.wandb_project:
        writers.append(WandbWriter(args.wandb_project, Path(args.tensorboard) / "wandb"))
    return writers


async def serve(args: argparse.Namespace) -> None:
    from services.sink.service import STATE_FILE, MetricsSink
    from shared.client import AsyncCloraClient

    client = AsyncCloraClient.connect(resolve_redis_url(args), resolve_prefix(args), args.data_dir)
    sink = MetricsSink(client.bus, make_writers(args), Path(args.state_file or Path(args.tensorboard) / STATE_FILE))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, sink.stop)
    try:
        sink.setup()
        await sink.run()
    finally:
        sink.close()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    from services.cli.experiments import CliError
    from services.sink.writers import SinkConfigError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level)
    try:
        asyncio.run(serve(args))
    except (SinkConfigError, CliError) as exc:
        print(f"clora sink: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
