"""``clora rollout``: run the rollout (generation) service."""

from __future__ import annotations

import sys

from shared.config import RolloutConfig, load_config
from shared.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(RolloutConfig, argv)
    configure_logging(config.log_level, config.log_format)
    from services.rollout.engines import build_engine
    from services.rollout.service import RolloutService
    from shared.runtime import run_service

    return run_service(RolloutService(config, engine=build_engine(config)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
