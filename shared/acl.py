"""Who may do what in Redis: the deployment's ACL roles, their passwords,
and how a process finds its credentials.

Three roles, each a Redis ACL user whose rules cover one key prefix (the
deployment's ``stream_prefix``, glob-escaped):

- ``service`` (the four services): the commands the services run, on the
  key families of the deployment's layout only (every stream of
  ``shared.messages.STREAM_KINDS`` and ``dead_letters``, ``exp:*``,
  ``exp_index`` / ``exp_active`` / ``exp_queue``, ``scheduler_lease``,
  ``heartbeat:*``, ``deployment``) and the allow-list read-only. No
  FLUSHALL/FLUSHDB, CONFIG, DEBUG, KEYS, ACL, SHUTDOWN, nothing outside the prefix.
- ``client`` (``CloraClient`` and the user's ``clora`` commands): XADD on
  ``experiments`` and ``tasks`` only (no read of them); XREAD / XRANGE /
  XREVRANGE / XINFO on ``events``, ``metrics``, ``adapters``; the experiment
  records the client reads (``exp:<id>`` hashes, ``exp:<id>:metrics``
  lists, ``exp_index``, ``deployment``, ``reward_allowlist``) and the
  rollout and trainer heartbeats (``heartbeat:rollout:*``,
  ``heartbeat:trainer:*``: counters and which tenants share decode steps,
  for ``clora dashboard``), read-only.
  ``exp:<id>`` is matched by one pattern per id length made of the id's
  character class (``[-_a-z0-9]`` repeated), never by ``exp:*``: that glob
  would also match ``exp:<id>:s<step>`` (another tenant's prompts and
  answers), ``:e<version>`` and ``:tasks``.
- ``admin`` (operators; ``clora allowlist``, ``clora check`` on a local
  cluster): the client's rights, plus read of every key under the prefix
  (dead letters, heartbeats, step data), writes of ``reward_allowlist``,
  XADD on the operators' stream ``admin`` (cancel or push any experiment), and
  purge (DEL / UNLINK / XTRIM / XDEL / EXPIRE under the prefix). No write
  command on any other key.

``setuser_commands`` gives the ``ACL SETUSER`` commands for an operator of a
managed Redis (``clora acl`` prints them); ``acl_file_text`` the same rules
as an ACL file, with password hashes, which ``clora up`` gives its embedded
server (``default`` user: PING only).

Credentials come from the environment (``REDIS_URL`` may carry
``user:password@``; else ``CLORA_REDIS_USERNAME`` with
``CLORA_REDIS_PASSWORD`` or ``CLORA_REDIS_PASSWORD_FILE``), or, for a
``clora up`` cluster, from the password files it wrote under
``<data dir>/credentials/<role>`` (mode 0600). Never from a message.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ROLES = ("service", "client", "admin")
CREDENTIALS_DIR = "credentials"  # under a `clora up` data dir: one password file per role
PASSWORD_BYTES = 32
GLOB_SPECIAL = "\\*?[]"
ID_CHAR_GLOB = "[-_a-z0-9]"  # shared.messages.EXPERIMENT_ID_PATTERN's characters ('-' first: not a range)
MAX_ID_LENGTH = 64  # shared.messages.EXPERIMENT_ID_PATTERN: 1 + {0,63}
USERNAME_ENV = "CLORA_REDIS_USERNAME"
PASSWORD_ENV = "CLORA_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "CLORA_REDIS_PASSWORD_FILE"

SERVICE_COMMANDS = (
    "ping", "client|setinfo", "multi", "exec", "discard", "watch", "unwatch",
    "xadd", "xread", "xreadgroup", "xack", "xautoclaim", "xclaim", "xpending", "xgroup|create",
    "xgroup|destroy", "xgroup|delconsumer", "xrange", "xrevrange", "xlen", "xinfo", "xdel",
    "get", "set", "mget", "del", "exists", "expire", "pexpire", "persist", "scan", "eval", "evalsha",
    "hset", "hget", "hmget", "hgetall", "hdel", "hincrby", "rpush", "lrange", "llen",
    "sadd", "srem", "smembers", "zadd", "zrem", "zrange",
)
CLIENT_COMMANDS = (
    "ping", "client|setinfo", "xadd", "xread", "xrange", "xrevrange", "xinfo",
    "hgetall", "zrange", "lrange", "get", "smembers",
)
CLIENT_HEARTBEATS = ("rollout", "trainer")  # whose heartbeats a client may read (no secrets, no specs)
ADMIN_READ_COMMANDS = (
    "scan", "type", "ttl", "exists", "get", "mget", "hgetall", "hget", "lrange", "llen", "smembers", "zrange",
    "xrange", "xrevrange", "xread", "xlen", "xinfo", "xpending",
)
ADMIN_PURGE_COMMANDS = ("del", "unlink", "xtrim", "xdel", "expire")
ADMIN_ALLOWLIST_COMMANDS = ("sadd", "srem")


class AclError(ValueError):
    pass


# ---------------------------------------------------------------- rules


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis glob (key patterns, SCAN MATCH)."""
    return "".join("\\" + ch if ch in GLOB_SPECIAL else ch for ch in text)


