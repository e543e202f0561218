"""One typed config per service, filled from defaults, then environment
variables, then CLI flags (last wins).

Every field ``foo_bar`` of a config reads the environment variable
``CLORA_FOO_BAR`` and the flag ``--foo-bar``; the one exception is
``redis_url``, which reads ``REDIS_URL``. An empty ``redis_url`` means: start
the embedded server (see ``shared.redis_server``).

Redis credentials (``shared.acl``): ``REDIS_URL`` may carry ``user:password@``
(it wins); else ``redis_username`` (``CLORA_REDIS_USERNAME``) with the
password read from ``redis_password_file`` (``CLORA_REDIS_PASSWORD_FILE``) or
from ``CLORA_REDIS_PASSWORD``. The password itself is no config field: it is
never logged and never a flag (flags show in ``ps``). TLS: a ``rediss://``
URL, certificate options as its query parameters (``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``).

Each config is built from sections (``BaseConfig``: Redis, streams, delivery
and logging; ``LoraConfig``: the deployment's LoRA signature; ``RewardLimits``
and ``TrainBudget``: what one tenant may cost) and checks its own values in
``validate()``, which ``load_config`` calls once: a bad value is a
``ConfigError`` naming its variable and flag, before any service starts.
``lora_disagreements`` checks what several services must agree on.

Defaults that other modules need too (the stream prefix, the data directory,
the shipped model) are the module constants below: import them, never repeat them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from shared.engine import LoraSignature

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parent / "models" / "clora-tiny")
DEFAULT_STREAM_PREFIX = "clora:"  # every Redis key and stream name starts with it
DEFAULT_DATA_DIR = ".clora"  # embedded Redis data, adapters, checkpoints
DEFAULT_STREAM_MAXLEN = 100_000  # MAXLEN ~ of every stream
DEFAULT_ADAPTER_RETAIN_VERSIONS = 4  # adapter versions kept on disk per experiment

ENGINES = ("torch", "vllm")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # shared.devices.DTYPES, plus auto
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(ValueError):
    pass


class _Section:
    """Base of every config section: ``validate()`` runs each section's checks
    (each override calls ``super().validate()`` first)."""

    def validate(self) -> None:
        """Raise ``ConfigError`` for the first value out of its range."""

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{env_name(name)} (--{name.replace('_', '-')}) must be {expected}, "
                              f"got {getattr(self, name)!r}")

    def _require_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(value > 0 and math.isfinite(value), name, "a positive number")

    def _require_non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(value >= 0 and math.isfinite(value), name, "zero or more")

    def _require_choice(self, name: str, choices: tuple[str, ...]) -> None:
        self._require(getattr(self, name) in choices, name, f"one of {', '.join(choices)}")


@dataclass
class BaseConfig(_Section):
    redis_url: str = ""
    redis_username: str = ""  # the ACL user (shared.acl roles: service for the four services)
    redis_password_file: str = ""  # its password, in a file (else CLORA_REDIS_PASSWORD)
    stream_prefix: str = DEFAULT_STREAM_PREFIX
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN
    data_dir: str = DEFAULT_DATA_DIR  # embedded Redis data, adapters, checkpoints
    consumer_name: str = ""  # default: <service>-<hostname>-<pid>
    max_deliveries: int = 5
    reclaim_idle_s: float = 30.0
    drain_timeout_s: float = 20.0
    heartbeat_ttl_s: float = 10.0
    max_entry_bytes: int = 16 * 1024 * 1024  # larger stream entries are dead-lettered unread
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    metrics_port: int = 0  # Prometheus /metrics: -1 off, 0 a free port (in the heartbeat's metrics_url), else this one
    metrics_host: str = "127.0.0.1"  # the address it binds (0.0.0.0 in containers)
    metrics_max_experiments: int = 20  # experiment ids with their own metrics label; later ones read "other"

    @property
    def adapter_dir(self) -> Path:
        return Path(self.data_dir) / "adapters"

    def validate(self) -> None:
        super().validate()
        self._require(bool(self.stream_prefix), "stream_prefix", "non-empty")
        self._require(bool(self.data_dir), "data_dir", "non-empty")
        self._require_positive("stream_maxlen", "max_deliveries", "reclaim_idle_s", "drain_timeout_s",
                               "heartbeat_ttl_s", "max_entry_bytes")
        self._require(self.log_level.lower() in LOG_LEVELS, "log_level", f"one of {', '.join(LOG_LEVELS)}")
        self._require_choice("log_format", LOG_FORMATS)
        self._require(-1 <= self.metrics_port <= 65535, "metrics_port", "-1 (off), 0 (a free port) or a TCP port")
        self._require(bool(self.metrics_host), "metrics_host", "non-empty")
        self._require_non_negative("metrics_max_experiments")


@dataclass
class LoraConfig(_Section):
    """The deployment's LoRA signature (all live adapters share it)."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    @property
    def signature(self) -> LoraSignature:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSignature(rank=self.lora_rank, alpha=self.lora_alpha, target_modules=targets)

    def validate(self) -> None:
        super().validate()
        self._require_positive("lora_rank", "lora_alpha")
        self._require(bool(self.signature.target_modules), "lora_targets", "at least one module name")


