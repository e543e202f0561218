"""The user's owner secrets: one per experiment, kept in a file only the user can read.

``CloraClient.submit`` makes a secret (``secrets.token_urlsafe``) for each
experiment and sends it with the submission; ``cancel`` and ``push_prompts``
present it. The scheduler keeps only a salted hash, so this file is the one
place the secret lives: losing it leaves the experiment to operators
(``clora cancel --admin``).

Where: ``CLORA_OWNERS_FILE``, else ``$XDG_CONFIG_HOME/clora/owners.json``
(``~/.config/clora/owners.json``). The file is JSON
``{"version": 1, "secrets": {"<prefix><experiment id>": "<secret>"}}``, mode
0600 in a 0700 directory, rewritten whole (temp file, then rename) under an
exclusive lock, so two commands at once lose nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNERS_FILE_ENV = "CLORA_OWNERS_FILE"
FILE_VERSION = 1
SECRET_BYTES = 32  # token_urlsafe(32): 43 characters


class OwnerSecretsError(RuntimeError):
    """The owners file cannot be read or written; the text says which and why."""


def default_owners_path() -> Path:
    if os.environ.get(OWNERS_FILE_ENV):
        return Path(os.environ[OWNERS_FILE_ENV])
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "clora" / "owners.json"


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


class OwnerSecrets:
    """The secrets of the experiments this user submitted (``path`` None: the default file)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_owners_path()

    def get(self, prefix: str, experiment_id: str) -> str | None:
        if not self.path.exists():
            return None
        with self._locked():
            return self._read().get(prefix + experiment_id)

    def get_or_make(self, prefix: str, experiment_id: str) -> str:
        """The id's secret; a new one (kept before it is returned) when there is none."""
        with self._locked():
            kept = self._read()
            secret = kept.get(prefix + experiment_id)
            if secret is None:
                secret = kept[prefix + experiment_id] = new_secret()
                self._write(kept)
            return secret

    # ------------------------------------------------------------ the file

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OwnerSecretsError(f"cannot use the owners file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)  # closing releases the lock

    def _read(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise OwnerSecretsError(f"cannot read the owners file {self.path}: {exc.strerror or exc}") from None
        try:
            content = json.loads(text)
            kept = content["secrets"]
            if not isinstance(kept, dict) or not all(isinstance(v, str) for v in kept.values()):
                raise TypeError("'secrets' is not a map of strings")
        except (ValueError, KeyError, TypeError) as exc:
            # never overwrite what we cannot read: it may hold the only copy of a secret
            raise OwnerSecretsError(f"the owners file {self.path} is not readable as owner secrets ({exc}); "
                                    "fix or move it") from None
        return kept

    def _write(self, kept: dict[str, str]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump({"version": FILE_VERSION, "secrets": kept}, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)  # a stale temp file may have had other bits
            os.replace(temporary, self.path)
        except OSError as exc:
            raise OwnerSecretsError(f"cannot write the owners file {self.path}: {exc.strerror or exc}") from None
