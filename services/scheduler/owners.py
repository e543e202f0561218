"""Experiment owners: the secret a submission carries, kept only as a salted hash.

An experiment submitted with an ``owner_secret`` stores ``owner_hash``
(``scrypt$<salt hex>$<digest hex>``: scrypt over the secret with a random
16-byte salt of its own; memory-hard, because every client can read the
experiment record that holds it); its cancels and task pushes must present
the same secret, compared in constant time. Without a secret the
experiment has no owner: only the operators' stream ``admin`` can cancel it
or push to it.

The secret itself is never stored: the scheduler deletes the stream entry
that carried it once handled (``SchedulerService._forgetting``), and a message that cannot
be decoded is dead-lettered with the secret masked (``redacting_decoder``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from shared.bus import EntryRejected, StreamEntry, decode_message_entry
from shared.messages import ExperimentCancel, ExperimentSubmit, Message, TaskPush

SCHEME = "scrypt"
# scrypt cost: ~10 ms and 4 MiB a check here (pushes are checked on the scheduler's loop), and as
# much per guess for anyone trying secrets offline against a hash read from a record.
SCRYPT_N, SCRYPT_R, SCRYPT_P, DIGEST_BYTES = 2**12, 8, 1, 32
SALT_BYTES = 16
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
REDACTED = "<redacted>"
SECRET_FIELD = "owner_secret"
# the streams whose messages may carry an owner secret
SECRET_STREAMS = ("experiments", "tasks", "admin")

Owned = ExperimentSubmit | ExperimentCancel | TaskPush


def secret_problem(secret: str | None) -> str | None:
    """Why ``secret`` cannot be an owner secret; None when it can (or is None)."""
    if secret is None:
        return None
    if not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS:
        return (f"owner_secret: must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters "
                f"(it has {len(secret)}); use e.g. secrets.token_urlsafe(32)")
    return None


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """The stored form of ``secret``, with a fresh random salt unless given."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    return f"{SCHEME}${salt.hex()}${_digest(salt, secret)}"


def secret_matches(owner_hash: str | None, secret: str | None) -> bool:
    """Does ``secret`` open ``owner_hash``? False for a missing one on either side."""
    if owner_hash is None or secret is None or len(secret) > MAX_SECRET_CHARS:
        return False
    scheme, _, rest = owner_hash.partition("$")
    salt_hex, _, digest = rest.partition("$")
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    return scheme == SCHEME and hmac.compare_digest(_digest(salt, secret), digest)


def _digest(salt: bytes, secret: str) -> str:
    key = hashlib.scrypt(secret.encode("utf-8", errors="surrogatepass"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                         p=SCRYPT_P, dklen=DIGEST_BYTES)
    return key.hex()


def carries_secret(message: Message) -> bool:
    return isinstance(message, (ExperimentSubmit, ExperimentCancel, TaskPush)) and message.owner_secret is not None


# ---------------------------------------------------------------- dead letters without the secret


def redacting_decoder(entry: StreamEntry, max_entry_bytes: int) -> tuple[Message, bytes]:
    """``decode_message_entry``, but the payload a dead letter would keep has
    its ``owner_secret`` masked (or is dropped when it cannot be parsed and
    may hold one)."""
    try:
        message, _payload = decode_message_entry(entry, max_entry_bytes)
    except EntryRejected as rejected:
        raise EntryRejected(rejected.reason, redacted_payload(rejected.payload)) from None
    if carries_secret(message):
        owned: Owned = message  # type: ignore[assignment]
        return message, msgspec.msgpack.encode(msgspec.structs.replace(owned, owner_secret=REDACTED))
    return message, _payload


def redacted_payload(payload: bytes) -> bytes:
    """``payload`` with its ``owner_secret`` masked; b"" when it names the
    field but does not parse as a map (the secret could be anywhere in it)."""
    if SECRET_FIELD.encode() not in payload:
        return payload
    try:
        value = msgspec.msgpack.decode(payload)
    except Exception:  # hostile bytes: whatever the decoder raises, keep nothing of them
        return b""
    if not isinstance(value, dict):
        return b""
    if SECRET_FIELD in value:
        value[SECRET_FIELD] = REDACTED
    return msgspec.msgpack.encode(value)