@dataclass
class RewardLimits(_Section):
    """What one experiment's reward may cost the shared reward service; the
    scheduler refuses specs over them, the reward service enforces them."""

    max_reward_timeout_s: float = 60.0  # largest reward.timeout_s
    max_reward_attempts: int = 5  # largest reward.max_attempts
    max_reward_budget_s: float = 120.0  # largest reward.timeout_s x reward.max_attempts

    def validate(self) -> None:
        super().validate()
        self._require_positive("max_reward_timeout_s", "max_reward_attempts", "max_reward_budget_s")


@dataclass
class TrainBudget(_Section):
    """What one train job may cost the trainer; the scheduler refuses specs
    over it, the trainer refuses jobs over it."""

    max_train_tokens: int = 1_000_000  # prompt + completion tokens of one train job
    max_packed_row_tokens: int = 16_384  # one group packed behind its prompt (attention mask ~ its square)

    def validate(self) -> None:
        super().validate()
        self._require_positive("max_train_tokens", "max_packed_row_tokens")


@dataclass
class SchedulerConfig(BaseConfig, LoraConfig, RewardLimits, TrainBudget):
    max_concurrent: int = 8
    num_trainer_shards: int = 1
    train_queue_depth: int = 2  # outstanding train jobs per shard
    stall_timeout_s: float = 300.0  # re-publish a step's missing work after this long
    max_tokens_limit: int = 4096  # largest max_tokens an experiment may ask for
    # the model's context in tokens, as the rollout's (same CLORA_MAX_MODEL_LEN); 0: unknown, max_tokens not checked
    max_model_len: int = 0
    lease_ttl_s: float = 30.0  # one scheduler at a time: a standby takes over this long after the leader died
    ended_ttl_s: float = 7 * 24 * 3600.0  # an ended experiment's step data expires after this; its summary stays
    # the reward service's configured URL prefixes (same CLORA_HTTP_ALLOWLIST): refused at submit otherwise
    http_allowlist: str = ""
    datasets_dir: str = ""  # task.dataset paths are relative to it and never leave it; "": <data_dir>/datasets

    @property
    def datasets_root(self) -> Path:
        return Path(self.datasets_dir) if self.datasets_dir else Path(self.data_dir) / "datasets"

    def validate(self) -> None:
        super().validate()
        self._require_positive("max_concurrent", "num_trainer_shards", "train_queue_depth", "stall_timeout_s",
                               "max_tokens_limit", "lease_ttl_s", "ended_ttl_s")
        self._require_non_negative("max_model_len")


@dataclass
class RolloutConfig(BaseConfig, LoraConfig):
    engine: str = "torch"  # torch | vllm
    model_dir: str = DEFAULT_MODEL_DIR
    device: str = "auto"  # auto | cpu | cuda[:N]
    dtype: str = "auto"  # auto (fp32 on cpu, bf16 on cuda) | float32 | bfloat16 | float16
    max_rows: int = 256  # rows decoding at once
    max_loras: int = 32  # adapter slots: >= adapter_keep_versions x live tenants, or versions churn
    torch_threads: int = 1  # intra-op threads for model work (0: torch default); services share the cores
    typical_group_size: int = 8  # request concurrency = max_rows // typical_group_size (backpressure)
    adapter_keep_versions: int = 2  # newest versions kept per tenant; >= max_off_policy_steps + 1
    # -- read only by engine=vllm (the torch engine ignores them)
    max_cpu_loras: int = 64
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    cpu_kv_cache_gib: float = 1.0  # vllm on CPU: KV-cache size (never a share of system RAM)

    def validate(self) -> None:
        super().validate()
        self._require_choice("engine", ENGINES)
        _validate_model_settings(self)
        self._require_positive("max_rows", "max_loras", "typical_group_size", "adapter_keep_versions",
                               "max_cpu_loras", "cpu_kv_cache_gib")
        self._require_non_negative("max_model_len")
        self._require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "in (0, 1]")


