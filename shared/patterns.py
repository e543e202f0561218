"""User-supplied regular expressions, run in linear time.

Python's ``re`` backtracks, and it holds the GIL while it does, even inside a
thread: one catastrophic pattern from one tenant would freeze every tenant's
scoring. Every pattern that comes from a user is compiled here, with RE2
(no backreferences, no lookaround; matching time linear in the text). The
scheduler compiles it on submission, so a pattern RE2 cannot take is refused
with the reason before the experiment starts.
"""

from __future__ import annotations

import functools

import re2

MAX_PATTERN_CHARS = 1000


class PatternError(ValueError):
    """A pattern that cannot be used; the text says why."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the reason goes into PatternError, not to stderr
    return options


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re2._Regexp:
    """``pattern`` compiled for linear-time matching; raises ``PatternError``."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"longer than {MAX_PATTERN_CHARS} characters ({len(pattern)})")
    try:
        return re2.compile(pattern, options=_options())
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise PatternError(f"not supported by the linear-time matcher (RE2): {detail}") from None
