"""Client for external HTTP reward services.

Protocol: one ``POST`` per sample, ``Content-Type: application/json``, body::

    {
      "experiment_id": "add-lr3",        # the experiment (tenant) id
      "request_id": "add-lr3:s4",        # the rollout request the sample belongs to
      "prompt": "12+30=",                # the prompt text
      "answer": "42",                    # the prompt's reference answer, or null
      "completion": "42",                # the sampled completion text
      "sample_index": 3,                 # which sample of the prompt (0..n-1)
      "prompt_index": 2                  # which prompt of the request
    }

Reply ``200`` with a JSON object::

    {"reward": 1.0, "metrics": {"length": 2.0}, "correct": true}

``reward`` (number, required, finite), ``metrics`` (object of numbers,
optional), ``correct`` (bool, optional: the service's verdict, used for
accuracy). Anything else is a garbage reply.

Each attempt has a timeout (``RewardSpec.timeout_s``) covering connect, send
and the whole reply. Failures are classified: a refused connection, a broken
connection, a timeout, ``5xx``, ``408`` and ``429`` are retried with
exponential backoff up to ``RewardSpec.max_attempts`` attempts; other ``4xx``
(``3xx`` included: redirects are not followed, they could leave the allowlist)
and garbage replies fail at once. Only URLs on the reward service's allowlist
are called: same scheme, host and port as an allowlisted prefix, and a path
under its path. A reply is read up to ``MAX_REPLY_BYTES`` (undecoded: no
compressed reply can grow past the cap).

The transport is httpx2 (the maintained httpx line, already installed with
``huggingface_hub``): one ``AsyncClient`` per reward service, whose pool holds
at most ``max_connections`` connections (the service passes its scoring slots,
so a call holding a slot never waits for the pool) and keeps idle ones alive.
A kept-alive connection the server closed while it sat in the pool fails the
request before any reply; that one is sent again at once on a new connection,
within the same attempt. Environment proxies are ignored (``trust_env`` off):
the allowlist names the host that is called. Calls are coroutines, so a slow
service costs an open socket, never a thread, and cancelling a call stops it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx2 as httpx
import structlog

from services.reward.scoring import RewardError, check_reward_value
from shared.deployment import refusal_reason
from shared.messages import Completion, RewardSpec

log = structlog.get_logger(__name__)

MAX_REPLY_BYTES = 1 << 20
MAX_BACKOFF_S = 30.0
RETRYABLE_STATUSES = frozenset({408, 429})
DEFAULT_MAX_CONNECTIONS = 64
KEEPALIVE_EXPIRY_S = 5.0  # an idle pooled connection is closed after this
# identity: the cap counts the bytes that arrive, and nothing is decompressed
REQUEST_HEADERS = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}


@dataclass
class HttpReward:
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)
    correct: bool | None = None


# ---------------------------------------------------------------- protocol


def request_body(completion: Completion, prompt_index: int, sample_index: int) -> dict:
    """The documented JSON body for sample ``sample_index`` of prompt
    ``prompt_index`` of ``completion``."""
    result = completion.results[prompt_index]
    return {
        "experiment_id": completion.experiment_id,
        "request_id": completion.request_id,
        "prompt": result.prompt.text,
        "answer": result.prompt.answer,
        "completion": result.samples[sample_index].text,
        "sample_index": sample_index,
        "prompt_index": prompt_index,
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


class _StaleConnection(Exception):
    """The server closed the connection before replying (see the module doc)."""


async def _post_once(http: httpx.AsyncClient, url: str, data: bytes) -> tuple[int, bytes]:
    """POST ``data``; (status, body) with the body read up to ``MAX_REPLY_BYTES``."""
    try:
        async with http.stream("POST", url, content=data, headers=REQUEST_HEADERS) as response:
            return response.status_code, await _read_capped(response)
    except httpx.RemoteProtocolError as exc:
        raise _StaleConnection(str(exc)) from None


async def _read_capped(response: httpx.Response) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise RewardError(f"reply of {declared} bytes is larger than {MAX_REPLY_BYTES}")
    body = bytearray()
    async for chunk in response.aiter_raw():  # undecoded: a gzip bomb stays its own size
        body += chunk
        if len(body) > MAX_REPLY_BYTES:
            raise RewardError(f"reply is larger than {MAX_REPLY_BYTES} bytes")
    return bytes(body)


async def post_json(http: httpx.AsyncClient, url: str, payload: dict) -> tuple[int, bytes]:
    """POST ``payload`` as JSON; return (status, body). Transport problems
    raise a retryable ``RewardError``. No timeout here: the caller wraps it."""
    data = json.dumps(payload).encode("utf-8")
    netloc = urlsplit(url).netloc
    try:
        try:
            return await _post_once(http, url, data)
        except _StaleConnection as exc:
            log.debug("reward_http_stale_connection", url=url, error=str(exc))
            return await _post_once(http, url, data)
    except httpx.ConnectError as exc:
        raise RewardError(f"cannot connect to {netloc}: {exc}", retryable=True) from None
    except (httpx.TransportError, _StaleConnection) as exc:
        raise RewardError(f"connection to {netloc} broke: {exc or type(exc).__name__}", retryable=True) from None


# ---------------------------------------------------------------- client


class HttpRewardClient:
    """Calls allowlisted reward URLs with per-attempt timeouts and retries,
    over a pool of at most ``max_connections`` connections."""

    def __init__(self, allowlist: Sequence[str], backoff_s: float = 0.5,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.allowlist = list(allowlist)
        self.backoff_s = backoff_s
        self.max_connections = max_connections
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S)
        # timeout=None: each attempt's timeout covers the whole call (see _attempt)
        self._http = httpx.AsyncClient(limits=limits, timeout=None, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

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
            async with asyncio.timeout(timeout_s):
                status, reply = await post_json(self._http, url, body)
        except TimeoutError:
            raise RewardError(f"no reply within {timeout_s:g}s (timeout)", retryable=True) from None
        return parse_reply(status, reply)