@dataclass
class RewardConfig(BaseConfig, RewardLimits):
    http_allowlist: str = ""  # comma-separated URL prefixes allowed for http rewards
    max_inflight: int = 64
    max_inflight_per_experiment: int = 16  # scoring slots one experiment may hold; a slow reward slows only itself
    retry_backoff_s: float = 0.5

    def validate(self) -> None:
        super().validate()
        self._require_positive("max_inflight", "max_inflight_per_experiment")
        self._require_non_negative("retry_backoff_s")


@dataclass
class TrainerConfig(BaseConfig, LoraConfig, TrainBudget):
    model_dir: str = DEFAULT_MODEL_DIR
    device: str = "auto"
    dtype: str = "auto"
    shard: int = 0
    num_shards: int = 1
    torch_threads: int = 1  # intra-op threads for model work (0: torch default)
    adapter_retain_versions: int = DEFAULT_ADAPTER_RETAIN_VERSIONS  # plus what off-policy steps need

    def validate(self) -> None:
        super().validate()
        _validate_model_settings(self)
        self._require_positive("num_shards", "adapter_retain_versions")
        self._require(0 <= self.shard < self.num_shards, "shard", f"in 0..num_shards-1 ({self.num_shards - 1})")


def _validate_model_settings(config: RolloutConfig | TrainerConfig) -> None:
    """The fields the rollout and the trainer share for the model they load."""
    config._require(bool(config.model_dir), "model_dir", "a model directory or Hugging Face id")
    config._require(_DEVICE.fullmatch(config.device) is not None, "device", "auto, cpu, cuda or cuda:N")
    config._require_choice("dtype", DTYPE_NAMES)
    config._require_non_negative("torch_threads")


@dataclass
class ExampleRewardConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8088

    def validate(self) -> None:
        super().validate()
        self._require(0 <= self.port <= 65535, "port", "a TCP port (0..65535)")


def lora_disagreements(configs: typing.Mapping[str, LoraConfig]) -> list[str]:
    """What the services named in ``configs`` (name -> config) disagree on in
    the deployment's LoRA signature (rank, alpha, target modules); empty when
    they agree. Every service must preallocate and check the same shape."""
    if not configs:
        return []
    (first_name, first), *others = configs.items()
    problems = []
    for name, config in others:
        for field_name in ("lora_rank", "lora_alpha"):
            if getattr(config, field_name) != getattr(first, field_name):
                problems.append(f"{env_name(field_name)}: {first_name} has {getattr(first, field_name)!r}, "
                                f"{name} has {getattr(config, field_name)!r}")
        if set(config.signature.target_modules) != set(first.signature.target_modules):
            problems.append(f"{env_name('lora_targets')}: {first_name} has {first.lora_targets!r}, "
                            f"{name} has {config.lora_targets!r}")
    return problems


def check_lora_agreement(configs: typing.Mapping[str, LoraConfig]) -> None:
    """Raise ``ConfigError`` listing every disagreement (see ``lora_disagreements``)."""
    problems = lora_disagreements(configs)
    if problems:
        raise ConfigError("the services' LoRA settings disagree: " + "; ".join(problems))


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
    config = cls(**values)
    config.validate()
    return config


def config_env_names(cls) -> set[str]:
    """Every environment variable ``cls`` reads (for deployment checks)."""
    return {env_name(f.name) for f in dataclasses.fields(cls)}


ALL_CONFIGS = (SchedulerConfig, RolloutConfig, RewardConfig, TrainerConfig)

__all__ = [
    "BaseConfig", "LoraConfig", "RewardLimits", "TrainBudget", "SchedulerConfig", "RolloutConfig", "RewardConfig",
    "TrainerConfig", "ExampleRewardConfig", "ConfigError", "load_config", "config_env_names", "env_name",
    "lora_disagreements", "check_lora_agreement", "ALL_CONFIGS", "DEFAULT_MODEL_DIR", "DEFAULT_STREAM_PREFIX",
    "DEFAULT_DATA_DIR", "DEFAULT_STREAM_MAXLEN", "DEFAULT_ADAPTER_RETAIN_VERSIONS", "ENGINES", "DTYPE_NAMES",
]
