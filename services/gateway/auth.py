"""API keys: the gateway knows keys only by their SHA-256; a request's
``X-API-Key`` (what the Tinker SDK sends) names its owner. Owners are the
key's digest prefix, never the key itself."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

API_KEY_HEADER = "X-API-Key"
KEY_PREFIX = "tml-"  # the SDK refuses keys without it
OWNER_CHARS = 16


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The configured keys (hashed). ``owner_of(key)`` -> owner id or None."""

    def __init__(self, keys: list[str]) -> None:
        bad = [k for k in keys if not k.startswith(KEY_PREFIX) or len(k) < len(KEY_PREFIX) + 8]
        if bad:
            raise ValueError(f"{len(bad)} API key(s) do not start with {KEY_PREFIX!r} or are shorter than 12 "
                             "characters (the Tinker SDK sends only 'tml-' keys)")
        self._digests = {key_digest(k) for k in keys}

    @classmethod
    def load(cls, keys_file: str, keys_env: str) -> ApiKeys:
        keys = [k.strip() for k in keys_env.split(",") if k.strip()]
        if keys_file:
            lines = Path(keys_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(keys)

    def __len__(self) -> int:
        return len(self._digests)

    def owner_of(self, key: str | None) -> str | None:
        if not key:
            return None
        digest = key_digest(key)
        for known in self._digests:
            if hmac.compare_digest(known, digest):
                return known[:OWNER_CHARS]
        return None
