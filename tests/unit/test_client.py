"""The client's pure parts: refusal reasons, the deployment description,
finding Redis, and the progress line."""

from __future__ import annotations

import msgspec
import pytest

from services.cli.experiments import LEGEND, held_out_text, phase, progress_line
from services.scheduler.state import ExperimentRecord
from shared.client import ClientError, SpecRefused, as_spec, find_prefix, find_redis_url, refusal_reasons, spec_limits
from shared.config import SchedulerConfig
from shared.deployment import DeploymentInfo, decode_deployment, deployment_from_config, encode_deployment
from shared.messages import ExperimentSpec, RewardSpec, TaskSource


def spec(**overrides) -> ExperimentSpec:
    fields = dict(experiment_id="exp-1", task=TaskSource(family="add"), reward=RewardSpec(type="family", family="add"))
    fields.update(overrides)
    return ExperimentSpec(**fields)


DEPLOYMENT = DeploymentInfo(lora_rank=8, lora_targets=["q_proj", "v_proj"], families=["add", "sort"],
                            http_allowlist=["http://127.0.0.1:8088/score"])


def test_a_valid_spec_has_no_reasons():
    assert refusal_reasons(spec(), DEPLOYMENT, [], None) == []


@pytest.mark.parametrize("overrides, expected", [
    ({"steps": -3}, "steps: must be between 1"),
    ({"experiment_id": "team/exp1"}, "experiment_id: 'team/exp1' must match"),
    ({"task": TaskSource(family="add", stream=True)}, "task: give exactly one of family, prompts, stream"),
    ({"lora_rank": 16}, "lora_rank: 16 is over the deployment's rank 8"),
    ({"lora_targets": ["o_proj"]}, "lora_targets: ['o_proj'] are not among the deployment's target modules ['q_proj'"),
    ({"task": TaskSource(family="poetry"), "reward": RewardSpec(type="family", family="add")},
     "task.family: unknown family 'poetry'"),
    ({"reward": RewardSpec(type="http", url="http://evil.example:80/score")}, "reward.url: reward url"),
    ({"reward": RewardSpec(type="http", url="http://127.0.0.1:8088/scoreboard")},
     "not on the reward service's allowlist"),
])
def test_each_broken_rule_gives_its_reason(overrides, expected):
    reasons = refusal_reasons(spec(**overrides), DEPLOYMENT, [], None)
    assert any(expected in reason for reason in reasons), reasons


def test_families_come_from_the_deployment():
    """A family this client knows but the deployment does not is refused."""
    reasons = refusal_reasons(spec(task=TaskSource(family="sub"), reward=RewardSpec(type="family", family="sub")),
                              DEPLOYMENT, [], None)
    assert any("unknown family 'sub'" in r for r in reasons), reasons


def test_runtime_allowlist_entries_allow_a_url():
    http = spec(reward=RewardSpec(type="http", url="http://10.0.0.5:9000/r/v2"))
    assert refusal_reasons(http, DEPLOYMENT, [], None)
    assert refusal_reasons(http, DEPLOYMENT, ["http://10.0.0.5:9000/r"], None) == []


@pytest.mark.parametrize("status, refused", [("running", True), ("finished", True), ("invalid", False), (None, False)])
def test_an_existing_id_is_refused_unless_it_was_refused_before(status, refused):
    reasons = refusal_reasons(spec(), DEPLOYMENT, [], status)
    assert bool(reasons) is refused
    if refused:
        assert reasons == [f"experiment_id: 'exp-1' already exists ({status}); choose another id"]


def test_limits_are_the_schedulers_own_for_the_deployment():
    limits = spec_limits(DeploymentInfo(lora_rank=4, max_tokens_limit=32))
    assert (limits.deployment_rank, limits.max_tokens_limit) == (4, 32)
    reasons = refusal_reasons(spec(lora_rank=4, max_tokens=64), DeploymentInfo(lora_rank=4, max_tokens_limit=32), [],
                              None)
    assert any(r.startswith("max_tokens: must be between 1 and 32") for r in reasons), reasons


def test_plain_data_that_does_not_fit_the_schema_is_refused_with_the_path():
    with pytest.raises(SpecRefused) as refused:
        as_spec({"experiment_id": "x", "task": {"family": "add"}, "reward": {"type": "family"}, "steps": "many"})
    assert refused.value.experiment_id == "x"
    assert refused.value.reasons == ["steps: expected `int`, got `str`"]


def test_deployment_round_trips_and_ignores_fields_it_does_not_know():
    info = deployment_from_config(SchedulerConfig(lora_rank=4, max_tokens_limit=99, data_dir="/data"),
                                  families=["add"])
    assert decode_deployment(encode_deployment(info)) == info
    assert (info.lora_rank, info.max_tokens_limit, info.families, info.adapter_dir) == (
        4, 99, ["add"], "/data/adapters")
    assert info.lora_targets[0] == "q_proj" and info.written_at > 0
    newer = msgspec.msgpack.encode({**msgspec.to_builtins(info), "gpu_count": 8})
    assert decode_deployment(newer) == info
    assert decode_deployment(None) is None


