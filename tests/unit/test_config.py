"""Config loading: defaults < environment < flags, and bad values refused."""

from __future__ import annotations

import dataclasses

import pytest

from shared.config import (
    ALL_CONFIGS,
    DEFAULT_DATA_DIR,
    DEFAULT_STREAM_PREFIX,
    BaseConfig,
    ConfigError,
    ExampleRewardConfig,
    RewardConfig,
    RolloutConfig,
    SchedulerConfig,
    TrainerConfig,
    check_lora_agreement,
    config_env_names,
    env_name,
    load_config,
    lora_disagreements,
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


def test_the_defaults_are_the_module_constants():
    for cls in ALL_CONFIGS:
        config = load_config(cls, [], {})
        assert (config.stream_prefix, config.data_dir) == (DEFAULT_STREAM_PREFIX, DEFAULT_DATA_DIR)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("cls", [*ALL_CONFIGS, ExampleRewardConfig])
def test_the_defaults_are_valid(cls):
    load_config(cls, [], {}).validate()


@pytest.mark.parametrize("cls, env, variable, expected", [
    (BaseConfig, {"CLORA_MAX_DELIVERIES": "0"}, "CLORA_MAX_DELIVERIES", "positive"),
    (BaseConfig, {"CLORA_HEARTBEAT_TTL_S": "nan"}, "CLORA_HEARTBEAT_TTL_S", "positive"),
    (BaseConfig, {"CLORA_STREAM_PREFIX": ""}, "CLORA_STREAM_PREFIX", "non-empty"),
    (BaseConfig, {"CLORA_LOG_LEVEL": "loud"}, "CLORA_LOG_LEVEL", "debug, info"),
    (BaseConfig, {"CLORA_LOG_FORMAT": "xml"}, "CLORA_LOG_FORMAT", "auto, json, console"),
    (SchedulerConfig, {"CLORA_MAX_CONCURRENT": "-1"}, "CLORA_MAX_CONCURRENT", "positive"),
    (SchedulerConfig, {"CLORA_MAX_REWARD_BUDGET_S": "0"}, "CLORA_MAX_REWARD_BUDGET_S", "positive"),
    (SchedulerConfig, {"CLORA_MAX_TRAIN_TOKENS": "0"}, "CLORA_MAX_TRAIN_TOKENS", "positive"),
    (RolloutConfig, {"CLORA_ENGINE": "tensorrt"}, "CLORA_ENGINE", "torch, vllm"),
    (RolloutConfig, {"CLORA_DTYPE": "fp8"}, "CLORA_DTYPE", "float32"),
    (RolloutConfig, {"CLORA_DEVICE": "gpu"}, "CLORA_DEVICE", "cuda:N"),
    (RolloutConfig, {"CLORA_GPU_MEMORY_UTILIZATION": "1.5"}, "CLORA_GPU_MEMORY_UTILIZATION", "(0, 1]"),
    (RolloutConfig, {"CLORA_MAX_MODEL_LEN": "-1"}, "CLORA_MAX_MODEL_LEN", "zero or more"),
    (RolloutConfig, {"CLORA_LORA_RANK": "0"}, "CLORA_LORA_RANK", "positive"),
    (RolloutConfig, {"CLORA_LORA_TARGETS": " , "}, "CLORA_LORA_TARGETS", "module name"),
    (RewardConfig, {"CLORA_MAX_INFLIGHT_PER_EXPERIMENT": "0"}, "CLORA_MAX_INFLIGHT_PER_EXPERIMENT", "positive"),
    (RewardConfig, {"CLORA_RETRY_BACKOFF_S": "-0.5"}, "CLORA_RETRY_BACKOFF_S", "zero or more"),
    (TrainerConfig, {"CLORA_SHARD": "2", "CLORA_NUM_SHARDS": "2"}, "CLORA_SHARD", "0..num_shards-1"),
    (TrainerConfig, {"CLORA_ADAPTER_RETAIN_VERSIONS": "0"}, "CLORA_ADAPTER_RETAIN_VERSIONS", "positive"),
    (TrainerConfig, {"CLORA_DTYPE": "half"}, "CLORA_DTYPE", "bfloat16"),
    (ExampleRewardConfig, {"CLORA_PORT": "70000"}, "CLORA_PORT", "TCP port"),
])
def test_out_of_range_values_are_refused_naming_the_variable_and_the_range(cls, env, variable, expected):
    with pytest.raises(ConfigError) as refused:
        load_config(cls, [], env)
    message = str(refused.value)
    assert variable in message and expected in message
    flag = "--" + variable.removeprefix("CLORA_").lower().replace("_", "-")
    assert flag in message


@pytest.mark.parametrize("cls, env", [
    (RolloutConfig, {"CLORA_DEVICE": "cuda:1", "CLORA_DTYPE": "float16", "CLORA_ENGINE": "vllm",
                     "CLORA_MAX_MODEL_LEN": "0", "CLORA_TORCH_THREADS": "0"}),
    (TrainerConfig, {"CLORA_SHARD": "3", "CLORA_NUM_SHARDS": "4", "CLORA_LOG_LEVEL": "DEBUG"}),
    (RewardConfig, {"CLORA_RETRY_BACKOFF_S": "0"}),
])
def test_edge_values_in_range_are_accepted(cls, env):
    load_config(cls, [], env)


def test_a_flag_value_is_validated_too():
    with pytest.raises(ConfigError, match="--max-rows"):
        load_config(RolloutConfig, ["--max-rows", "0"], {})


# ---------------------------------------------------------------- agreement between services


def test_services_with_the_same_lora_settings_agree():
    env = {"CLORA_LORA_RANK": "16", "CLORA_LORA_TARGETS": "q_proj,v_proj"}
    configs = {"scheduler": load_config(SchedulerConfig, [], env), "rollout": load_config(RolloutConfig, [], env),
               "trainer": load_config(TrainerConfig, [], {**env, "CLORA_LORA_TARGETS": " v_proj , q_proj"})}
    assert lora_disagreements(configs) == []
    check_lora_agreement(configs)


def test_every_lora_disagreement_is_named():
    configs = {
        "scheduler": SchedulerConfig(),
        "rollout": RolloutConfig(lora_rank=16),
        "trainer": TrainerConfig(lora_alpha=32.0, lora_targets="q_proj"),
    }
    problems = lora_disagreements(configs)
    assert len(problems) == 3
    assert any("CLORA_LORA_RANK" in p and "rollout has 16" in p for p in problems)
    assert any("CLORA_LORA_ALPHA" in p and "trainer has 32.0" in p for p in problems)
    assert any("CLORA_LORA_TARGETS" in p and "trainer has 'q_proj'" in p for p in problems)
    with pytest.raises(ConfigError, match="disagree"):
        check_lora_agreement(configs)


# ---------------------------------------------------------------- Redis credentials (shared.acl)


def test_services_read_their_redis_user_and_password_file_from_the_environment(tmp_path):
    from shared.acl import connection_options

    password_file = tmp_path / "service"
    password_file.write_text("s3cret\n")
    config = load_config(BaseConfig, [], {"REDIS_URL": "redis://r:6379/0", "CLORA_REDIS_USERNAME": "service",
                                          "CLORA_REDIS_PASSWORD_FILE": str(password_file)})
    assert "s3cret" not in repr(config)  # the password is never a config value (logged at start)
    assert connection_options(config.redis_url, config.redis_username, config.redis_password_file, {}) == {
        "username": "service", "password": "s3cret"}
    assert connection_options("redis://r", environ={"CLORA_REDIS_USERNAME": "client",
                                                    "CLORA_REDIS_PASSWORD": "pw"}) == {"username": "client",
                                                                                       "password": "pw"}
    assert connection_options("redis://u:p@r", "service", str(password_file), {}) == {}  # the URL's own wins
    assert connection_options("redis://r", environ={}) == {}


def test_an_unreadable_or_empty_password_file_is_a_clear_error(tmp_path):
    from shared.acl import AclError, credentials_from_env

    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AclError, match="empty"):
        credentials_from_env("service", str(tmp_path / "empty"), {})
    with pytest.raises(AclError, match="cannot read"):
        credentials_from_env("service", str(tmp_path / "missing"), {})


def test_urls_are_logged_without_passwords_and_tls_urls_pass_through():
    import redis

    from shared.acl import with_credentials
    from shared.runtime import redact_url

    url = with_credentials("rediss://r.example:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
                           "client", "p@ss:word")
    assert redact_url(url) == "rediss://client:***@r.example:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required"
    assert redact_url("redis://r?password=x") == "redis://r?password=***"
    pool = redis.Redis.from_url(url).connection_pool
    assert pool.connection_class is redis.connection.SSLConnection
    assert pool.connection_kwargs["password"] == "p@ss:word" and pool.connection_kwargs["username"] == "client"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
