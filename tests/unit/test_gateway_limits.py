"""Each API key's share, through the gateway's HTTP routes (aiohttp test
server, no cluster): the backend holds every op until the test answers it, so
"in flight" is exact. The SDK-visible behaviour against a real cluster is in
tests/integration/test_gateway_limits.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from services.gateway.auth import ApiKeys
from services.gateway.config import GatewayConfig
from services.gateway.futures import FutureStore
from services.gateway.routes import Gateway, build_app
from services.gateway.runs import Registry
from shared.tinker_messages import TinkerOp, TinkerOpResult, TinkerSampleRequest, TinkerSampleResult

KEY_A, KEY_B = "tml-unit-limits-alpha", "tml-unit-limits-bravo"


class HeldBackend:
    """Ops and samples wait until ``answer_all``; save_weights gets the next version."""

    def __init__(self) -> None:
        self.held: list[tuple[object, asyncio.Future]] = []
        self.versions: dict[str, int] = {}

    async def op(self, op: TinkerOp) -> asyncio.Future:
        return self._hold(op)

    async def sample(self, request: TinkerSampleRequest) -> asyncio.Future:
        return self._hold(request)

    def _hold(self, message: object) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        self.held.append((message, waiter))
        return waiter

    def answer_all(self) -> None:
        for message, waiter in self.held:
            if isinstance(message, TinkerSampleRequest):
                waiter.set_result(TinkerSampleResult(request_id=message.request_id, run_id=message.run_id))
                continue
            assert isinstance(message, TinkerOp)
            version = 0
            if message.op == "save_weights":
                version = self.versions[message.run_id] = self.versions.get(message.run_id, 0) + 1
            waiter.set_result(TinkerOpResult(op_id=message.op_id, run_id=message.run_id, op=message.op, ok=True,
                                             adapter_version=version))
        self.held.clear()


@pytest.fixture
async def gateway_client():
    config = GatewayConfig(gateway_max_runs_per_key=2, gateway_max_checkpoints_per_run=2,
                           gateway_max_pending_ops_per_key=2, gateway_max_datums_per_op=3,
                           gateway_max_tokens_per_op=10, gateway_retry_after_s=2)
    backend = HeldBackend()
    gateway = Gateway(config=config, keys=ApiKeys([KEY_A, KEY_B]), backend=backend, registry=Registry(),
                      futures=FutureStore(60.0))
    client = TestClient(TestServer(build_app(gateway)))
    await client.start_server()
    try:
        yield client, backend
    finally:
        await client.close()
        await gateway.futures.close()


async def _post(client: TestClient, key: str, route: str, body: dict | None = None, **kwargs):
    kwargs.setdefault("json", body if body is not None else {})
    return await client.post(f"/api/v1/{route}", headers={"X-API-Key": key}, **kwargs)


async def _done(client: TestClient, key: str, reply) -> dict:
    assert reply.status == 200, await reply.text()
    request_id = (await reply.json())["request_id"]
    outcome = await _post(client, key, "retrieve_future", {"request_id": request_id})
    return await outcome.json()


async def _session(client: TestClient, key: str) -> str:
    return (await (await _post(client, key, "create_session", {})).json())["session_id"]


async def _new_run(client: TestClient, backend: HeldBackend, key: str, session: str):
    reply = await _post(client, key, "create_model", {"session_id": session, "base_model": "clora-tiny",
                                                      "lora_config": {"rank": 4}})
    if reply.status != 200:
        return reply
    backend.answer_all()
    return (await _done(client, key, reply))["model_id"]


def _optim(run_id: str) -> dict:
    return {"model_id": run_id, "adam_params": {"learning_rate": 1e-3}}


async def _refusal(reply, status: int, words: str) -> None:
    assert reply.status == status, await reply.text()
    assert words in (await reply.json())["error"]


async def test_ops_in_flight_per_key_get_a_retryable_429(gateway_client):
    client, backend = gateway_client
    run_a = await _new_run(client, backend, KEY_A, await _session(client, KEY_A))
    session_b = await _session(client, KEY_B)
    run_b = await _new_run(client, backend, KEY_B, session_b)
    first = [await _post(client, KEY_A, "optim_step", _optim(run_a)) for _ in range(2)]
    assert all(reply.status == 200 for reply in first)
    refused = await _post(client, KEY_A, "optim_step", _optim(run_a))
    await _refusal(refused, 429, "gateway_max_pending_ops_per_key")
    assert refused.headers["Retry-After"] == "2"
    # samples count too; a refused request published nothing
    sampling = await (await _post(client, KEY_A, "create_sampling_session",
                                  {"session_id": await _session(client, KEY_A), "base_model": "clora-tiny"})).json()
    sample = {"sampling_session_id": sampling["sampling_session_id"], "num_samples": 1,
              "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {}}
    await _refusal(await _post(client, KEY_A, "asample", sample), 429, "gateway_max_pending_ops_per_key")
    assert len(backend.held) == 2
    # another key is unaffected
    assert (await _post(client, KEY_B, "optim_step", _optim(run_b))).status == 200
    backend.answer_all()
    for reply in first:
        assert (await _done(client, KEY_A, reply))["type"] == "optim_step"
    # answered ops give their slots back
    again = [await _post(client, KEY_A, "optim_step", _optim(run_a)), await _post(client, KEY_A, "asample", sample)]
    assert [reply.status for reply in again] == [200, 200]
    backend.answer_all()


async def test_runs_per_key_get_a_403_counting_those_being_created(gateway_client):
    client, backend = gateway_client
    session = await _session(client, KEY_A)
    await _new_run(client, backend, KEY_A, session)
    body = {"session_id": session, "base_model": "clora-tiny", "lora_config": {"rank": 4}}
    in_flight = await _post(client, KEY_A, "create_model", body)  # not answered yet: it counts
    assert in_flight.status == 200
    await _refusal(await _post(client, KEY_A, "create_model", body), 403, "gateway_max_runs_per_key")
    backend.answer_all()
    await _done(client, KEY_A, in_flight)
    await _refusal(await _post(client, KEY_A, "create_model", body), 403, "gateway_max_runs_per_key")
    assert isinstance(await _new_run(client, backend, KEY_B, await _session(client, KEY_B)), str)


async def test_checkpoints_per_run_get_a_403_but_a_state_may_be_overwritten(gateway_client):
    client, backend = gateway_client
    run_a = await _new_run(client, backend, KEY_A, await _session(client, KEY_A))
    sampler = await _post(client, KEY_A, "save_weights_for_sampler", {"model_id": run_a, "path": "s1"})
    state = await _post(client, KEY_A, "save_weights", {"model_id": run_a, "path": "st"})
    await _refusal(await _post(client, KEY_A, "save_weights", {"model_id": run_a, "path": "st2"}), 403,
                   "gateway_max_checkpoints_per_run")
    backend.answer_all()
    assert (await _done(client, KEY_A, sampler))["path"].endswith("/sampler_weights/s1")
    assert (await _done(client, KEY_A, state))["path"].endswith("/weights/st")
    for route, body in (("save_weights_for_sampler", {"model_id": run_a, "path": "s2"}),
                        ("save_weights_for_sampler", {"model_id": run_a, "sampling_session_seq_id": 1}),
                        ("save_weights", {"model_id": run_a})):
        await _refusal(await _post(client, KEY_A, route, body), 403, "gateway_max_checkpoints_per_run")
    overwrite = await _post(client, KEY_A, "save_weights", {"model_id": run_a, "path": "st"})
    backend.answer_all()
    assert (await _done(client, KEY_A, overwrite))["path"].endswith("/weights/st")
    assert (await _post(client, KEY_A, "optim_step", _optim(run_a))).status == 200
    backend.answer_all()


def _forward_backward_body(run_id: str, lengths: list[int]) -> bytes:
    data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
                        loss_fn_inputs={"target_tokens": np.arange(2, n + 2), "weights": np.ones(n)})
            for n in lengths]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=run_id, seq_id=1)
    return forward_backward_request_to_proto(request).SerializeToString()


async def test_datums_and_tokens_per_op_get_a_400(gateway_client):
    client, backend = gateway_client
    run_a = await _new_run(client, backend, KEY_A, await _session(client, KEY_A))
    config = await (await _post(client, KEY_A, "client/config")).json()
    assert config["fwdbwd_max_chunk_len"] == 3  # the SDK splits its batches to fit
    proto = {"Content-Type": "application/x-protobuf", "X-API-Key": KEY_A}

    async def send(lengths: list[int]):
        return await client.post("/api/v1/forward_backward", data=_forward_backward_body(run_a, lengths),
                                 headers=proto)

    await _refusal(await send([2, 2, 2, 2]), 400, "gateway_max_datums_per_op")
    await _refusal(await send([4, 4, 3]), 400, "gateway_max_tokens_per_op")
    assert not backend.held
    assert (await send([4, 3, 3])).status == 200
    backend.answer_all()