def test_redis_is_found_flag_then_env_then_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CLORA_STREAM_PREFIX", raising=False)
    monkeypatch.setenv("CLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(ClientError, match="start `clora up`"):
        find_redis_url()
    (tmp_path / "redis_url").write_text("redis://127.0.0.1:7777\n")
    (tmp_path / "stream_prefix").write_text("mine:\n")
    assert find_redis_url() == "redis://127.0.0.1:7777"
    assert find_prefix() == "mine:"
    monkeypatch.setenv("REDIS_URL", "redis://env:1")
    monkeypatch.setenv("CLORA_STREAM_PREFIX", "env:")
    assert (find_redis_url(), find_prefix()) == ("redis://env:1", "env:")
    assert (find_redis_url("redis://flag:2"), find_prefix("flag:")) == ("redis://flag:2", "flag:")


def test_progress_line_separates_reward_from_held_out_and_names_the_final_eval():
    running = ExperimentRecord(experiment_id="demo-add", status="running", steps=20, step=9, reward_mean=0.41,
                               accuracy=0.41, start_accuracy=0.22)
    line = progress_line(running)
    assert "reward 0.41" in line and "acc" not in line.replace("held-out", "")  # equal: said once
    assert "held-out 0.22 -> ..." in line and line.endswith("running")
    assert "held-out 0.22 -> 0.50" in progress_line(running, latest_eval=0.5)
    scored = msgspec.structs.replace(running, reward_mean=0.7, accuracy=0.4)
    assert "reward 0.70  acc 0.40" in progress_line(scored)
    evaluating = msgspec.structs.replace(running, step=20)
    assert phase(evaluating) == "final eval" and progress_line(evaluating).endswith("final eval")
    done = msgspec.structs.replace(running, step=20, status="finished", final_accuracy=0.9)
    assert held_out_text(done) == "0.22 -> 0.90" and phase(done) == "finished"
    assert "held-out" in LEGEND and "reward" in LEGEND


# ---------------------------------------------------------------- owner secrets


def test_owner_secrets_are_made_once_kept_0600_and_read_back(tmp_path):
    import os
    import stat

    from shared.owner_secrets import OwnerSecrets

    path = tmp_path / "cfg" / "clora" / "owners.json"
    owners = OwnerSecrets(path)
    assert owners.get("clora:", "a") is None and not path.exists()  # reading makes nothing
    secret = owners.get_or_make("clora:", "a")
    assert len(secret) >= 32 and owners.get_or_make("clora:", "a") == secret
    assert OwnerSecrets(path).get("clora:", "a") == secret  # another process reads it back
    assert owners.get_or_make("other:", "a") != secret  # per prefix and id
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_an_unreadable_owners_file_is_an_error_and_is_never_overwritten(tmp_path):
    from shared.owner_secrets import OwnerSecrets, OwnerSecretsError

    path = tmp_path / "owners.json"
    path.write_text("{not json")
    with pytest.raises(OwnerSecretsError, match="fix or move it"):
        OwnerSecrets(path).get_or_make("clora:", "a")
    assert path.read_text() == "{not json"


def test_the_owners_file_is_found_env_then_xdg_then_home(tmp_path, monkeypatch):
    from shared.owner_secrets import default_owners_path

    monkeypatch.delenv("CLORA_OWNERS_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_owners_path() == tmp_path / "xdg" / "clora" / "owners.json"
    monkeypatch.setenv("CLORA_OWNERS_FILE", str(tmp_path / "mine.json"))
    assert default_owners_path() == tmp_path / "mine.json"


def test_owner_hashes_are_salted_and_checked_in_full():
    from services.scheduler import owners

    secret = "a-secret-of-sufficient-length"
    first, second = owners.hash_secret(secret), owners.hash_secret(secret)
    assert first != second and secret not in first  # a fresh salt each time
    assert owners.secret_matches(first, secret) and owners.secret_matches(second, secret)
    for wrong in (None, "", secret[:-1], secret + "x", "x" * 10_000):
        assert not owners.secret_matches(first, wrong)
    for broken in (None, "", "md5$00$00", "scrypt$zz$00", first.replace("scrypt", "scrypz")):
        assert not owners.secret_matches(broken, secret)
    assert owners.secret_problem("short") and owners.secret_problem(secret) is None


def test_a_dead_letter_payload_never_keeps_the_secret():
    import msgpack

    from services.scheduler.owners import REDACTED, redacted_payload, redacting_decoder
    from shared.bus import EntryRejected, StreamEntry
    from shared.messages import ExperimentCancel, encode

    secret = "a-secret-of-sufficient-length"
    broken = msgpack.packb({"kind": "experiment_cancel", "experiment_id": 7, "owner_secret": secret})
    with pytest.raises(EntryRejected) as rejected:
        redacting_decoder(StreamEntry("experiments", "1-0", {b"msg": broken}), 1 << 20)
    assert msgpack.unpackb(rejected.value.payload)["owner_secret"] == REDACTED
    assert "experiment_id" in rejected.value.reason
    good = encode(ExperimentCancel(experiment_id="a", owner_secret=secret))
    message, payload = redacting_decoder(StreamEntry("experiments", "1-0", {b"msg": good}), 1 << 20)
    assert message.owner_secret == secret and secret.encode() not in payload
    assert redacted_payload(b"\x93owner_secret" + secret.encode()) == b""  # not a map: nothing kept
    assert redacted_payload(b"plain") == b"plain"
