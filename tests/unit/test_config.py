"""Config loading: defaults < environment < flags, and bad values refused."""

from __future__ import annotations

import dataclasses

import pytest

from shared.config import (
    ALL_CONFIGS, BaseConfig, ConfigError, RewardConfig, TrainerConfig, config_env_names, env_name, load_config,
)


@dataclasses.dataclass
class WithFlag(BaseConfig):
    dry_run: bool = False


def test_defaults_without_env_or_flags():
    config = load_config(BaseConfig, [], {})
    assert config == BaseConfig()
    assert config.redis_url == "" and config.stream_prefix == "clora:"


def test_environment_overrides_defaults():
    env = {"REDIS_URL": "redis://db:6380/2", "CLORA_STREAM_PREFIX": "staging:", "CLORA_MAX_DELIVERIES": "9",
           "CLORA_RECLAIM_IDLE_S": "2.5"}
    config = load_config(BaseConfig, [], env)
    assert config.redis_url == "redis://db:6380/2"
    assert config.stream_prefix == "staging:"
    assert config.max_deliveries == 9
    assert config.reclaim_idle_s == 2.5


def test_flags_override_environment():
    env = {"CLORA_MAX_DELIVERIES": "9", "REDIS_URL": "redis://env:1"}
    config = load_config(BaseConfig, ["--max-deliveries", "3", "--redis-url", "redis://flag:2"], env)
    assert config.max_deliveries == 3
    assert config.redis_url == "redis://flag:2"


def test_unrelated_environment_is_ignored():
    config = load_config(BaseConfig, [], {"CLORA_NOT_A_FIELD": "x", "MAX_DELIVERIES": "1", "HOME": "/root"})
    assert config == BaseConfig()


def test_subclass_fields_and_inherited_ones():
    config = load_config(TrainerConfig, ["--shard", "2"], {"CLORA_NUM_SHARDS": "4", "CLORA_LORA_RANK": "16"})
    assert (config.shard, config.num_shards, config.lora_rank) == (2, 4, 16)
    assert config.signature.rank == 16


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                           ("0", False), ("false", False), ("no", False), ("", False)])
def test_bool_values(raw, expected):
    assert load_config(WithFlag, [], {"CLORA_DRY_RUN": raw}).dry_run is expected
    assert load_config(WithFlag, ["--dry-run", raw], {}).dry_run is expected


def test_bad_bool_is_refused():
    with pytest.raises(ConfigError, match="CLORA_DRY_RUN"):
        load_config(WithFlag, [], {"CLORA_DRY_RUN": "maybe"})


@pytest.mark.parametrize("env, fragment", [
    ({"CLORA_MAX_DELIVERIES": "five"}, "CLORA_MAX_DELIVERIES"),
    ({"CLORA_HEARTBEAT_TTL_S": "10s"}, "CLORA_HEARTBEAT_TTL_S"),
    ({"CLORA_MAX_INFLIGHT": "1.5"}, "CLORA_MAX_INFLIGHT"),
])
def test_bad_environment_values_raise_config_error_naming_the_variable(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(RewardConfig, [], env)


def test_bad_flag_value_raises_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match="--drain-timeout-s"):
        load_config(BaseConfig, ["--drain-timeout-s", "soon"], {})


def test_bad_environment_value_is_refused_even_when_a_flag_overrides_it():
    with pytest.raises(ConfigError):
        load_config(BaseConfig, ["--max-deliveries", "3"], {"CLORA_MAX_DELIVERIES": "x"})


def test_unknown_flag_is_refused():
    with pytest.raises(SystemExit):
        load_config(BaseConfig, ["--no-such-option", "1"], {})


def test_env_names():
    assert env_name("redis_url") == "REDIS_URL"
    assert env_name("stream_prefix") == "CLORA_STREAM_PREFIX"
    for cls in ALL_CONFIGS:
        names = config_env_names(cls)
        assert "REDIS_URL" in names and "CLORA_HEARTBEAT_TTL_S" in names
        assert len(names) == len(dataclasses.fields(cls))
