"""``clora scheduler``: run the scheduler service."""

from __future__ import annotations

import sys

from shared.config import SchedulerConfig, load_config
from shared.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(SchedulerConfig, argv)
    configure_logging(config.log_level, config.log_format)
    from services.scheduler.service import SchedulerService
    from shared.runtime import run_service

    return run_service(SchedulerService(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
