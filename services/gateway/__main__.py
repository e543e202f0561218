"""``python -m services.gateway``: run the Tinker-compatible gateway."""

from __future__ import annotations

import sys

from services.gateway.config import GatewayConfig
from shared.config import load_config
from shared.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(GatewayConfig, argv)
    configure_logging(config.log_level, config.log_format)
    from services.gateway.service import GatewayService
    from shared.runtime import run_service

    return run_service(GatewayService(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
