"""One logging configuration for every C-LoRA process.

structlog renders key-value events: JSON lines when stdout is not a terminal
(containers, log shippers), a readable console on one. Context bound with
``structlog.contextvars`` (the bus binds ``stream``, ``entry_id`` and ``kind``
per message) is merged into every event. Records from stdlib loggers (redis,
asyncio, transformers...) go through the same renderer, so a process writes
one format only.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import Processor

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "json", "console")
# Libraries that are chatty at INFO and say nothing a C-LoRA operator needs.
QUIET_LIBRARIES = ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "filelock", "asyncio")


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger; safe to call again."""
    level_no = _level_number(level)
    use_json = _use_json(fmt)
    shared_processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.add_logger_name,
            *shared_processors,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: tests and the CLI may configure more than once per process.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared_processors],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(use_json)],
    )
    _install_root_handler(formatter, level_no)


def _level_number(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level {level!r}: expected one of {sorted(LEVELS)}") from None


def _use_json(fmt: str) -> bool:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {FORMATS}")
    if fmt == "auto":
        return not sys.stdout.isatty()
    return fmt == "json"


def _renderer(use_json: bool):
    if use_json:
        return _JsonWithTraceback()
    return structlog.dev.ConsoleRenderer(exception_formatter=_console_traceback())


def _console_traceback():
    """Tracebacks without frame locals: a message being handled may carry an
    owner secret, which must never reach a log."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


class _JsonWithTraceback:
    """JSON lines; an exception becomes a structured ``exception`` field."""

    def __init__(self) -> None:
        # No frame locals: they are noisy and may hold secrets (URLs, tokens).
        self._tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger, method_name, event_dict):
        return self._json(logger, method_name, self._tracebacks(logger, method_name, event_dict))


class _CloraLogHandler(logging.StreamHandler):
    """Marks the handler this module installed, so a second call replaces it."""


def _install_root_handler(formatter: logging.Formatter, level_no: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _CloraLogHandler)]:
        root.removeHandler(handler)
    handler = _CloraLogHandler(sys.stdout)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level_no)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))
