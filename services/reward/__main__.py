"""``clora reward``: run the reward service."""

from __future__ import annotations

import sys

from shared.config import RewardConfig, load_config
from shared.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(RewardConfig, argv)
    configure_logging(config.log_level, config.log_format)
    from services.reward.service import RewardService
    from shared.runtime import run_service

    return run_service(RewardService(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
