"""A tiny C-LoRA service for the bus and runtime tests, run as a subprocess:
``python tests/integration/bus_worker.py --handler-sleep-s 2`` with
``REDIS_URL`` and ``CLORA_STREAM_PREFIX`` in the environment.

It consumes the ``experiments`` stream (group ``busworker``). For each
message it records the start (list ``<prefix>started``: ``<experiment>|<pid>``),
sleeps ``handler_sleep_s``, then does its effect: ``INCR
<prefix>effects:<experiment>`` (deliberately not idempotent, so a double
delivery shows up as 2) and publishes an ``ExperimentEvent`` (code
``finished`` for a submission, ``cancelled`` for a cancel) on ``events``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

from shared.config import BaseConfig, load_config
from shared.logging import configure_logging
from shared.messages import ExperimentEvent, ExperimentSubmit, now
from shared.runtime import Service, run_service

GROUP = "busworker"


@dataclass
class BusWorkerConfig(BaseConfig):
    handler_sleep_s: float = 0.0


class BusWorker(Service):
    name = "busworker"

    def consumers(self):
        return [self.consumer("experiments", GROUP, self.handle)]

    async def handle(self, message, entry) -> None:
        prefix = self.config.stream_prefix
        experiment_id = message.spec.experiment_id if isinstance(message, ExperimentSubmit) else message.experiment_id
        await self.redis.rpush(f"{prefix}started", f"{experiment_id}|{os.getpid()}")
        await asyncio.sleep(self.config.handler_sleep_s)
        await self.redis.incr(f"{prefix}effects:{experiment_id}")
        submitted = isinstance(message, ExperimentSubmit)
        detail = f"steps={message.spec.steps}" if submitted else "cancel"
        # A terminal code, so a client following the README's example stops reading.
        await self.bus.publish(ExperimentEvent(
            experiment_id=experiment_id, level="info", code="finished" if submitted else "cancelled",
            message=f"{type(message).__name__} {detail} handled by {self.consumer_name}", ts=now(),
        ))


def main(argv: list[str]) -> int:
    config = load_config(BusWorkerConfig, argv)
    configure_logging(config.log_level, config.log_format)
    return run_service(BusWorker(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
