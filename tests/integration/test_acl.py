"""Redis ACL roles (``shared.acl``) on a real server with ACLs on: what the
client, service and admin users may and may not do, and ``clora up`` +
``clora submit`` from a fresh directory with no credentials typed, the four
services running a whole experiment as the ``service`` user."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError

from shared import acl
from shared.client import CloraClient
from shared.redis_server import EmbeddedRedis

PREFIX = "t[1]:"  # glob specials: the rules must escape them
OTHER_PREFIX = "t1:"  # what an unescaped "t[1]:" glob would match
PASSWORDS = {"service": "service-pw", "client": "client-pw", "admin": "admin-pw"}
INTERNAL_STREAMS = ("rollout_requests", "completions", "scored", "train_jobs:0", "reward:0", "reward_replies",
                    "dead_letters", "admin")
INTERNAL_KEYS = ("exp:victim:s0", "exp:victim:e1", "exp:victim:tasks", "exp_active", "exp_queue", "scheduler_lease",
                 "heartbeat:scheduler:x")
ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 180.0
EXPERIMENT_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("acl-redis"), persist=False,
                           acl=acl.acl_file_text(PREFIX, PASSWORDS))
    server.start()
    yield server
    server.stop()


def connect(server: EmbeddedRedis, role: str | None) -> redis.Redis:
    if role is None:
        return redis.Redis.from_url(server.url)
    return redis.Redis.from_url(server.url, username=role, password=PASSWORDS[role])


@pytest.fixture(scope="module")
def seeded(acl_server):
    """Every key family of the layout, written by the service user."""
    service = connect(acl_server, "service")
    for stream in ("experiments", "tasks", "events", "metrics", "adapters", *INTERNAL_STREAMS):
        writer = connect(acl_server, "admin") if stream == "admin" else service  # the operators' stream
        writer.xadd(PREFIX + stream, {"msg": b"x"})
    service.hset(PREFIX + "exp:victim", mapping={"status": "running", "steps": 3})
    service.rpush(PREFIX + "exp:victim:metrics", b"m")
    service.hset(PREFIX + "exp:victim:s0", "r1", b"another tenant's prompt and answers")
    service.hset(PREFIX + "exp:victim:e1", "r1", 1)
    service.rpush(PREFIX + "exp:victim:tasks", b"a pushed prompt")
    service.zadd(PREFIX + "exp_index", {"victim": 1.0})
    service.sadd(PREFIX + "exp_active", "victim")
    service.zadd(PREFIX + "exp_queue", {"victim": 1.0})
    service.set(PREFIX + "scheduler_lease", "me")
    service.set(PREFIX + "heartbeat:scheduler:x", b"hb")
    service.set(PREFIX + "deployment", b"d")
    yield acl_server
    service.close()


def denied(call) -> bool:
    try:
        call()
    except NoPermissionError:
        return True
    return False


def test_client_gets_noperm_on_every_internal_stream_read_and_write(seeded):
    client = connect(seeded, "client")
    for stream in INTERNAL_STREAMS:
        key = PREFIX + stream
        assert denied(lambda: client.xadd(key, {"msg": b"forged"})), stream  # noqa: B023
        assert denied(lambda: client.xrange(key)), stream  # noqa: B023
        assert denied(lambda: client.xrevrange(key, count=1)), stream  # noqa: B023
        assert denied(lambda: client.xread({key: "0-0"})), stream  # noqa: B023
        assert denied(lambda: client.xinfo_stream(key)), stream  # noqa: B023
    for stream in ("experiments", "tasks"):  # written, never read back
        assert denied(lambda: client.xrange(PREFIX + stream)), stream  # noqa: B023
    for stream in ("events", "metrics", "adapters"):  # read, never written
        assert denied(lambda: client.xadd(PREFIX + stream, {"msg": b"forged"})), stream  # noqa: B023


def test_client_reads_records_but_no_step_data_and_nothing_outside_the_prefix(seeded):
    client = connect(seeded, "client")
    for key in INTERNAL_KEYS:
        assert denied(lambda: client.hgetall(PREFIX + key) or client.get(PREFIX + key)), key  # noqa: B023
    for key in ("other", OTHER_PREFIX + "deployment", OTHER_PREFIX + "exp:victim", "clora:exp_index"):
        assert denied(lambda: client.get(key)), key  # noqa: B023
    assert denied(lambda: client.xadd(OTHER_PREFIX + "experiments", {"msg": b"x"}))
    assert denied(lambda: client.hset(PREFIX + "exp:victim", "status", "cancelled"))
    assert denied(lambda: client.sadd(PREFIX + "reward_allowlist", "http://evil/"))
    for command in (client.flushall, client.flushdb, lambda: client.config_get("*"), lambda: client.keys("*")):
        assert denied(command)
    # what it may do: the client's own traffic
    assert client.xadd(PREFIX + "experiments", {"msg": b"s"}) and client.xadd(PREFIX + "tasks", {"msg": b"t"})
    assert client.xrange(PREFIX + "events") and client.xread({PREFIX + "metrics": "0-0"})
    assert client.hgetall(PREFIX + "exp:victim")[b"status"] == b"running"
    assert client.lrange(PREFIX + "exp:victim:metrics", 0, -1) == [b"m"]
    assert client.zrange(PREFIX + "exp_index", 0, -1) == [b"victim"]
    assert client.get(PREFIX + "deployment") == b"d"
    assert client.hgetall(PREFIX + "exp:" + "a" * 64) == {}  # the longest id is covered


def test_client_api_works_as_the_client_user(seeded):
    with CloraClient.connect(seeded.url, PREFIX, role="client") as refused:  # no credentials: default user
        assert denied(refused.experiments)
    with CloraClient(connect(seeded, "client"), PREFIX) as client:
        assert [r.experiment_id for r in client.experiments()] == ["victim"]
        assert client.experiment("victim").status == "running"
        assert client.bus.stream_end("events") != "0-0"


def test_service_user_is_confined_to_the_layout(seeded):
    service = connect(seeded, "service")
    assert service.hgetall(PREFIX + "exp:victim:s0")
    assert service.smembers(PREFIX + "reward_allowlist") == set()
    for command in (service.flushall, service.flushdb, lambda: service.config_get("*"),
                    lambda: service.execute_command("CLIENT", "LIST"), lambda: service.keys("*"),
                    lambda: service.acl_list(), lambda: service.set("other", 1),
                    lambda: service.set(OTHER_PREFIX + "deployment", 1),
                    lambda: service.sadd(PREFIX + "reward_allowlist", "http://evil/"),
                    lambda: service.eval("return redis.call('SET', KEYS[1], 1)", 1, "other")):
        assert denied(command)


def test_admin_changes_the_allowlist_reads_dead_letters_and_purges_but_forges_nothing(seeded):
    admin = connect(seeded, "admin")
    assert admin.sadd(PREFIX + "reward_allowlist", "http://127.0.0.1:8088/") == 1
    assert admin.srem(PREFIX + "reward_allowlist", "http://127.0.0.1:8088/") == 1
    assert admin.xrange(PREFIX + "dead_letters")
    assert admin.delete(PREFIX + "exp:victim:e1") == 1
    assert admin.xadd(PREFIX + "admin", {"msg": b"an operator's cancel"})
    for stream in set(INTERNAL_STREAMS) - {"admin"}:
        assert denied(lambda: admin.xadd(PREFIX + stream, {"msg": b"forged"})), stream  # noqa: B023
    for command in (admin.flushall, lambda: admin.config_get("*"), lambda: admin.delete("other"),
                    lambda: admin.hset(PREFIX + "exp:victim", "status", "finished")):
        assert denied(command)


def test_default_user_may_only_ping(seeded):
    anonymous = connect(seeded, None)
    assert anonymous.ping()
    assert denied(lambda: anonymous.get(PREFIX + "deployment"))
    assert denied(lambda: anonymous.xadd(PREFIX + "experiments", {"msg": b"x"}))


# ---------------------------------------------------------------- clora up + clora submit


SPEC_YAML = """\
experiment_id: acl-add
task: {family: add}
reward: {type: family, family: add}
steps: 2
prompts_per_step: 4
group_size: 4
max_tokens: 6
eval_size: 8
"""


def _clora(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 120.0):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def _fresh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("CLORA_") or k == "REDIS_URL")}
    return {**env, "PYTHONPATH": str(ROOT), "CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json"}


def _wait_for(path: Path, up: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        assert up.poll() is None, f"clora up exited {up.returncode}"
        assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
        time.sleep(0.2)


def _wait_until_alive(services, cwd: Path, env: dict[str, str], up: subprocess.Popen, data_dir: Path) -> None:
    """`clora check` (the admin user of the data dir) until every service has a heartbeat."""
    deadline = time.monotonic() + UP_TIMEOUT_S
    for service in services:
        while _clora(["check", service], cwd, env).returncode != 0:
            logs = {p.name: p.read_text()[-1500:] for p in (data_dir / "logs").glob("*.log")}
            assert up.poll() is None and time.monotonic() < deadline, f"{service} not alive: {logs}"
            time.sleep(1.0)


@pytest.mark.slow
def test_clora_up_and_submit_from_a_fresh_directory_run_an_experiment_as_the_service_user(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC_YAML)
    env = _fresh_env()
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    data_dir = tmp_path / ".clora"
    try:
        _wait_for(data_dir / "redis_url", up, UP_TIMEOUT_S)
        for role in acl.ROLES:
            assert stat.S_IMODE(acl.password_file(data_dir, role).stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "redis" / "users.acl").stat().st_mode) == 0o600
        _wait_until_alive(("trainer", "reward", "rollout", "scheduler"), tmp_path, env, up, data_dir)
        submitted = _clora(["submit", "spec.yaml"], tmp_path, env)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        with CloraClient.connect(data_dir=data_dir) as client:  # the client password, found in the data dir
            record = client.wait("acl-add", timeout_s=EXPERIMENT_TIMEOUT_S)
            assert record.status == "finished" and record.step == 2, record
            assert denied(lambda: client.redis.xrange(client.prefix + "scored"))
            assert denied(lambda: client.redis.hgetall(client.prefix + "exp:acl-add:s0"))
        anonymous = redis.Redis.from_url((data_dir / "redis_url").read_text().strip())
        assert denied(lambda: anonymous.hgetall("clora:exp:acl-add"))
        status = _clora(["status"], tmp_path, env)
        assert status.returncode == 0 and "acl-add" in status.stdout, status.stdout + status.stderr
        assert _clora(["allowlist", "add", "http://127.0.0.1:9/score"], tmp_path, env).returncode == 0
        exported = _clora(["env"], tmp_path, env).stdout
        assert "client:" in exported and acl.password_file(data_dir, "admin").read_text().strip() not in exported
        logs = "".join(p.read_text() for p in (data_dir / "logs").glob("*.log"))
        for password in acl.ensure_passwords(acl.credentials_dir(data_dir)).values():
            assert password not in logs
        assert "NOPERM" not in logs and "service_failed" not in logs
    finally:
        up.send_signal(signal.SIGINT)
        try:
            output, _ = up.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            output, _ = up.communicate()
    assert up.returncode == 0, output[-3000:]
    metrics_line = next(line for line in output.splitlines() if line.startswith("  metrics: "))
    services = ("scheduler", "reward", "rollout-0", "trainer-0")
    assert all(f"{name} http://127.0.0.1:" in metrics_line for name in services), metrics_line
