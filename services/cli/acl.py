"""``clora acl``: the deployment's Redis ACL users, for an operator of a
managed Redis (``clora up`` sets up its own embedded server by itself).

    clora acl --stream-prefix clora: --password-dir ./secrets           # print ACL SETUSER lines
    clora acl --stream-prefix clora: --password-dir ./secrets --apply   # run them on REDIS_URL
    clora acl --password-dir deploy/secrets --acl-file deploy/secrets/users.acl --container-readable
                                                                         # docker-compose.yml's secrets

``--password-dir`` holds one password file per role (``service``,
``client``, ``admin``); missing ones are generated (mode 0600). The printed
lines are ``redis-cli`` input (the passwords are in them: treat the output
as a secret); ``--acl-file`` writes the same users as a Redis ACL file
(passwords as SHA-256 hashes, plus a PING-only ``default`` user for
healthchecks); ``--apply`` runs them with the credentials of ``REDIS_URL`` /
``CLORA_REDIS_USERNAME`` (a user allowed to run ``ACL SETUSER``). The rules
of each role: ``shared.acl``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from shared.acl import ROLES, AclError, acl_file_text, connection_options, ensure_passwords, setuser_commands
from shared.config import DEFAULT_STREAM_PREFIX

PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_:.+~%@#>|*\-\[\]\\]+")


def redis_cli_line(arguments: list[str]) -> str:
    """One ``redis-cli`` command line; a token with spaces or other specials is single-quoted."""
    return " ".join(a if PLAIN_TOKEN.fullmatch(a) else f"'{a}'" for a in arguments)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clora acl", description="the Redis ACL users of a deployment")
    parser.add_argument("--stream-prefix", default=os.environ.get("CLORA_STREAM_PREFIX", DEFAULT_STREAM_PREFIX))
    parser.add_argument("--password-dir", required=True, help="one password file per role (made when missing)")
    parser.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated subset of {','.join(ROLES)}")
    parser.add_argument("--apply", action="store_true", help="run the commands on REDIS_URL instead of printing")
    parser.add_argument("--acl-file", help="write a Redis ACL file (aclfile) with these users instead of printing")
    parser.add_argument("--container-readable", action="store_true",
                        help="files 0644 in a 0700 directory: containers of another uid read them (compose secrets)")
    args = parser.parse_args(argv)
    roles = [r for r in args.roles.split(",") if r]
    try:
        file_mode = 0o644 if args.container_readable else 0o600
        passwords = ensure_passwords(args.password_dir, roles, file_mode)
        commands = setuser_commands(args.stream_prefix, passwords)
        if args.acl_file:
            write_acl_file(Path(args.acl_file), acl_file_text(args.stream_prefix, passwords), file_mode)
    except AclError as exc:
        print(f"clora acl: {exc}", file=sys.stderr)
        return 2
    if args.acl_file:
        print(f"clora acl: wrote {args.acl_file} (users {', '.join(passwords)}) and the passwords in "
              f"{args.password_dir}")
        return 0
    if not args.apply:
        print("\n".join(redis_cli_line(command) for command in commands))
        return 0
    return _apply(commands)


def write_acl_file(path: Path, text: str, file_mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(file_mode)


def _apply(commands: list[list[str]]) -> int:
    import redis

    url = os.environ.get("REDIS_URL", "")
    if not url:
        print("clora acl: --apply needs REDIS_URL", file=sys.stderr)
        return 2
    with redis.Redis.from_url(url, **connection_options(url)) as client:
        for command in commands:
            client.execute_command(*command)
            print(f"clora acl: user {command[2]} set")
    return 0