def _checked_prefix(prefix: str) -> str:
    if not prefix or any(ch.isspace() or ch in "\"'()" for ch in prefix):
        raise AclError(f"stream prefix {prefix!r} cannot be an ACL key pattern: it must be non-empty, "
                       "without spaces, quotes or parentheses")
    return glob_escape(prefix)


def experiment_record_patterns(prefix: str, suffix: str = "") -> list[str]:
    """Globs matching ``<prefix>exp:<id><suffix>`` for every valid id and no
    other key: one per id length (a glob cannot repeat a character class)."""
    escaped = _checked_prefix(prefix)
    return [f"{escaped}exp:{ID_CHAR_GLOB * length}{suffix}" for length in range(1, MAX_ID_LENGTH + 1)]


def service_key_patterns(prefix: str) -> list[str]:
    """Every key family of the deployment's layout (read and write)."""
    from shared.bus import DEAD_LETTER_STREAM, SUFFIXED_STREAMS
    from shared.messages import STREAM_KINDS

    escaped = _checked_prefix(prefix)
    streams = [f"{name}:*" if name in SUFFIXED_STREAMS else name for name in STREAM_KINDS]
    keys = [*streams, DEAD_LETTER_STREAM, "exp:*", "exp_index", "exp_active", "exp_queue", "scheduler_lease",
            "heartbeat:*", "deployment", "gateway:*"]
    return [escaped + key for key in keys]


def _commands(commands: tuple[str, ...]) -> list[str]:
    return ["-@all", *(f"+{command}" for command in commands)]


def _selector(rules: list[str]) -> str:
    return "(" + " ".join(rules) + ")"


def role_rules(role: str, prefix: str) -> list[str]:
    """The ACL rules of ``role`` on ``prefix`` (after ``reset``; without the
    user's name, ``on`` and password)."""
    escaped = _checked_prefix(prefix)
    if role == "service":
        return [*_commands(SERVICE_COMMANDS), *(f"~{p}" for p in service_key_patterns(prefix)),
                f"%R~{escaped}reward_allowlist"]
    if role == "client":
        return _client_rules(prefix)
    if role == "admin":
        return [*_client_rules(prefix),
                _selector([*_commands(ADMIN_READ_COMMANDS), f"%R~{escaped}*"]),
                _selector([*_commands(ADMIN_PURGE_COMMANDS), f"~{escaped}*"]),
                _selector([*_commands(ADMIN_ALLOWLIST_COMMANDS + ("smembers",)), f"~{escaped}reward_allowlist"]),
                _selector(["-@all", "+xadd", f"%W~{escaped}admin"])]  # operators' cancels and pushes
    raise AclError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def _client_rules(prefix: str) -> list[str]:
    escaped = _checked_prefix(prefix)
    writes = [f"%W~{escaped}{stream}" for stream in ("experiments", "tasks")]
    reads = [f"%R~{escaped}{key}" for key in ("events", "metrics", "adapters", "exp_index", "deployment",
                                                "reward_allowlist")]
    records = [f"%R~{p}" for p in experiment_record_patterns(prefix) + experiment_record_patterns(prefix, ":metrics")]
    # the engine's and the trainer's heartbeats (counters, tenant pairs sharing decode steps: `clora dashboard`)
    heartbeats = [f"%R~{escaped}heartbeat:{service}:*" for service in CLIENT_HEARTBEATS]
    return [*_commands(CLIENT_COMMANDS), *writes, *reads, *records, *heartbeats]


