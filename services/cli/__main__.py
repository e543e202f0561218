"""The ``clora`` command: one subcommand per service plus the user commands.

Each subcommand lives in its own module and is imported only when used, so
``clora check`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). The function takes argv.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "scheduler": ("services.scheduler.__main__", "main", "run the scheduler service"),
    "rollout": ("services.rollout.__main__", "main", "run the rollout (generation) service"),
    "reward": ("services.reward.__main__", "main", "run the reward service"),
    "trainer": ("services.trainer.__main__", "main", "run the trainer service"),
    "gateway": ("services.gateway.__main__", "main", "run the Tinker-compatible HTTP gateway"),
    "example-reward": ("services.reward.example_http", "main", "run the example external HTTP reward service"),
    "check": ("services.cli.check", "main", "exit 0 when SERVICE is alive (for healthchecks)"),
    "up": ("services.cli.local", "up", "start Redis (embedded unless REDIS_URL) and all four services"),
    "demo": ("services.cli.local", "demo", "run four experiments concurrently on the tiny model"),
    "submit": ("services.cli.experiments", "submit", "submit an experiment spec (YAML or JSON)"),
    "status": ("services.cli.experiments", "status", "list experiments and their state"),
    "watch": ("services.cli.experiments", "watch", "live progress of an experiment"),
    "cancel": ("services.cli.experiments", "cancel", "cancel an experiment (yours; any with --admin)"),
    "push": ("services.cli.experiments", "push", "push prompts (JSON / JSON lines) to a streamed experiment"),
    "env": ("services.cli.experiments", "env", "print `export REDIS_URL=...` for the Redis every command uses"),
    "allowlist": ("services.cli.experiments", "allowlist", "list | add URL | remove URL: HTTP reward allow-list"),
    "acl": ("services.cli.acl", "main", "print (or --apply) the Redis ACL users of a deployment"),
    "sink": ("services.sink.__main__", "main", "write experiment curves to TensorBoard / MLflow / W&B"),
    "dashboard": ("services.cli.dashboard", "main", "serve a live dashboard of every experiment on localhost"),
}


def usage() -> str:
    lines = ["usage: clora COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<15} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"clora: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[argv[0]]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
