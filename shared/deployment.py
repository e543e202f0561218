"""What a deployment can serve, published where clients can read it.

The scheduler writes one ``DeploymentInfo`` (msgpack) under
``<prefix>deployment`` when it starts, so a client (``CloraClient``,
``clora submit``) validates a spec with the same rules and the same limits
as the scheduler before sending anything. When the key is missing (no
scheduler has started yet) clients fall back to ``DeploymentInfo()``'s
defaults and say so.

The reward service's HTTP allow-list has two parts: ``http_allowlist`` below
(its configuration, ``CLORA_HTTP_ALLOWLIST``, fixed at start) and the Redis
set ``<prefix>reward_allowlist`` (URL prefixes an operator adds or removes
while the cluster runs: ``clora allowlist add|remove|list``). A URL is
allowed when it is under a prefix of either part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import msgspec

DEPLOYMENT_SCHEMA = 1
DEFAULT_PORTS = {"http": 80, "https": 443}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DeploymentInfo(msgspec.Struct, kw_only=True):
    """A deployment's description. Field names are those of the scheduler's
    config (``shared.config.SchedulerConfig``) they come from; unknown fields
    are ignored when read, so a newer scheduler never breaks an older client."""

    schema: int = DEPLOYMENT_SCHEMA
    lora_rank: int = 8  # the largest lora_rank an experiment may use (the engines' slots have it)
    lora_alpha: float = 16.0  # an experiment's lora_alpha when its spec gives none
    # an experiment's lora_targets are a subset (all of them when its spec gives none)
    lora_targets: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    families: list[str] = []  # known task families; [] = this client's own list (shared.tasks)
    max_tokens_limit: int = 4096  # largest max_tokens
    max_model_len: int = 0  # the model's context in tokens; 0: unknown (max_tokens not checked against it)
    max_reward_timeout_s: float = 60.0  # RewardLimits
    max_reward_attempts: int = 5
    max_reward_budget_s: float = 120.0
    max_train_tokens: int = 1_000_000  # TrainBudget
    max_packed_row_tokens: int = 16_384
    http_allowlist: list[str] = []  # the reward service's configured URL prefixes
    adapter_dir: str = ""  # where versions live: <adapter_dir>/<experiment>/v<N> ("" = unknown)
    written_at: float = 0.0  # unix s; 0 = defaults, nothing was read


_DECODER = msgspec.msgpack.Decoder(DeploymentInfo)
_ENCODER = msgspec.msgpack.Encoder()


def deployment_key(prefix: str) -> str:
    return f"{prefix}deployment"


def allowlist_key(prefix: str) -> str:
    """The Redis set of URL prefixes an operator allowed while running."""
    return f"{prefix}reward_allowlist"


def deployment_from_config(config: Any, families: list[str] | None = None) -> DeploymentInfo:
    """The description of a deployment run with ``config`` (a ``SchedulerConfig``;
    fields it lacks keep their defaults, e.g. ``http_allowlist``)."""
    import time

    defaults = DeploymentInfo()
    values = {name: getattr(config, name) for name in DeploymentInfo.__struct_fields__
              if name not in ("lora_targets", "families", "http_allowlist", "adapter_dir", "schema", "written_at")
              and hasattr(config, name)}
    targets = getattr(config, "lora_targets", ",".join(defaults.lora_targets))
    allowlist = getattr(config, "http_allowlist", "")
    if families is None:
        from shared.tasks import FAMILIES

        families = sorted(FAMILIES)
    return DeploymentInfo(
        **values,
        lora_targets=[t.strip() for t in targets.split(",") if t.strip()],
        families=list(families),
        http_allowlist=[u.strip() for u in allowlist.split(",") if u.strip()],
        adapter_dir=str(Path(config.adapter_dir).resolve()) if hasattr(config, "adapter_dir") else "",
        written_at=time.time(),
    )


def encode_deployment(info: DeploymentInfo) -> bytes:
    return _ENCODER.encode(info)


def decode_deployment(raw: bytes | None) -> DeploymentInfo | None:
    """None for a missing key; a present but unreadable one raises
    ``msgspec.DecodeError`` (a broken deployment must not pass silently)."""
    return None if raw is None else _DECODER.decode(raw)


def write_deployment(client, prefix: str, info: DeploymentInfo) -> None:
    """Sync (``redis.Redis``)."""
    client.set(deployment_key(prefix), encode_deployment(info))


def read_deployment(client, prefix: str) -> DeploymentInfo | None:
    """Sync (``redis.Redis``); None when no scheduler has written one."""
    return decode_deployment(client.get(deployment_key(prefix)))


async def write_deployment_async(client, prefix: str, info: DeploymentInfo) -> None:
    """Async (``redis.asyncio.Redis``)."""
    await client.set(deployment_key(prefix), encode_deployment(info))


async def read_deployment_async(client, prefix: str) -> DeploymentInfo | None:
    return decode_deployment(await client.get(deployment_key(prefix)))


def decode_allowlist(members) -> list[str]:
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)


def read_allowlist(client, prefix: str) -> list[str]:
    """Sync: the operator's runtime allow-list entries (not the configured ones)."""
    return decode_allowlist(client.smembers(allowlist_key(prefix)))


