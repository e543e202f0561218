"""``clora check SERVICE``: exit 0 when SERVICE has a live heartbeat, 1 otherwise.

Finds Redis like every ``clora`` command (``shared.client.find_redis_url``):
``--redis-url``, ``REDIS_URL``, else the address ``clora up`` wrote to its data
dir. With ``REDIS_URL`` or ``--redis-url`` (a container healthcheck) it looks
for this host's instance (consumer names ``<service>-<hostname>-<pid>``, or
exactly ``CLORA_CONSUMER_NAME`` when set), so a container checks its own
process; on a ``clora up`` cluster found through its data dir, for any
instance of that cluster. ``--any``: any instance anywhere; ``--consumer
NAME``: exactly that one.

Credentials: a container's own (``REDIS_URL``'s ``user:password@``, or
``CLORA_REDIS_USERNAME`` with ``CLORA_REDIS_PASSWORD_FILE`` /
``CLORA_REDIS_PASSWORD``: the ``service`` role reads heartbeats); on a
``clora up`` cluster, the ``admin`` password it wrote to its data dir.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import redis

from shared.acl import AclError, connection_options, glob_escape
from shared.client import REDIS_URL_FILE, ClientError, cluster_credentials, find_prefix, find_redis_url
from shared.config import BaseConfig, ConfigError, load_config
from shared.runtime import decode_heartbeat, heartbeat_key, redact_url

REDIS_TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    args, config_flags = _parser().parse_known_args(argv)
    try:
        config = load_config(BaseConfig, config_flags)
    except ConfigError as exc:
        print(f"clora check: {exc}", file=sys.stderr)
        return 2
    if not config.redis_url:
        local = _local_cluster(config, config_flags)
        if local is None:
            print(f"{args.service}: not alive: REDIS_URL is not set and no `clora up` address in "
                  f"{Path(config.data_dir) / REDIS_URL_FILE}", file=sys.stderr)
            return 1
        config.redis_url, config.stream_prefix = local
        args.any = args.any or not (args.consumer or config.consumer_name)
    pattern, described = _key_pattern(args, config)
    try:
        live = _live_heartbeats(config.redis_url, pattern, _credentials(config))
    except AclError as exc:
        print(f"{args.service}: not alive: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"{args.service}: not alive: cannot reach Redis at {redact_url(config.redis_url)}: {exc}",
              file=sys.stderr)
        return 1
    if not live:
        print(f"{args.service}: not alive: no heartbeat for {described} under prefix {config.stream_prefix!r}",
              file=sys.stderr)
        return 1
    print("; ".join(_describe(value) for value in live))
    return 0


def _local_cluster(config: BaseConfig, config_flags: list[str]) -> tuple[str, str] | None:
    """(url, prefix) of the ``clora up`` cluster of ``config.data_dir``, if one runs."""
    try:
        url = find_redis_url(None, config.data_dir)
    except ClientError:
        return None
    prefix_given = "CLORA_STREAM_PREFIX" in os.environ or any(f.startswith("--stream-prefix") for f in config_flags)
    return url, config.stream_prefix if prefix_given else find_prefix(None, config.data_dir)


def _credentials(config: BaseConfig) -> dict[str, str]:
    """A ``clora up`` cluster's admin password, else the container's own credentials."""
    return (cluster_credentials(config.redis_url, "admin", config.data_dir)
            or connection_options(config.redis_url, config.redis_username, config.redis_password_file))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clora check", allow_abbrev=False,
        description="Exit 0 when SERVICE has a live heartbeat (for healthchecks); other flags are config flags.",
    )
    parser.add_argument("service", help="scheduler | rollout | reward | trainer")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--consumer", help="exact consumer name to check")
    which.add_argument("--any", action="store_true", help="any live instance of SERVICE, on any host")
    return parser


def _key_pattern(args: argparse.Namespace, config: BaseConfig) -> tuple[str, str]:
    """The heartbeat key (glob) pattern to look for, and how to say it."""
    prefix = glob_escape(config.stream_prefix)
    service = glob_escape(args.service)
    exact = args.consumer or (None if args.any else config.consumer_name)
    if exact:
        return heartbeat_key(prefix, service, glob_escape(exact)), f"consumer {exact!r}"
    if args.any:
        return heartbeat_key(prefix, service, "*"), f"any {args.service!r} instance"
    host_prefix = f"{args.service}-{socket.gethostname()}-"
    return heartbeat_key(prefix, service, glob_escape(host_prefix) + "*"), f"consumers {host_prefix}*"


def _live_heartbeats(redis_url: str, pattern: str, credentials: dict[str, str]) -> list[dict]:
    client = redis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                  **credentials)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    # A key can expire between SCAN and MGET: then it is not live.
    # bytes: the client does not decode responses (redis-py types them bytes | str)
    return [decode_heartbeat(value) for value in values if value is not None]  # type: ignore[arg-type]


def _describe(heartbeat: dict) -> str:
    up_s = time.time() - float(heartbeat.get("started_at", time.time()))
    return f"{heartbeat.get('consumer', '?')} alive (pid {heartbeat.get('pid', '?')}, up {up_s:.0f} s)"
