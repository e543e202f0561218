"""Client for external HTTP reward services.

Protocol: one ``POST`` per sample, ``Content-Type: application/json``, body::

    {
      "experiment_id": "add-lr3",        # the experiment (tenant) id
      "request_id": "add-lr3:s4:p2",     # the rollout request the sample belongs to
      "prompt": "12+30=",                # the prompt text
      "answer": "42",                    # the prompt's reference answer, or null
      "completion": "42",                # the sampled completion text
      "sample_index": 3                  # which sample of the request (0..n-1)
    }

Reply ``200`` with a JSON object::

    {"reward": 1.0, "metrics": {"length": 2.0}, "correct": true}

``reward`` (number, required, finite), ``metrics`` (object of numbers,
optional), ``correct`` (bool, optional: the service's verdict, used for
accuracy). Anything else is a garbage reply.

Each call has a timeout (``RewardSpec.timeout_s``). Failures are classified:
a refused connection, a timeout, ``5xx``, ``408`` and ``429`` are retried with
exponential backoff up to ``RewardSpec.max_attempts`` attempts; other ``4xx``
and garbage replies fail at once. Redirects are not followed (they could leave
the allowlist). Only URLs on the reward service's allowlist are called: same
scheme, host and port as an allowlisted prefix, and a path under its path.

The client speaks HTTP/1.1 over asyncio streams (``Connection: close``), so a
slow service costs an open socket, never a thread, and cancelling a call
really stops it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

import structlog

from services.reward.scoring import RewardError, check_reward_value
from shared.deployment import port_of, refusal_reason
from shared.messages import Completion, RewardSpec

log = structlog.get_logger(__name__)

MAX_REPLY_BYTES = 1 << 20
MAX_HEADER_LINES = 100
MAX_BACKOFF_S = 30.0
RETRYABLE_STATUSES = frozenset({408, 429})


@dataclass
class HttpReward:
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)
    correct: bool | None = None



# ---------------------------------------------------------------- protocol


def request_body(completion: Completion, sample_index: int) -> dict:
    """The documented JSON body for one sample of ``completion``."""
    return {
        "experiment_id": completion.experiment_id,
        "request_id": completion.request_id,
        "prompt": completion.prompt.text,
        "answer": completion.prompt.answer,
        "completion": completion.samples[sample_index].text,
        "sample_index": sample_index,
    }


def parse_reply(status: int, body: bytes) -> HttpReward:
    """Validate a reply; raise ``RewardError`` (retryable for 5xx/408/429)."""
    if status != 200:
        retryable = status >= 500 or status in RETRYABLE_STATUSES
        raise RewardError(f"HTTP {status}: {_snippet(body)}", retryable=retryable)
    try:
        reply = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise RewardError(f"reply is not JSON: {_snippet(body)}") from None
    if not isinstance(reply, dict) or "reward" not in reply:
        raise RewardError(f"reply has no 'reward' field: {_snippet(body)}")
    reward = check_reward_value(reply["reward"])
    return HttpReward(reward=reward, metrics=_parse_metrics(reply.get("metrics")),
                      correct=_parse_correct(reply.get("correct")))


def _parse_metrics(metrics: object) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise RewardError(f"reply 'metrics' must be an object, got {type(metrics).__name__}")
    try:
        return {str(name): check_reward_value(value) for name, value in metrics.items()}
    except RewardError as exc:
        raise RewardError(f"reply 'metrics': {exc.reason}") from None


def _parse_correct(correct: object) -> bool | None:
    if correct is None or isinstance(correct, bool):
        return correct
    raise RewardError(f"reply 'correct' must be a bool, got {type(correct).__name__}")


def _snippet(body: bytes, limit: int = 120) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(body) > limit else ""))


# ---------------------------------------------------------------- transport


async def post_json(url: str, payload: dict) -> tuple[int, bytes]:
    """POST ``payload`` as JSON; return (status, body). Connection problems
    raise a retryable ``RewardError``. No timeout here: the caller wraps it."""
    parts = urlsplit(url)
    data = json.dumps(payload).encode("utf-8")
    try:
        reader, writer = await asyncio.open_connection(
            parts.hostname, port_of(parts), ssl=ssl.create_default_context() if parts.scheme == "https" else None,
        )
    except OSError as exc:
        raise RewardError(f"cannot connect to {parts.netloc}: {exc.strerror or exc}", retryable=True) from None
    try:
        writer.write(_request_head(parts, len(data)) + data)
        await writer.drain()
        return await _read_response(reader)
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise RewardError(f"connection to {parts.netloc} broke: {exc}", retryable=True) from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError as exc:  # the peer already went away; nothing left to release
            log.debug("reward_http_close_failed", error=str(exc))


def _request_head(parts: SplitResult, content_length: int) -> bytes:
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    fields = status_line.decode("latin-1").split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise RewardError(f"not an HTTP reply: {_snippet(status_line)}")
    headers = await _read_headers(reader)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return int(fields[1]), await _read_chunked(reader)
    if "content-length" in headers:
        length = _header_int(headers["content-length"])
        if length > MAX_REPLY_BYTES:
            raise RewardError(f"reply of {length} bytes is larger than {MAX_REPLY_BYTES}")
        return int(fields[1]), await reader.readexactly(length)
    body = await reader.read(MAX_REPLY_BYTES + 1)
    if len(body) > MAX_REPLY_BYTES:
        raise RewardError(f"reply is larger than {MAX_REPLY_BYTES} bytes")
    return int(fields[1]), body


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            return headers
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    raise RewardError(f"reply has more than {MAX_HEADER_LINES} header lines")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = _header_int((await reader.readline()).split(b";")[0].strip() or b"x", base=16)
        if size == 0:
            return bytes(body)
        if len(body) + size > MAX_REPLY_BYTES:
            raise RewardError(f"reply is larger than {MAX_REPLY_BYTES} bytes")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


def _header_int(raw: str | bytes, base: int = 10) -> int:
    try:
        value = int(raw, base)
    except ValueError:
        raise RewardError(f"malformed HTTP length {raw!r}") from None
    if value < 0:
        raise RewardError(f"malformed HTTP length {raw!r}")
    return value


# ---------------------------------------------------------------- client


class HttpRewardClient:
    """Calls allowlisted reward URLs with per-call timeouts and retries."""

    def __init__(self, allowlist: Sequence[str], backoff_s: float = 0.5) -> None:
        self.allowlist = list(allowlist)
        self.backoff_s = backoff_s

    async def score(self, spec: RewardSpec, body: dict) -> HttpReward:
        """One sample's reward; raises ``RewardError`` with the final reason."""
        url = spec.url or ""
        refused = refusal_reason(url, self.allowlist)
        if refused:
            raise RewardError(refused)
        attempts = max(1, spec.max_attempts)
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(url, body, spec.timeout_s)
            except RewardError as exc:
                if not exc.retryable or attempt == attempts:
                    raise RewardError(f"{url}: {exc.reason} (attempt {attempt} of {attempts})") from None
                log.info("reward_http_retry", url=url, attempt=attempt, reason=exc.reason)
                await asyncio.sleep(min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(self, url: str, body: dict, timeout_s: float) -> HttpReward:
        try:
            status, reply = await asyncio.wait_for(post_json(url, body), timeout_s)
        except TimeoutError:
            raise RewardError(f"no reply within {timeout_s:g}s (timeout)", retryable=True) from None
        return parse_reply(status, reply)
