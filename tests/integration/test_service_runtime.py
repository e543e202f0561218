"""The service runtime on a real Redis protocol server (embedded Valkey).

Covers issue 2's points 4 (a redis + msgpack client following the README
talks to a service), 5 (SIGTERM during a handler: it finishes, is acked, the
process exits 0) and 6 (``clora check`` for a live and a killed service),
plus the runtime's own rules (heartbeat content, dead tasks raise).
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import msgpack
import pytest

from shared.config import BaseConfig
from shared.runtime import Service, ServiceTaskDied, decode_heartbeat, heartbeat_key, run_service
from tests.integration.bus_worker import GROUP as WORKER_GROUP
from tests.integration.worker_process import REPO_ROOT, WorkerProcesses, wait_for

README = REPO_ROOT / "README.md"
CLIENT_MODULES = {"os", "sys", "time", "json", "secrets", "msgpack", "redis"}  # the standard library, msgpack, redis-py
EVENTUALLY_S = 10.0


def base_config(redis_url: str, prefix: str, **overrides) -> BaseConfig:
    config = BaseConfig(redis_url=redis_url, stream_prefix=prefix, heartbeat_ttl_s=1.0, drain_timeout_s=2.0)
    return replace(config, **overrides)


class Sleeper(Service):
    """A service with no consumers; optional background coroutines."""

    name = "sleeper"

    def __init__(self, config, background_coros=()) -> None:
        super().__init__(config)
        self._background_factories = list(background_coros)

    def background(self):
        return [factory(self) for factory in self._background_factories]

    def status(self):
        return {"phase": "testing"}


async def run_in_task(service: Service) -> asyncio.Task:
    await service.setup()
    return asyncio.create_task(service.run(), name="service-under-test")


# ---------------------------------------------------------------- in-process


async def test_heartbeat_holds_identity_and_status_with_a_ttl_and_is_removed_on_stop(redis_url, stream_prefix,
                                                                                      async_redis):
    service = Sleeper(base_config(redis_url, stream_prefix))
    assert service.consumer_name == f"sleeper-{socket.gethostname()}-{os.getpid()}"
    key = heartbeat_key(stream_prefix, "sleeper", service.consumer_name)
    task = await run_in_task(service)
    try:
        value = await wait_async(lambda: async_redis.get(key))
        heartbeat = decode_heartbeat(value)
        assert heartbeat["pid"] == os.getpid()
        assert heartbeat["host"] == socket.gethostname()
        assert heartbeat["consumer"] == service.consumer_name
        assert heartbeat["status"]["phase"] == "testing"
        assert heartbeat["started_at"] <= heartbeat["ts"]
        assert 0 < await async_redis.pttl(key) <= 1000
    finally:
        service.stop()
        await asyncio.wait_for(task, EVENTUALLY_S)
        await service.close()
    assert await async_redis.exists(key) == 0


async def test_a_dying_background_task_makes_run_raise(redis_url, stream_prefix, async_redis):
    async def crash(service):
        await asyncio.sleep(0.05)
        raise ValueError("background broke")

    service = Sleeper(base_config(redis_url, stream_prefix), [crash])
    task = await run_in_task(service)
    try:
        with pytest.raises(ServiceTaskDied, match="background broke"):
            await asyncio.wait_for(task, EVENTUALLY_S)
    finally:
        await service.close()
    assert service.stopping.is_set()
    assert await async_redis.exists(heartbeat_key(stream_prefix, "sleeper", service.consumer_name)) == 0


async def test_a_background_task_that_returns_early_is_not_a_failure(redis_url, stream_prefix):
    finished = asyncio.Event()

    async def one_shot(service):
        finished.set()

    service = Sleeper(base_config(redis_url, stream_prefix), [one_shot])
    task = await run_in_task(service)
    try:
        await asyncio.wait_for(finished.wait(), EVENTUALLY_S)
        await asyncio.sleep(0.1)
        assert not task.done()
    finally:
        service.stop()
        await asyncio.wait_for(task, EVENTUALLY_S)
        await service.close()


class Recorder(Service):
    """A service with one consumer (``experiments``) that records what it handled."""

    name = "recorder"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.handled: list[str] = []

    def consumers(self):
        return [self.consumer("experiments", "recorders", self.handle)]

    async def handle(self, message, entry) -> None:
        self.handled.append(message.experiment_id)


async def _now(value):
    return value


async def _publish_cancel(url: str, prefix: str, experiment_id: str) -> None:
    import redis.asyncio as aioredis

    from shared.bus import StreamBus
    from shared.messages import ExperimentCancel

    client = aioredis.Redis.from_url(url)
    try:
        await StreamBus(client, prefix=prefix).publish(ExperimentCancel(experiment_id=experiment_id))
    finally:
        await client.aclose()


async def test_service_rides_out_a_redis_restart_heartbeat_and_consumer_resume(own_redis, stream_prefix):
    """Issue 12: a Redis restart mid-run needs no manual step."""
    import redis.asyncio as aioredis

    service = Recorder(base_config(own_redis.url, stream_prefix, heartbeat_ttl_s=0.6))
    key = heartbeat_key(stream_prefix, "recorder", service.consumer_name)
    task = await run_in_task(service)
    observer = aioredis.Redis.from_url(own_redis.url)
    try:
        await _publish_cancel(own_redis.url, stream_prefix, "before")
        await wait_async(lambda: _now(service.handled == ["before"]))
        own_redis.kill()
        await asyncio.sleep(2.0)  # several heartbeats and reads fail meanwhile
        assert not task.done()
        restarted_at = time.time()
        own_redis.start()  # same port, same data
        beat_after = decode_heartbeat(await wait_async(lambda: observer.get(key)))["ts"]
        await _publish_cancel(own_redis.url, stream_prefix, "after")
        await wait_async(lambda: _now(service.handled == ["before", "after"]))
        assert not task.done()
        assert beat_after >= restarted_at  # the beat that expired during the outage is written again
    finally:
        service.stop()
        await asyncio.wait_for(task, EVENTUALLY_S)  # a clean stop: no ServiceTaskDied
        await service.close()
        await observer.aclose()


async def test_stop_ends_a_service_promptly_while_redis_is_down(own_redis, stream_prefix):
    service = Recorder(base_config(own_redis.url, stream_prefix))
    task = await run_in_task(service)
    await asyncio.sleep(0.5)
    own_redis.kill()
    await asyncio.sleep(1.0)
    assert not task.done()
    service.stop()
    # well within drain_timeout_s + the drain margin, the bound the runtime would cancel at
    await asyncio.wait_for(task, timeout=4.0)
    await service.close()


async def test_setup_waits_for_redis_until_it_comes_up(own_redis, stream_prefix):
    url = own_redis.url
    own_redis.kill()
    service = Recorder(base_config(url, stream_prefix))
    setup = asyncio.create_task(service.setup(), name="setup-under-test")
    await asyncio.sleep(1.5)
    assert not setup.done()  # still waiting, not failed
    own_redis.start()
    await asyncio.wait_for(setup, EVENTUALLY_S)
    task = asyncio.create_task(service.run(), name="service-under-test")
    await _publish_cancel(url, stream_prefix, "late")
    await wait_async(lambda: _now(service.handled == ["late"]))
    service.stop()
    await asyncio.wait_for(task, EVENTUALLY_S)
    await service.close()


async def test_setup_gives_up_when_stopped_while_redis_is_away(own_redis, stream_prefix):
    url = own_redis.url
    own_redis.kill()
    service = Recorder(base_config(url, stream_prefix))
    setup = asyncio.create_task(service.setup(), name="setup-under-test")
    await asyncio.sleep(0.5)
    service.stop()
    with pytest.raises(RuntimeError, match="stopped before Redis"):
        await asyncio.wait_for(setup, EVENTUALLY_S)
    await service.close()


def test_run_service_exit_codes(redis_url, stream_prefix):
    async def stop_soon(service):
        await asyncio.sleep(0.2)
        service.stop()

    assert run_service(Sleeper(base_config(redis_url, stream_prefix), [stop_soon])) == 0
    assert run_service(Sleeper(base_config("", stream_prefix))) == 1  # no Redis configured


# ---------------------------------------------------------------- subprocesses


@pytest.fixture
def workers(redis_url, stream_prefix, tmp_path):
    processes = WorkerProcesses(redis_url, stream_prefix, tmp_path)
    yield processes
    processes.stop_all()


def readme_example() -> str:
    text = README.read_text()
    marker = text.index("<!-- example:submit -->")
    match = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert match, "README: no python block after <!-- example:submit -->"
    return match.group(1)


def test_readme_example_uses_only_redis_and_msgpack():
    imported = set()
    for node in ast.walk(ast.parse(readme_example())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= CLIENT_MODULES, imported - CLIENT_MODULES


def test_plain_client_following_the_readme_talks_to_a_service(workers, sync_redis, stream_prefix, tmp_path):
    """Issue 2, point 4: the README's example, run as is (redis + msgpack
    only), submits an experiment that a service decodes and handles, and
    reads the service's answer on the events stream."""
    workers.start()
    script = tmp_path / "readme_client.py"
    script.write_text(readme_example())
    client = subprocess.run([sys.executable, str(script)], env=workers.env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert client.returncode == 0, client.stderr + workers.logs()
    steps = re.search(r'"steps": (\d+)', readme_example()).group(1)  # as the README's spec says
    assert re.search(rf"^info finished ExperimentSubmit steps={steps} handled by busworker-", client.stdout, re.M), \
        client.stdout
    assert sync_redis.get(f"{stream_prefix}effects:my-first-exp") == b"1"


def test_sigterm_during_a_handler_finishes_acks_and_exits_zero(workers, sync_redis, stream_prefix):
    """Issue 2, point 5."""
    drain_timeout_s = 10
    worker = workers.start("--handler-sleep-s", "1.5", "--drain-timeout-s", str(drain_timeout_s))
    payload = msgpack.packb({"kind": "experiment_cancel", "schema": 1, "experiment_id": "term"})
    sync_redis.xadd(f"{stream_prefix}experiments", {"msg": payload})
    wait_for(lambda: sync_redis.lrange(f"{stream_prefix}started", 0, -1), 30, "handler start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=drain_timeout_s + 10) == 0, workers.logs()
    assert sync_redis.get(f"{stream_prefix}effects:term") == b"1"  # the handler finished
    assert sync_redis.xpending(f"{stream_prefix}experiments", WORKER_GROUP)["pending"] == 0  # and was acked
    assert '"message_handled"' in workers.logs()


def clora_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "check", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_clora_check_answers_for_a_live_and_a_killed_service(workers, sync_redis, stream_prefix, monkeypatch):
    """Issue 2, point 6."""
    worker = workers.start("--heartbeat-ttl-s", "1")
    pattern = f"{stream_prefix}heartbeat:busworker:*"
    wait_for(lambda: list(sync_redis.scan_iter(match=pattern)), 30, "the worker's heartbeat")

    live = clora_check(workers.env(), "busworker")
    assert live.returncode == 0, live.stderr
    assert f"busworker-{socket.gethostname()}-{worker.pid} alive" in live.stdout

    # The same command in-process, for the variants (cheaper than new interpreters).
    from services.cli.check import main as check_main

    monkeypatch.setenv("REDIS_URL", workers.redis_url)
    monkeypatch.setenv("CLORA_STREAM_PREFIX", stream_prefix)
    assert check_main(["busworker", "--any"]) == 0
    assert check_main(["busworker", "--consumer", f"busworker-{socket.gethostname()}-{worker.pid}"]) == 0
    assert check_main(["busworker", "--consumer", "busworker-elsewhere-1"]) == 1
    assert check_main(["trainer", "--any"]) == 1
    assert check_main(["busworker", "--stream-prefix", "other-deployment:"]) == 1

    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    wait_for(lambda: not list(sync_redis.scan_iter(match=pattern)), 10, "the heartbeat to expire")
    dead = clora_check(workers.env(), "busworker")
    assert dead.returncode == 1
    assert "not alive" in dead.stderr and len(dead.stderr.strip().splitlines()) == 1


def test_clora_check_without_redis_url_says_so(monkeypatch, capsys):
    from services.cli.check import main as check_main

    monkeypatch.delenv("REDIS_URL", raising=False)
    assert check_main(["scheduler"]) == 1
    assert "REDIS_URL is not set" in capsys.readouterr().err


def test_clora_check_does_not_import_torch():
    code = "import sys, services.cli.check; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


async def wait_async(condition, timeout_s: float = EVENTUALLY_S):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")