async def read_allowlist_async(client, prefix: str) -> list[str]:
    return decode_allowlist(await client.smembers(allowlist_key(prefix)))


async def check_lora_against_deployment_async(client, prefix: str, service: str, config: Any) -> None:
    """Raise ``shared.config.ConfigError`` when ``config``'s LoRA signature
    (rank, alpha, targets) differs from the one the scheduler published: the
    engines preallocate it and the trainer trains in it, so every service must
    agree. Nothing published yet (no scheduler has started): not checked."""
    from shared.config import LoraConfig, check_lora_agreement

    info = await read_deployment_async(client, prefix)
    if info is None:
        return
    published = LoraConfig(lora_rank=info.lora_rank, lora_alpha=info.lora_alpha,
                           lora_targets=",".join(info.lora_targets))
    check_lora_agreement({"scheduler": published, service: config})


# ---------------------------------------------------------------- allowlist


def parse_allowlist(text: str) -> list[str]:
    """``"http://a:1/score, https://b/"`` -> the list of prefixes."""
    return [item.strip() for item in text.split(",") if item.strip()]


def refusal_reason(url: str, allowlist: Sequence[str]) -> str | None:
    """None when ``url`` may be called, else why not."""
    try:
        target = urlsplit(url)  # raises ValueError for an unbalanced IPv6 bracket
        target.port  # noqa: B018 (raises ValueError for a malformed port)
    except ValueError as exc:
        return f"reward url {url!r} is not a valid URL ({exc})"
    if target.scheme not in DEFAULT_PORTS or not target.hostname:
        return f"reward url {url!r} is not an http(s) URL"
    if target.username or target.password:
        return f"reward url {url!r} must not carry credentials"
    if any(unquote(segment) in (".", "..") for segment in target.path.split("/")):
        # the HTTP client (and the server) would resolve them: "/score/../admin" is "/admin"
        return f"reward url {url!r} must not have '.' or '..' path segments"
    if not allowlist:
        return "http rewards are disabled: the reward service's allowlist (CLORA_HTTP_ALLOWLIST) is empty"
    if any(_under_prefix(target, urlsplit(prefix)) for prefix in allowlist):
        return None
    return f"reward url {url!r} is not on the reward service's allowlist {list(allowlist)}"


def _under_prefix(target: SplitResult, allowed: SplitResult) -> bool:
    try:
        allowed.port  # noqa: B018
    except ValueError:
        return False  # a malformed allowlist entry allows nothing
    if (target.scheme, target.hostname, port_of(target)) != (allowed.scheme, allowed.hostname, port_of(allowed)):
        return False
    base = allowed.path or "/"
    path = target.path or "/"
    # Match at a path-segment boundary: "/score" allows "/score/x", not "/scoreboard".
    return path == base or path.startswith(base if base.endswith("/") else base + "/")


def port_of(parts: SplitResult) -> int | None:
    return parts.port or DEFAULT_PORTS.get(parts.scheme)


__all__ = [
    "DeploymentInfo", "deployment_key", "allowlist_key", "deployment_from_config", "write_deployment",
    "read_deployment", "write_deployment_async", "read_deployment_async", "check_lora_against_deployment_async",
    "read_allowlist", "read_allowlist_async", "encode_deployment", "decode_deployment", "parse_allowlist",
    "refusal_reason",
]
