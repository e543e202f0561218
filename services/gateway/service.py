"""The gateway service: the Tinker HTTP API (routes.py) on one side, the
trainer and rollout over Redis streams on the other. Holds no model.

Publishes ``TinkerOp`` on ``tinker_ops`` and ``TinkerSampleRequest`` on
``tinker_sample_requests``; consumes ``tinker_results`` and ``tinker_samples``
(group ``gateway``) and hands each reply to the request waiting for it. A
reply nobody waits for (an earlier gateway's, a duplicate) is dropped.

Runs, sessions, sampling sessions, checkpoint paths and futures live in
Redis too (store.py), loaded at start: a killed gateway started again (same
port, same keys) serves the same SDK objects. A future that was in flight
when it died answers a clear server error (futures.RESTARTED).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from aiohttp import web

from services.gateway.auth import ApiKeys
from services.gateway.config import GatewayConfig
from services.gateway.futures import FutureStore
from services.gateway.routes import Gateway, build_app
from services.gateway.runs import Registry
from services.gateway.store import RedisTables
from shared.bus import Entry, StreamConsumer
from shared.runtime import Service
from shared.tinker_messages import TinkerOp, TinkerOpResult, TinkerSampleRequest, TinkerSampleResult

GROUP = "gateway"


class BusBackend:
    """Publishes ops and sample requests; replies resolve the waiting futures."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service
        self._waiting: dict[str, asyncio.Future] = {}

    async def op(self, op: TinkerOp) -> asyncio.Future:
        return await self._publish(op.op_id, op, "tinker_ops")

    async def sample(self, request: TinkerSampleRequest) -> asyncio.Future:
        return await self._publish(request.request_id, request, "tinker_sample_requests")

    async def _publish(self, key: str, message: Any, stream: str) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        waiter.add_done_callback(lambda _: self._waiting.pop(key, None))
        try:
            await self._service.bus.publish(message, stream)
        except BaseException:
            waiter.cancel()
            raise
        return waiter

    def resolve(self, key: str, reply: Any) -> bool:
        waiter = self._waiting.get(key)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(reply)
        return True

    def waiting(self) -> int:
        return len(self._waiting)


class GatewayService(Service):
    name: ClassVar[str] = "gateway"
    config: GatewayConfig

    def __init__(self, config: GatewayConfig) -> None:
        super().__init__(config)
        self.keys = ApiKeys.load(config.gateway_api_keys_file, config.gateway_api_keys)
        self.backend = BusBackend(self)
        self.gateway = Gateway(config=config, keys=self.keys, backend=self.backend, registry=Registry(),
                               futures=FutureStore(config.futures_keep_s))
        self._runner: web.AppRunner | None = None
        self.port = config.gateway_port

    async def setup(self) -> None:
        if not len(self.keys):
            raise RuntimeError("no API keys: set CLORA_GATEWAY_API_KEYS or --gateway-api-keys-file")
        await super().setup()
        tables = RedisTables(self.redis, self.config.stream_prefix)
        registry = Registry(tables)
        await registry.load()
        self.gateway.registry = registry
        self.gateway.futures = FutureStore(self.config.futures_keep_s, tables)
        self.log.info("gateway_tables_loaded", **registry.counts())
        for stream in ("tinker_results", "tinker_samples"):
            await self.bus.ensure_group(stream, GROUP, start_id="$")
        self._runner = web.AppRunner(build_app(self.gateway), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.gateway_host, self.config.gateway_port)
        await site.start()
        server = site._server  # port 0: the port the OS chose
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self.log.info("gateway_listening", host=self.config.gateway_host, port=self.port, api_keys=len(self.keys))

    def consumers(self) -> list[StreamConsumer]:
        return [self.consumer("tinker_results", GROUP, self._on_result),
                self.consumer("tinker_samples", GROUP, self._on_samples)]

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "pending_futures": self.gateway.futures.pending(),
                "waiting_replies": self.backend.waiting()}

    async def close(self) -> None:
        await self.gateway.futures.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await super().close()

    async def _on_result(self, message: TinkerOpResult, entry: Entry) -> None:
        if not isinstance(message, TinkerOpResult):
            return
        self.backend.resolve(message.op_id, message)

    async def _on_samples(self, message: TinkerSampleResult, entry: Entry) -> None:
        if not isinstance(message, TinkerSampleResult):
            return
        self.backend.resolve(message.request_id, message)
