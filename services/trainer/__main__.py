"""``clora trainer``: run the trainer service (one shard of ``train_jobs``)."""

from __future__ import annotations

import sys

from shared.config import TrainerConfig, load_config
from shared.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(TrainerConfig, argv)
    configure_logging(config.log_level, config.log_format)
    from services.trainer.service import TrainerService
    from shared.runtime import run_service

    return run_service(TrainerService(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
