"""Example external HTTP reward service (``clora example-reward``).

Implements the protocol documented in ``services.reward.http_client``:
reward 1.0 when the completion contains the prompt's answer (0.0 otherwise
or without an answer), with the completion length as a metric. Standard
library only, so it runs anywhere (tests, docker compose).

    clora example-reward --host 0.0.0.0 --port 8088
"""

from __future__ import annotations

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

MAX_BODY_BYTES = 1 << 20
REQUIRED_FIELDS = {"experiment_id": str, "request_id": str, "prompt": str, "completion": str, "sample_index": int}

log = structlog.get_logger(__name__)


def score(body: dict) -> dict:
    """The reply for one valid request body."""
    answer = body.get("answer")
    completion = body["completion"]
    correct = bool(answer and answer.strip() in completion)
    return {"reward": float(correct), "correct": correct, "metrics": {"length": float(len(completion))}}


def validate(body: object) -> str | None:
    """None for a valid request body, else what is wrong with it."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name, kind in REQUIRED_FIELDS.items():
        if not isinstance(body.get(name), kind):
            return f"field {name!r} must be a {kind.__name__}"
    if body.get("answer") is not None and not isinstance(body["answer"], str):
        return "field 'answer' must be a string or null"
    return None


class RewardHandler(BaseHTTPRequestHandler):
    server_version = "clora-example-reward/1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY_BYTES:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be 1..{MAX_BODY_BYTES}"})
            return
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
            return
        problem = validate(body)
        if problem:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": problem})
            return
        self._reply(HTTPStatus.OK, score(body))

    def do_GET(self) -> None:  # noqa: N802
        self._reply(HTTPStatus.OK, {"status": "ok"})  # health check for compose

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("example_reward_request", line=format % args)


def make_server(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound server (port 0: a free port, see ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), RewardHandler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    from shared.config import ExampleRewardConfig, load_config
    from shared.logging import configure_logging

    config = load_config(ExampleRewardConfig, argv)
    configure_logging("info")
    server = make_server(config.host, config.port)
    host, port = server.server_address[:2]
    # typeshed types the host as str | bytes; an AF_INET server's is a str
    log.info("example_reward_listening", url=f"http://{host}:{port}/")  # type: ignore[str-bytes-safe]
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("example_reward_stopping")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