def default_user_rules() -> list[str]:
    """The ``default`` (unauthenticated) user of our embedded server: PING
    only (its readiness probe), no key, no other command."""
    return ["reset", "on", "nopass", "-@all", "+ping"]


def setuser_commands(prefix: str, passwords: Mapping[str, str],
                     usernames: Mapping[str, str] | None = None) -> list[list[str]]:
    """``ACL SETUSER`` argument lists for each role in ``passwords`` (role ->
    password); ``usernames`` maps a role to its user name (default: the role)."""
    usernames = usernames or {}
    return [["ACL", "SETUSER", usernames.get(role, role), "reset", "on", f">{password}", *role_rules(role, prefix)]
            for role, password in passwords.items()]


def acl_file_text(prefix: str, passwords: Mapping[str, str]) -> str:
    """An ACL file (``aclfile``) with the roles of ``passwords`` (stored as
    SHA-256 hashes) and a PING-only ``default`` user."""
    lines = ["user default " + " ".join(default_user_rules()[1:])]
    for role, password in passwords.items():
        digest = hashlib.sha256(password.encode()).hexdigest()
        lines.append(" ".join(["user", role, "on", f"#{digest}", *role_rules(role, prefix)]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- password files


def credentials_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / CREDENTIALS_DIR


def password_file(data_dir: str | Path, role: str) -> Path:
    return credentials_dir(data_dir) / role


def ensure_passwords(directory: str | Path, roles: Iterable[str] = ROLES, file_mode: int = 0o600) -> dict[str, str]:
    """Each role's password from ``directory/<role>``, generated once when
    missing (directory 0700, files ``file_mode``) and kept across restarts.
    (0644 for files that containers of another uid read through a bind
    mount: the 0700 directory still keeps other host users out.)"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    passwords = {}
    for role in roles:
        if role not in ROLES:
            raise AclError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        path = directory / role
        if not path.is_file() or not path.read_text().strip():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(PASSWORD_BYTES) + "\n")
        path.chmod(file_mode)
        passwords[role] = path.read_text().strip()
    return passwords


def read_password_file(path: str | Path) -> str:
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise AclError(f"cannot read the Redis password file {path}: {exc.strerror}") from None
    if not password:
        raise AclError(f"the Redis password file {path} is empty")
    return password


# ---------------------------------------------------------------- finding credentials


def url_has_credentials(redis_url: str) -> bool:
    parts = urlsplit(redis_url)
    return bool(parts.username or parts.password)


def with_credentials(redis_url: str, username: str | None = None, password: str | None = None) -> str:
    """``redis_url`` carrying ``username:password@`` (unchanged without a password)."""
    if not password:
        return redis_url
    parts = urlsplit(redis_url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = f"{quote(username or '', safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def credentials_from_env(username: str = "", password_file_path: str = "",
                         environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``username`` / ``password`` options for redis-py from the arguments or
    ``CLORA_REDIS_USERNAME`` / ``CLORA_REDIS_PASSWORD_FILE`` /
    ``CLORA_REDIS_PASSWORD`` (a password file wins over the variable); {}
    when none is set."""
    environ = os.environ if environ is None else environ
    username = username or environ.get(USERNAME_ENV, "")
    password_file_path = password_file_path or environ.get(PASSWORD_FILE_ENV, "")
    password = read_password_file(password_file_path) if password_file_path else environ.get(PASSWORD_ENV, "")
    options = {}
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    return options


def connection_options(redis_url: str, username: str = "", password_file_path: str = "",
                       environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What to add to ``Redis.from_url(redis_url, ...)``: nothing when the URL
    carries its own credentials (it wins), else ``credentials_from_env``."""
    if url_has_credentials(redis_url):
        return {}
    return credentials_from_env(username, password_file_path, environ)


__all__ = [
    "ROLES", "AclError", "glob_escape", "role_rules", "service_key_patterns", "experiment_record_patterns",
    "default_user_rules", "setuser_commands", "acl_file_text", "ensure_passwords", "password_file", "credentials_dir",
    "read_password_file", "with_credentials", "credentials_from_env", "connection_options", "url_has_credentials",
]
