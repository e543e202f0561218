"""One typed config per service, filled from defaults, then environment
variables, then CLI flags (last wins).

Every field ``foo_bar`` of a config reads the environment variable
``CLORA_FOO_BAR`` and the flag ``--foo-bar``; the one exception is
``redis_url``, which reads ``REDIS_URL``. An empty ``redis_url`` means: start
the embedded server (see ``shared.redis_server``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from shared.engine import LoraSignature

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parent / "models" / "clora-tiny")


class ConfigError(ValueError):
    pass


@dataclass
class BaseConfig:
    redis_url: str = ""
    stream_prefix: str = "clora:"
    stream_maxlen: int = 100_000
    data_dir: str = ".clora"  # embedded Redis data, adapters, checkpoints
    consumer_name: str = ""  # default: <service>-<hostname>-<pid>
    max_deliveries: int = 5
    reclaim_idle_s: float = 30.0
    drain_timeout_s: float = 20.0
    heartbeat_ttl_s: float = 10.0
    max_entry_bytes: int = 16 * 1024 * 1024  # larger stream entries are dead-lettered unread
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console

    @property
    def adapter_dir(self) -> Path:
        return Path(self.data_dir) / "adapters"


@dataclass
class LoraConfig:
    """The deployment's LoRA signature (all live adapters share it)."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    @property
    def signature(self) -> LoraSignature:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSignature(rank=self.lora_rank, alpha=self.lora_alpha, target_modules=targets)


@dataclass
class RewardLimits:
    """What one experiment's reward may cost the shared reward service; the
    scheduler refuses specs over them, the reward service enforces them."""

    max_reward_timeout_s: float = 60.0  # largest reward.timeout_s
    max_reward_attempts: int = 5  # largest reward.max_attempts
    max_reward_budget_s: float = 120.0  # largest reward.timeout_s x reward.max_attempts


@dataclass
class TrainBudget:
    """What one train job may cost the trainer; the scheduler refuses specs
    over it, the trainer refuses jobs over it."""

    max_train_tokens: int = 1_000_000  # prompt + completion tokens of one train job
    max_packed_row_tokens: int = 16_384  # one group packed behind its prompt (attention mask ~ its square)


@dataclass
class SchedulerConfig(BaseConfig, LoraConfig, RewardLimits, TrainBudget):
    max_concurrent: int = 8
    num_trainer_shards: int = 1
    train_queue_depth: int = 2  # outstanding train jobs per shard
    stall_timeout_s: float = 300.0  # re-publish a step's missing work after this long
    max_tokens_limit: int = 4096  # largest max_tokens an experiment may ask for
    lease_ttl_s: float = 30.0  # one scheduler at a time: a standby takes over this long after the leader died
    model_dir: str = DEFAULT_MODEL_DIR  # for the tokenizer-free checks only
    ended_ttl_s: float = 7 * 24 * 3600.0  # an ended experiment's step data expires after this; its summary stays
    http_allowlist: str = ""  # the reward service's configured URL prefixes (same CLORA_HTTP_ALLOWLIST): refused at submit otherwise


@dataclass
class RolloutConfig(BaseConfig, LoraConfig):
    engine: str = "torch"  # torch | vllm
    model_dir: str = DEFAULT_MODEL_DIR
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (fp32 on cpu, bf16 on cuda) | float32 | bfloat16
    max_rows: int = 256  # rows decoding at once
    max_loras: int = 32  # adapter slots: >= adapter_keep_versions x live tenants, or versions churn
    max_cpu_loras: int = 64  # vllm only
    gpu_memory_utilization: float = 0.85  # vllm only
    max_model_len: int = 0  # vllm only; 0: the model's max_position_embeddings
    cpu_kv_cache_gib: float = 1.0  # vllm on CPU: KV-cache size (never a share of system RAM)
    torch_threads: int = 1  # intra-op threads for model work (0: torch default); services share the cores
    typical_group_size: int = 8  # request concurrency = max_rows // typical_group_size (backpressure)
    adapter_keep_versions: int = 2  # newest versions kept per tenant; >= max_off_policy_steps + 1


@dataclass
class RewardConfig(BaseConfig, RewardLimits):
    http_allowlist: str = ""  # comma-separated URL prefixes allowed for http rewards
    max_inflight: int = 64
    max_inflight_per_experiment: int = 16  # scoring slots one experiment may hold; a slow reward slows only itself
    retry_backoff_s: float = 0.5


@dataclass
class TrainerConfig(BaseConfig, LoraConfig, TrainBudget):
    model_dir: str = DEFAULT_MODEL_DIR
    device: str = "auto"
    dtype: str = "auto"
    shard: int = 0
    num_shards: int = 1
    torch_threads: int = 1  # intra-op threads for model work (0: torch default)
    adapter_retain_versions: int = 4  # versions kept on disk per experiment (plus what off-policy steps need)


@dataclass
class ExampleRewardConfig:
    host: str = "127.0.0.1"
    port: int = 8088


def env_name(field_name: str) -> str:
    return "REDIS_URL" if field_name == "redis_url" else f"CLORA_{field_name.upper()}"


def _parse(kind: type, raw: str, name: str):
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind.__name__}") from None


def load_config(cls, argv: list[str] | None = None, environ: typing.Mapping[str, str] | None = None):
    """Build ``cls`` from defaults, environment and ``argv`` flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values = {}
    parser = argparse.ArgumentParser(prog=cls.__name__, add_help=True)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        env = env_name(f.name)
        if env in environ:
            values[f.name] = _parse(kind, environ[env], env)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"{kind.__name__}, env {env}")
    args = parser.parse_args(argv or [])
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is not None:
            values[f.name] = _parse(hints[f.name], raw, "--" + f.name.replace("_", "-"))
    return cls(**values)


def config_env_names(cls) -> set[str]:
    """Every environment variable ``cls`` reads (for deployment checks)."""
    return {env_name(f.name) for f in dataclasses.fields(cls)}


ALL_CONFIGS = (SchedulerConfig, RolloutConfig, RewardConfig, TrainerConfig)

__all__ = [
    "BaseConfig", "LoraConfig", "SchedulerConfig", "RolloutConfig", "RewardConfig",
    "TrainerConfig", "ExampleRewardConfig", "ConfigError", "load_config",
    "config_env_names", "env_name", "ALL_CONFIGS", "DEFAULT_MODEL_DIR",
]
