"""The service runtime: one actor class per service, run until a signal.

``run_service(MyService(config))`` installs uvloop (when available), turns
SIGTERM/SIGINT into ``service.stop()``, then ``setup()``, ``run()``,
``close()``. ``run()`` keeps a heartbeat key alive and runs the service's
consumers and background coroutines as named tasks. On stop the consumers
stop reading and drain their in-flight handlers within
``config.drain_timeout_s``; background coroutines should return when
``service.stopping`` is set (they are cancelled after the same bound). A task
that dies while the service runs stops the others and makes ``run()`` raise:
the process exits non-zero instead of stalling. A clean drain exits 0.

Heartbeat: key ``<prefix>heartbeat:<service>:<consumer_name>`` holds a
msgpack map (``service``, ``consumer``, ``pid``, ``host``, ``started_at``,
``ts``, ``status``), refreshed every ``heartbeat_ttl_s / 3`` with a TTL of
``heartbeat_ttl_s``; deleted on a clean stop. ``clora check`` reads it.

Credentials: ``REDIS_URL``'s ``user:password@``, else ``redis_username``
and ``redis_password_file`` / ``CLORA_REDIS_PASSWORD`` (``shared.acl``);
only redacted URLs are logged.

Redis outages: setup waits for Redis for as long as the service is not
stopped, and no loop of the runtime (heartbeat, consumers) ends because Redis
went away: each retries with a capped backoff and a log line, so a Redis
restart needs no manual step. A stop still ends the service promptly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import AuthenticationError, ResponseError

from shared import metrics
from shared.acl import connection_options
from shared.bus import RETRYABLE_REDIS_ERRORS, Handler, StreamBus, StreamConsumer, is_redis_outage

if TYPE_CHECKING:  # shared.config pulls in the engine interface; keep the runtime light
    from shared.config import BaseConfig

log = structlog.get_logger(__name__)

CONNECT_RETRY_MAX_DELAY_S = 2.0  # setup waits for Redis (compose starts it alongside), retrying at most this often
HEARTBEAT_REMOVAL_TIMEOUT_S = 2.0  # a stop does not wait longer for an unreachable Redis
DRAIN_MARGIN_S = 5.0  # on top of drain_timeout_s: final acks and task unwinding
HEARTBEAT_KEY_PART = "heartbeat"


# A half-open connection (a lost host, a NAT timeout) fails a call, which the
# loops retry, instead of blocking it forever; every blocking read waits far less.
SOCKET_OPTIONS: dict[str, Any] = {"socket_timeout": 30.0, "socket_connect_timeout": 5.0, "socket_keepalive": True,
                                  "health_check_interval": 30}


class ServiceTaskDied(RuntimeError):
    """A consumer, the heartbeat or a background task ended while the service ran."""


def default_consumer_name(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def heartbeat_key(prefix: str, service: str, consumer_name: str) -> str:
    return f"{prefix}{HEARTBEAT_KEY_PART}:{service}:{consumer_name}"


def decode_heartbeat(value: bytes) -> dict[str, Any]:
    return msgspec.msgpack.decode(value)


T = TypeVar("T")


def set_up(value: T | None, what: str) -> T:
    """``value`` once a service's ``setup()`` has set it; a clear error before."""
    if value is None:
        raise RuntimeError(f"{what} used before setup()")
    return value


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``; a
    ``password=`` query parameter (redis-py reads one) is masked too."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = "&".join("password=***" if pair.split("=", 1)[0].lower() == "password" else pair
                     for pair in parts.query.split("&")) if parts.query else parts.query
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class Service:
    """Base of the four services. Subclasses set ``name`` and override
    ``consumers()``, ``background()``, ``status()``, and ``setup()``/``close()``
    (calling super first / last)."""

    name: ClassVar[str] = "service"

    def __init__(self, config: BaseConfig) -> None:
        # set at construction
        self.config = config
        self.consumer_name = config.consumer_name or default_consumer_name(self.name)
        self.log = structlog.get_logger(f"services.{self.name}").bind(service=self.name, consumer=self.consumer_name)
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        # set by setup() (read through the ``redis`` and ``bus`` properties)
        self._redis: aioredis.Redis | None = None
        self._bus: StreamBus | None = None
        self._metrics: metrics.MetricsServer | None = None
        # set by run()
        self._consumers: list[StreamConsumer] = []

    # ------------------------------------------------------------ to override

    async def setup(self) -> None:
        """Connect to Redis (waiting for it until stopped) and build the bus."""
        if not self.config.redis_url:
            raise RuntimeError("redis_url is empty: set REDIS_URL (or start the service through `clora up`)")
        self._start_metrics()
        credentials = connection_options(self.config.redis_url, self.config.redis_username,
                                         self.config.redis_password_file)
        self._redis = aioredis.Redis.from_url(self.config.redis_url, **SOCKET_OPTIONS, **credentials)
        await _wait_for_redis(self._redis, self.config.redis_url, self.stopping)
        self._bus = StreamBus(self._redis, prefix=self.config.stream_prefix, maxlen=self.config.stream_maxlen)

    def consumers(self) -> list[StreamConsumer]:
        return []

    def background(self) -> list[Coroutine]:
        return []

    def status(self) -> dict[str, Any]:
        """Service-specific status for the heartbeat (msgpack-able values)."""
        return {}

    def update_metrics(self) -> None:
        """Set this service's gauges from its state (called on the loop every
        ``metrics.STREAM_POLL_INTERVAL_S`` while metrics are on)."""

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
            self._metrics = None

    # ------------------------------------------------------------ helpers

    @property
    def redis(self) -> aioredis.Redis:
        """The connection ``setup()`` opened (an error before it and after ``close()``)."""
        return set_up(self._redis, f"{self.name}: redis")

    @property
    def bus(self) -> StreamBus:
        """The stream bus ``setup()`` built (an error before it)."""
        return set_up(self._bus, f"{self.name}: bus")

    def consumer(self, stream: str, group: str, handler: Handler, **options: Any) -> StreamConsumer:
        """``bus.consumer`` with this service's consumer name and the config's
        ``max_deliveries``, ``reclaim_idle_s``, ``drain_timeout_s`` and
        ``max_entry_bytes``; ``options`` override them or add
        ``batch_size``/``concurrency``."""
        defaults = {
            "consumer_name": self.consumer_name,
            "max_deliveries": self.config.max_deliveries,
            "reclaim_idle_s": self.config.reclaim_idle_s,
            "drain_timeout_s": self.config.drain_timeout_s,
            "max_entry_bytes": self.config.max_entry_bytes,
        }
        return self.bus.consumer(stream, group, handler, **{**defaults, **options})

    def stop(self) -> None:
        """Ask the service to stop (signal handlers call only this)."""
        if not self.stopping.is_set():
            self.log.info("stop_requested")
        self.stopping.set()

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Heartbeat, consumers and background tasks until ``stop()``; then drain.
        Raises ``ServiceTaskDied`` when any of them ended before the stop."""
        self._consumers = self.consumers()
        drain_s = self.config.drain_timeout_s
        essential = {asyncio.create_task(self._heartbeat(), name=f"heartbeat:{self.name}")}
        for consumer in self._consumers:
            essential.add(asyncio.create_task(
                consumer.run(self.stopping, drain_timeout_s=drain_s), name=f"consumer:{consumer.key}:{consumer.group}"
            ))
        background = {
            asyncio.create_task(coro, name=f"background:{self.name}:{getattr(coro, '__qualname__', 'task')}")
            for coro in [*self.background(), *([self._poll_metrics()] if self._metrics else [])]
        }
        self.log.info("service_running", consumers=len(self._consumers), background=len(background))
        try:
            failure = await self._supervise(essential | background, essential)
            failure = await self._wind_down(essential | background, failure) or failure
        finally:
            await _cancel_and_wait(essential | background)
        await self._remove_heartbeat()
        if failure is not None:
            task, error = failure
            raise ServiceTaskDied(f"task {task.get_name()} ended while the service ran: {error!r}") from error

    async def _supervise(self, tasks: set[asyncio.Task], essential: set[asyncio.Task]):
        """Wait for stop() or the first task to die; returns (task, error) or None."""
        stop_waiter = asyncio.create_task(self.stopping.wait(), name=f"stop-waiter:{self.name}")
        running = set(tasks)
        try:
            while not self.stopping.is_set():
                done, _ = await asyncio.wait(running | {stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stop_waiter}:
                    running.discard(task)
                    error = _task_error(task)
                    if error is None and task not in essential:
                        self.log.info("background_task_finished", task=task.get_name())
                        continue
                    error = error or RuntimeError("returned before stop")
                    self.log.error("service_task_died", task=task.get_name(), error=repr(error))
                    self.stopping.set()
                    return task, error
            return None
        finally:
            stop_waiter.cancel()

    async def _wind_down(self, tasks: set[asyncio.Task], failure):
        """Give consumers (which drain themselves) and background tasks the
        drain bound, then cancel what is left. Returns a failure seen meanwhile."""
        heartbeat = {t for t in tasks if t.get_name().startswith("heartbeat:")}
        finishing = {t for t in tasks - heartbeat if not t.done()}
        if finishing:
            self.log.info("service_draining", tasks=len(finishing), timeout_s=self.config.drain_timeout_s)
            _, late = await asyncio.wait(finishing, timeout=self.config.drain_timeout_s + DRAIN_MARGIN_S)
            if late:
                self.log.warning("tasks_cancelled_after_drain", tasks=sorted(t.get_name() for t in late))
            await _cancel_and_wait(late)
        if failure is not None:
            return None
        for task in tasks - heartbeat:
            if task.cancelled():
                continue  # cancelled by us after the drain bound: not a failure
            error = task.exception()
            if error is not None:
                return task, error
        return None

    async def _heartbeat(self) -> None:
        key = heartbeat_key(self.config.stream_prefix, self.name, self.consumer_name)
        ttl_ms = max(int(self.config.heartbeat_ttl_s * 1000), 1)
        while True:
            try:
                await self.redis.set(key, msgspec.msgpack.encode(self._heartbeat_value()), px=ttl_ms)
            except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
                if not is_redis_outage(exc):
                    raise
                # Not fatal: the key lapses and healthchecks report it until
                # Redis is back; the next beat writes it again.
                self.log.warning("heartbeat_failed", error=repr(exc))
            _raise_if_cancelling()
            await asyncio.sleep(self.config.heartbeat_ttl_s / 3)

    def _start_metrics(self) -> None:
        metrics.set_max_experiment_labels(self.config.metrics_max_experiments)
        if self.config.metrics_port == metrics.METRICS_OFF or self._metrics is not None:
            return
        self._metrics = metrics.MetricsServer(self.config.metrics_host, self.config.metrics_port)
        self.log.info("metrics_serving", url=self._metrics.url)

    async def _poll_metrics(self) -> None:
        """Every few seconds: each consumer group's lag and pending count, and
        the service's own gauges. A Redis outage skips a round, never ends it."""
        while not self.stopping.is_set():
            for consumer in self._consumers:
                try:
                    groups = await self.redis.xinfo_groups(consumer.key)
                except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
                    self.log.debug("metrics_poll_skipped", stream=consumer.stream, error=repr(exc))
                    continue
                for group in groups:
                    if _text(group.get("name")) == consumer.group:
                        metrics.set_group_backlog(consumer.stream, consumer.group, group.get("lag"),
                                                  int(group.get("pending") or 0))
            try:
                self.update_metrics()
            except Exception:  # a gauge bug must not take the service down
                self.log.exception("update_metrics_failed")
            try:
                await asyncio.wait_for(self.stopping.wait(), metrics.STREAM_POLL_INTERVAL_S)
            except TimeoutError:
                pass

    def _heartbeat_value(self) -> dict[str, Any]:
        return {
            "metrics_url": self._metrics.url if self._metrics is not None else "",
            "service": self.name,
            "consumer": self.consumer_name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "ts": time.time(),
            "status": {"consumers": [c.status() for c in self._consumers], **self.status()},
        }

    async def _remove_heartbeat(self) -> None:
        key = heartbeat_key(self.config.stream_prefix, self.name, self.consumer_name)
        try:
            # redis-py types its asyncio commands as Awaitable; they are coroutines
            removal: asyncio.Task[int] = asyncio.create_task(
                self.redis.delete(key), name=f"heartbeat-removal:{self.name}")  # type: ignore[arg-type]
            await asyncio.wait_for(asyncio.shield(removal), HEARTBEAT_REMOVAL_TIMEOUT_S)
        except (TimeoutError, ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
            self.log.warning("heartbeat_not_removed", error=repr(exc))  # it expires on its own


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _raise_if_cancelling() -> None:
    """Raise the cancellation of the current task when it was asked for but
    absorbed: redis-py finishes a command it was cancelled in (so that its
    connection stays usable) and returns, which would leave the caller's loop
    running, and its ``cancel()`` waited for forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError(f"{task.get_name()} was cancelled")


def _task_error(task: asyncio.Task) -> BaseException | None:
    if task.cancelled():
        return asyncio.CancelledError(f"{task.get_name()} was cancelled")
    return task.exception()


async def _cancel_and_wait(tasks: set[asyncio.Task]) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


async def _wait_for_redis(client: aioredis.Redis, url: str, stopping: asyncio.Event) -> None:
    """Wait until Redis answers, for as long as the service is not stopped
    (a wrong password is not waited for: it never fixes itself)."""
    delay_s = 0.25
    while True:
        try:
            await client.ping()
            return
        except AuthenticationError:
            raise
        except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
            if not is_redis_outage(exc):
                raise
            if stopping.is_set():
                raise RuntimeError(f"stopped before Redis at {redact_url(url)} was reachable") from exc
            log.warning("redis_not_ready", url=redact_url(url), error=repr(exc), retry_in_s=delay_s)
        try:
            await asyncio.wait_for(stopping.wait(), delay_s)
        except TimeoutError:
            pass
        delay_s = min(delay_s * 2, CONNECT_RETRY_MAX_DELAY_S)


# ---------------------------------------------------------------- entry point


def run_service(service: Service) -> int:
    """Run ``service`` until SIGTERM/SIGINT; 0 after a clean drain, 1 on failure."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(service))


def _loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(service: Service) -> int:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    config = dataclasses.asdict(service.config)
    config["redis_url"] = redact_url(config.get("redis_url", ""))
    service.log.info("service_starting", pid=os.getpid(), event_loop=type(loop).__module__, config=config)
    exit_code = 0
    try:
        await service.setup()
        await service.run()
    except Exception:
        service.log.exception("service_failed")
        exit_code = 1
    finally:
        try:
            await service.close()
        except Exception:
            service.log.exception("service_close_failed")
            exit_code = 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    service.log.info("service_stopped", exit_code=exit_code)
    return exit_code
