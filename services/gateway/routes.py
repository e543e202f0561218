"""HTTP routes of the Tinker-compatible gateway (aiohttp).

Endpoints the official SDK (tinker 0.38.0) calls, per SDK method:

- ``ServiceClient(base_url, api_key)``: POST /api/v1/client/config, POST
  /api/v1/client/dynamic_config, POST /api/v1/create_session; then in the
  background POST /api/v1/session_heartbeat and POST /api/v1/telemetry.
- ``get_server_capabilities()``: GET /api/v1/get_server_capabilities.
- ``create_lora_training_client(base_model, rank)``: POST /api/v1/create_model
  (a future -> CreateModelResponse), then POST /api/v1/get_info.
- ``forward(data, loss_fn)`` / ``forward_backward(data, loss_fn)``: POST
  /api/v1/forward_backward (protobuf body, ``forward_only`` for forward; a
  future -> ForwardBackwardOutput as protobuf).
- ``optim_step(AdamParams)``: POST /api/v1/optim_step (future -> OptimStepResponse).
- ``save_weights_for_sampler(name)``: POST /api/v1/save_weights_for_sampler
  with ``path`` (future -> path ``tinker://<run>/sampler_weights/<name>``);
  ``save_weights_and_get_sampling_client()``: the same without ``path`` but
  with ``sampling_session_seq_id`` (future -> ``sampling_session_id``).
- ``save_state(name)``: POST /api/v1/save_weights (future -> path
  ``tinker://<run>/weights/<name>``); ``load_state(path)`` /
  ``load_state_with_optimizer(path)``: POST /api/v1/load_weights (future).
- ``create_sampling_client(model_path | base_model)``: POST
  /api/v1/create_sampling_session.
- ``SamplingClient.sample(prompt, num_samples, sampling_params)``: POST
  /api/v1/asample (future -> SampleResponse as protobuf);
  ``compute_logprobs(prompt)``: the same with ``prompt_logprobs`` and
  ``max_tokens`` 1; ``get_base_model()``: GET /api/v1/samplers/{id}.
- every future: POST /api/v1/retrieve_future (long-polled here; a pending
  future answers ``{"type": "try_again"}``); GET /api/v1/healthz.

Not served (404 from aiohttp, or a clear 400): /api/v1/auth/token (JWT
exchange: the client config says API keys only), create_custom_loss and
``forward_backward_custom`` on the server, copy_weights, save_weights_external,
join_sampling_session, retrieve_futures, cancel, training_runs listings,
image/audio inputs, loss functions other than cross_entropy,
importance_sampling and ppo.

Auth: every route but healthz needs ``X-API-Key`` naming a configured key
(else 401); a key sees only its own sessions, runs, sampling sessions,
checkpoints and futures (another key's id reads as absent: 404).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from services.gateway import codec
from services.gateway.auth import API_KEY_HEADER, ApiKeys
from services.gateway.config import GatewayConfig
from services.gateway.futures import FutureStore, OpFailed, Outcome
from services.gateway.limits import Release, Shares
from services.gateway.runs import (
    SAMPLER_SEGMENT,
    STATE_SEGMENT,
    Registry,
    Run,
    SamplingSession,
    TinkerPath,
    new_run_id,
    parse_tinker_path,
)
from shared.tinker_messages import (
    AdamParams,
    Datum,
    TinkerOp,
    TinkerOpResult,
    TinkerSampleRequest,
    TinkerSampleResult,
    TinkerSampling,
    is_checkpoint_name,
)

PROTO_CONTENT_TYPE = "application/x-protobuf"
OWNER_KEY = web.RequestKey("owner", str)
MAX_PROMPT_TOKENS_DEFAULT = 2048


class Backend(Protocol):
    """Where ops go: the trainer (``op``) and the rollout (``sample``).
    Each call publishes at once; the awaitable it returns is the reply."""

    async def op(self, op: TinkerOp) -> Awaitable[TinkerOpResult]: ...

    async def sample(self, request: TinkerSampleRequest) -> Awaitable[TinkerSampleResult]: ...


@dataclass
class Gateway:
    config: GatewayConfig
    keys: ApiKeys
    backend: Backend
    registry: Registry
    futures: FutureStore
    shares: Shares = field(default_factory=Shares)

    @property
    def tokenizer_id(self) -> str:
        return self.config.tokenizer_id or self.config.base_model


# ---------------------------------------------------------------- helpers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    body = json.dumps({"error": message, "detail": message})
    return {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
            413: web.HTTPRequestEntityTooLarge, 429: web.HTTPTooManyRequests}[status](
        text=body, content_type="application/json", headers=headers)


# ---------------------------------------------------------------- shares (limits.py)


def _op_slot(gateway: Gateway, request: web.Request) -> Release:
    """One of the key's ops in flight, or a 429 the SDK retries after Retry-After."""
    limit = gateway.config.gateway_max_pending_ops_per_key
    release = gateway.shares.ops.take(_owner(request), limit)
    if release is None:
        raise _error(429, f"this API key has {limit} ops in flight, the most allowed "
                          f"(gateway_max_pending_ops_per_key); wait for some to finish",
                     headers={"Retry-After": str(gateway.config.gateway_retry_after_s)})
    return release


def _run_slot(gateway: Gateway, request: web.Request) -> Release:
    """One more training run for the key, or a 403 (a hard quota: not retried)."""
    owner = _owner(request)
    limit = gateway.config.gateway_max_runs_per_key
    release = gateway.shares.creating_runs.take(owner, limit, already=len(gateway.registry.runs_of(owner)))
    if release is None:
        raise _error(403, f"this API key holds {limit} training runs, the most allowed "
                          f"(gateway_max_runs_per_key): keep training the ones it has")
    return release


def _saved_count(run: Run) -> int:
    """The run's checkpoints on disk: its sampler versions and its distinct states."""
    return run.latest_version + len(run.state_names)


def _save_slot(gateway: Gateway, run: Run) -> Release:
    """One more checkpoint for the run, or a 403 (a hard quota: not retried)."""
    limit = gateway.config.gateway_max_checkpoints_per_run
    release = gateway.shares.saving.take(run.run_id, limit, already=_saved_count(run))
    if release is None:
        raise _error(403, f"model {run.run_id!r} has saved {limit} checkpoints (sampler weights and states), "
                          f"the most allowed (gateway_max_checkpoints_per_run); save a state under a name it "
                          f"has already to overwrite it")
    return release


def _no_release() -> None:
    return None


@contextlib.contextmanager
def _holding(*releases: Release) -> Iterator[list[Release]]:
    """Reservations a request takes: handed to its future (given back when it
    settles), or given back at once if the request fails before that."""
    try:
        yield list(releases)
    except BaseException:
        for release in releases:
            release()
        raise


async def _releasing(work: Awaitable[Outcome], held: list[Release]) -> Outcome:
    try:
        return await work
    finally:
        for release in held:
            release()


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise _error(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object")
    return body


def _int(body: dict[str, Any], name: str, default: int | None = None, low: int = 0, high: int = 2**31) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _error(400, f"{name} must be an integer in [{low}, {high}]")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _error(400, f"{name} must be a finite number")
    return float(value)


def _owner(request: web.Request) -> str:
    return request[OWNER_KEY]


def _run(gateway: Gateway, request: web.Request, model_id: Any) -> Run:
    run = gateway.registry.run(model_id, _owner(request))
    if run is None:
        raise _error(404, f"model {str(model_id)[:80]!r} not found")
    return run


async def _future(gateway: Gateway, request: web.Request, work: Awaitable[Outcome], model_id: str | None = None,
                  num_samples: int = 0, held: list[Release] | None = None) -> web.Response:
    """The UntypedAPIFuture reply; a sample's carries one sequence id per sample.
    ``held``: reservations given back when the future settles."""
    if held:
        work = _releasing(work, held)
    request_id = await gateway.futures.start(_owner(request), work, gateway.config.op_timeout_s)
    body: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        body["model_id"] = model_id
    if num_samples:
        body["sample_sequence_ids"] = [f"{request_id}-{i}" for i in range(num_samples)]
    return web.json_response(body)


def _new_op_id() -> str:
    return "op-" + uuid.uuid4().hex


async def _reply(pending: Awaitable[TinkerOpResult]) -> TinkerOpResult:
    result = await pending
    if not result.ok:
        raise OpFailed(result.error or f"{result.op} failed", "server" if result.error_kind == "server" else "user")
    return result


def _tokens_of(model_input: Any, what: str, limit: int) -> list[int]:
    """A ModelInput as JSON ({"chunks": [{"type": "encoded_text", "tokens": [...]}]}) -> token ids."""
    chunks = model_input.get("chunks") if isinstance(model_input, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise _error(400, f"{what}: expected a ModelInput with chunks")
    tokens: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise _error(400, f"{what}: only token (encoded_text) chunks are supported")
        values = chunk.get("tokens")
        if not isinstance(values, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                    0 <= t < 2**31 for t in values):
            raise _error(400, f"{what}: tokens must be a list of non-negative integers")
        tokens.extend(values)
    if not tokens or len(tokens) > limit:
        raise _error(400, f"{what}: between 1 and {limit} tokens")
    return tokens


# ---------------------------------------------------------------- auth


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    if request.path.rstrip("/") == "/api/v1/healthz":
        return await handler(request)
    gateway: Gateway = request.app[GATEWAY_KEY]
    owner = gateway.keys.owner_of(request.headers.get(API_KEY_HEADER))
    if owner is None:
        raise _error(401, f"missing or unknown API key (send it in {API_KEY_HEADER})")
    request[OWNER_KEY] = owner
    return await handler(request)


# ---------------------------------------------------------------- plain endpoints


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def client_config(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    # API keys only (no JWT exchange), no compression, one retrieve_future per request.
    return web.json_response({"pjwt_auth_enabled": False, "credential_default_source": "api_key",
                              "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                              "custom_loss_server_side": False, "sample_join_sampling_session": False,
                              "use_pyqwest_transport": False, "parallel_fwdbwd_chunks": False,
                              "fwdbwd_max_chunk_len": gateway.config.gateway_max_datums_per_op})


async def client_dynamic_config(request: web.Request) -> web.Response:
    return web.json_response({"refresh_interval_sec": 300, "sample_cancel_enabled": False})


async def capabilities(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    return web.json_response({"supported_models": [{
        "model_name": gateway.config.base_model, "max_context_length": gateway.config.max_context_length,
        "trainable": True, "sampleable": True}]})


async def create_session(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    await _json_body(request)
    session_id = await gateway.registry.add_session(_owner(request))
    return web.json_response({"type": "create_session", "session_id": session_id})


async def session_heartbeat(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    if not gateway.registry.session_owned(body.get("session_id"), _owner(request)):
        raise _error(404, "session not found")
    return web.json_response({"type": "session_heartbeat"})


async def telemetry(request: web.Request) -> web.Response:
    await request.read()  # accepted and dropped: nothing leaves the deployment
    return web.json_response({"status": "accepted"})


async def get_info(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    run = _run(gateway, request, body.get("model_id"))
    return web.json_response({"type": "get_info", "model_id": run.run_id, "is_lora": True, "lora_rank": run.lora_rank,
                              "model_data": {"arch": "causal_lm", "model_name": run.base_model,
                                             "tokenizer_id": gateway.tokenizer_id}})


async def get_sampler(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    session = gateway.registry.sampling(request.match_info["sampler_id"], _owner(request))
    if session is None:
        raise _error(404, "sampler not found")
    return web.json_response({"sampler_id": session.session_id, "base_model": session.base_model,
                              "model_path": session.model_path})


# ---------------------------------------------------------------- training


async def create_model(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    owner = _owner(request)
    if not gateway.registry.session_owned(body.get("session_id"), owner):
        raise _error(404, "session not found")
    if body.get("base_model") != gateway.config.base_model:
        raise _error(400, f"base_model must be {gateway.config.base_model!r} (see get_server_capabilities)")
    lora = body.get("lora_config") or {}
    if not isinstance(lora, dict):
        raise _error(400, "lora_config must be an object")
    rank = _int(lora, "rank", gateway.config.lora_rank, 1, gateway.config.lora_rank)
    seed = lora.get("seed")
    seed = _int(lora, "seed", 0, 0, 2**31 - 1) if seed is not None else 0
    run = Run(run_id=new_run_id(), owner=owner, lora_rank=rank, base_model=gateway.config.base_model)
    with _holding(_run_slot(gateway, request)) as held, _holding(_op_slot(gateway, request)) as held_op:
        pending = await gateway.backend.op(TinkerOp(op_id=_new_op_id(), run_id=run.run_id, op="create",
                                                    lora_rank=rank, seed=seed, ts=time.time()))

        async def work() -> Outcome:
            await _reply(pending)
            await gateway.registry.add_run(run)
            return {"type": "create_model", "model_id": run.run_id}

        return await _future(gateway, request, work(), run.run_id, held=held + held_op)


async def forward_backward(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    raw = codec.decompress(await request.read(), request.headers.get("Content-Encoding", ""))
    try:
        model_id, loss_fn, forward_only, data, loss_config = codec.parse_forward_backward(raw)
    except codec.BadRequest as exc:
        raise _error(400, str(exc)) from None
    run = _run(gateway, request, model_id)
    _check_lengths(gateway, data)
    op = TinkerOp(op_id=_new_op_id(), run_id=run.run_id, op="forward" if forward_only else "forward_backward",
                  data=data, loss_fn=loss_fn, loss_fn_config=loss_config, ts=time.time())  # type: ignore[arg-type]
    with _holding(_op_slot(gateway, request)) as held:
        pending = await gateway.backend.op(op)

        async def work() -> Outcome:
            result = await _reply(pending)
            return codec.forward_backward_output(result.loss_fn_outputs, result.metrics)

        return await _future(gateway, request, work(), run.run_id, held=held)


def _check_lengths(gateway: Gateway, data: list[Datum]) -> None:
    max_datums, max_tokens = gateway.config.gateway_max_datums_per_op, gateway.config.gateway_max_tokens_per_op
    if len(data) > max_datums:
        raise _error(400, f"{len(data)} datums in one request, over gateway_max_datums_per_op {max_datums} "
                          "(split the batch; the SDK does, told by client/config)")
    total_tokens = sum(len(datum.model_input) for datum in data)
    if total_tokens > max_tokens:
        raise _error(400, f"{total_tokens} input tokens in one request, over gateway_max_tokens_per_op "
                          f"{max_tokens} (split the batch)")
    for i, datum in enumerate(data):
        if len(datum.model_input) > gateway.config.max_context_length:
            raise _error(400, f"data[{i}]: {len(datum.model_input)} tokens, over max_context_length "
                              f"{gateway.config.max_context_length}")
        for name, tensor in datum.loss_fn_inputs.items():
            if len(tensor.data) != len(datum.model_input) and not tensor.shape:
                raise _error(400, f"data[{i}]: loss_fn_inputs[{name!r}] has {len(tensor.data)} values for "
                                  f"{len(datum.model_input)} input tokens")


def _adam(body: dict[str, Any]) -> AdamParams:
    params = body.get("adam_params", body.get("optim_params"))
    if not isinstance(params, dict):
        raise _error(400, "optim_step needs adam_params (other optimizers are not supported)")
    known = {"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}
    values = {k: _number(v, f"adam_params.{k}") for k, v in params.items() if k in known}
    if values.get("learning_rate", 1e-4) < 0 or not 0 <= values.get("beta1", 0.9) < 1 or \
            not 0 <= values.get("beta2", 0.95) < 1 or values.get("eps", 1e-12) <= 0:
        raise _error(400, "adam_params: learning_rate >= 0, beta1 and beta2 in [0, 1), eps > 0")
    return AdamParams(**values)


async def optim_step(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    run = _run(gateway, request, body.get("model_id"))
    adam = _adam(body)
    with _holding(_op_slot(gateway, request)) as held:
        pending = await gateway.backend.op(TinkerOp(op_id=_new_op_id(), run_id=run.run_id, op="optim_step",
                                                    adam=adam, ts=time.time()))

        async def work() -> Outcome:
            result = await _reply(pending)
            return {"type": "optim_step", "metrics": result.metrics}

        return await _future(gateway, request, work(), run.run_id, held=held)


def _checkpoint_name(body: dict[str, Any], field: str = "path") -> str:
    name = body.get(field)
    if not isinstance(name, str) or not is_checkpoint_name(name):
        raise _error(400, f"{field} must be a checkpoint name: letters, digits, '_', '-', '.', at most 64")
    return name


async def save_weights_for_sampler(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    run = _run(gateway, request, body.get("model_id"))
    name = _checkpoint_name(body) if body.get("path") is not None else ""
    with _holding(_save_slot(gateway, run)) as held, _holding(_op_slot(gateway, request)) as held_op:
        pending = await gateway.backend.op(TinkerOp(op_id=_new_op_id(), run_id=run.run_id, op="save_weights",
                                                    name=name, ts=time.time()))

        async def work() -> Outcome:
            result = await _reply(pending)
            run.latest_version = max(run.latest_version, result.adapter_version)
            if name:
                run.sampler_paths[name] = result.adapter_version
            await gateway.registry.add_run(run)  # stored before the client learns the path
            if name:
                return {"type": "save_weights_for_sampler",
                        "path": TinkerPath(run.run_id, SAMPLER_SEGMENT, name).text}
            session_id = await gateway.registry.add_sampling(run.owner, run.run_id, result.adapter_version, None,
                                                             run.base_model)
            return {"type": "save_weights_for_sampler", "sampling_session_id": session_id}

        return await _future(gateway, request, work(), run.run_id, held=held + held_op)


async def save_weights(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    run = _run(gateway, request, body.get("model_id"))
    name = _checkpoint_name(body) if body.get("path") is not None else f"state-{int(time.time() * 1000)}"
    save_release = _no_release if name in run.state_names else _save_slot(gateway, run)  # same name: overwritten
    with _holding(save_release) as held, _holding(_op_slot(gateway, request)) as held_op:
        pending = await gateway.backend.op(TinkerOp(op_id=_new_op_id(), run_id=run.run_id, op="save_state",
                                                    name=name, ts=time.time()))

        async def work() -> Outcome:
            await _reply(pending)
            run.state_names.add(name)
            await gateway.registry.add_run(run)
            return {"type": "save_weights", "path": TinkerPath(run.run_id, STATE_SEGMENT, name).text}

        return await _future(gateway, request, work(), run.run_id, held=held + held_op)


async def load_weights(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    owner = _owner(request)
    path = parse_tinker_path(body.get("path"))
    source = gateway.registry.state_of(path, owner) if path is not None else None
    if path is None or source is None:
        raise _error(404, f"checkpoint {str(body.get('path'))[:120]!r} not found")
    with_optimizer = bool(body.get("optimizer", False))
    alias = ""
    if body.get("model_id") is not None:
        run = _run(gateway, request, body.get("model_id"))
        created = False
    else:  # ServiceClient.create_training_client_from_state: a new run from the checkpoint
        session_id = body.get("session_id")
        if not gateway.registry.session_owned(session_id, owner):
            raise _error(404, "session not found")
        alias = f"{session_id}:train:{_int(body, 'model_seq_id', None, 0, 2**31)}"  # the SDK's own name for it
        if gateway.registry.run(alias, owner) is not None:
            raise _error(400, f"model {alias!r} exists already")
        run = Run(run_id=new_run_id(), owner=owner, lora_rank=source.lora_rank, base_model=source.base_model)
        created = True
    run_release = _run_slot(gateway, request) if created else _no_release
    with _holding(run_release) as held, _holding(_op_slot(gateway, request)) as held_op:
        pending = await gateway.backend.op(TinkerOp(
            op_id=_new_op_id(), run_id=run.run_id, op="load_state", name=path.name, source_run_id=source.run_id,
            with_optimizer=with_optimizer, ts=time.time()))

        async def work() -> Outcome:
            await _reply(pending)
            if created:
                await gateway.registry.add_run(run)
                await gateway.registry.add_alias(alias, run.run_id)
            return {"type": "load_weights", "path": path.text, "model_id": run.run_id}

        return await _future(gateway, request, work(), run.run_id, held=held + held_op)


# ---------------------------------------------------------------- sampling


async def create_sampling_session(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    owner = _owner(request)
    if not gateway.registry.session_owned(body.get("session_id"), owner):
        raise _error(404, "session not found")
    model_path = body.get("model_path")
    if model_path is not None:
        path = parse_tinker_path(model_path)
        found = gateway.registry.sampler_version(path, owner) if path is not None else None
        if path is None or found is None:
            raise _error(404, f"sampler weights {str(model_path)[:120]!r} not found")
        run, version = found
        session_id = await gateway.registry.add_sampling(owner, run.run_id, version, path.text, run.base_model)
    else:
        if body.get("base_model") != gateway.config.base_model:
            raise _error(400, f"base_model must be {gateway.config.base_model!r}")
        session_id = await gateway.registry.add_sampling(owner, new_run_id(), 0, None, gateway.config.base_model)
    return web.json_response({"type": "create_sampling_session", "sampling_session_id": session_id})


def _sampling(gateway: Gateway, params: Any) -> TinkerSampling:
    if not isinstance(params, dict):
        raise _error(400, "sampling_params must be an object")
    max_tokens = params.get("max_tokens")
    max_tokens = gateway.config.default_sample_tokens if max_tokens is None else \
        _int(params, "max_tokens", None, 1, gateway.config.max_sample_tokens)
    temperature = _number(params.get("temperature", 1.0), "temperature")
    top_p = _number(params.get("top_p", 1.0), "top_p")
    top_k = params.get("top_k", -1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise _error(400, "top_k must be an integer >= -1")
    seed = params.get("seed")
    if seed is not None:
        seed = _int(params, "seed", None, 0, 2**63 - 1)
    if temperature < 0 or not 0 < top_p <= 1:
        raise _error(400, "temperature >= 0 and top_p in (0, 1]")
    stop = params.get("stop")
    stop_strings: list[str] = []
    stop_tokens: list[int] = []
    if isinstance(stop, str):
        stop_strings = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_strings = stop
    elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        stop_tokens = stop
    elif stop is not None:
        raise _error(400, "stop must be a string, a list of strings or a list of token ids")
    if len(stop_strings) + len(stop_tokens) > 16 or any(len(s) > 256 or not s for s in stop_strings):
        raise _error(400, "at most 16 stops, each a non-empty string of at most 256 characters")
    return TinkerSampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                          stop=stop_strings, stop_token_ids=stop_tokens, seed=seed)


async def asample(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    owner = _owner(request)
    session = gateway.registry.sampling(body.get("sampling_session_id"), owner)
    if session is None:
        raise _error(404, "sampling session not found (create one with create_sampling_client)")
    for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        if body.get(unsupported):
            raise _error(400, f"{unsupported} is not supported")
    if body.get("target_prompt_logprobs") is not None or body.get("record_stability_info"):
        raise _error(400, "target_prompt_logprobs and record_stability_info are not supported")
    prompt = _tokens_of(body.get("prompt"), "prompt", gateway.config.max_context_length)
    num_samples = _int(body, "num_samples", 1, 1, gateway.config.max_num_samples)
    sampling = _sampling(gateway, body.get("sampling_params"))
    with_prompt_logprobs = bool(body.get("prompt_logprobs"))
    with _holding(_op_slot(gateway, request)) as held:
        return await _sample(gateway, request, session, prompt, num_samples, sampling, with_prompt_logprobs, held)


async def _sample(gateway: Gateway, request: web.Request, session: SamplingSession, prompt: list[int], num_samples: int,
                  sampling: TinkerSampling, with_prompt_logprobs: bool, held: list[Release]) -> web.Response:
    """Publishes the sample (and the prompt logprobs op) of an admitted asample."""
    sample_pending = await gateway.backend.sample(TinkerSampleRequest(
        request_id="smp-" + uuid.uuid4().hex, run_id=session.run_id, adapter_version=session.adapter_version,
        prompt_token_ids=prompt, num_samples=num_samples, sampling=sampling, ts=time.time()))
    logprobs_pending = None
    if with_prompt_logprobs:
        logprobs_pending = await gateway.backend.op(TinkerOp(
            op_id=_new_op_id(), run_id=session.run_id, op="compute_logprobs",
            data=[Datum(model_input=prompt)], adapter_version=session.adapter_version, ts=time.time()))

    async def work() -> Outcome:
        result = await sample_pending
        if result.error is not None:
            raise OpFailed(result.error)
        prompt_logprobs = None
        if logprobs_pending is not None:
            outputs = (await _reply(logprobs_pending)).loss_fn_outputs
            if not outputs or "logprobs" not in outputs[0]:
                raise OpFailed("the trainer returned no prompt logprobs", "server")
            prompt_logprobs = [float(v) for v in outputs[0]["logprobs"].data]
        return codec.sample_response(result.sequences, prompt_logprobs)

    return await _future(gateway, request, work(), num_samples=num_samples, held=held)


# ---------------------------------------------------------------- futures


async def retrieve_future(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await _json_body(request)
    record = await gateway.futures.find(body.get("request_id"), _owner(request))
    if record is None:
        raise _error(404, "future not found")
    if not await gateway.futures.wait(record, gateway.config.poll_wait_s):
        return web.json_response({"type": "try_again", "request_id": record.request_id, "queue_state": "active"})
    if record.error is not None:
        return web.json_response({"error": record.error, "category": record.category})
    if record.proto is not None:
        return web.Response(body=record.proto, content_type=PROTO_CONTENT_TYPE)
    return web.json_response(record.json)


# ---------------------------------------------------------------- app


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[auth_middleware], client_max_size=gateway.config.max_body_bytes)
    app[GATEWAY_KEY] = gateway
    v1 = "/api/v1"
    app.router.add_get(f"{v1}/healthz", healthz)
    app.router.add_post(f"{v1}/client/config", client_config)
    app.router.add_post(f"{v1}/client/dynamic_config", client_dynamic_config)
    app.router.add_get(f"{v1}/get_server_capabilities", capabilities)
    app.router.add_post(f"{v1}/create_session", create_session)
    app.router.add_post(f"{v1}/session_heartbeat", session_heartbeat)
    app.router.add_post(f"{v1}/telemetry", telemetry)
    app.router.add_post(f"{v1}/create_model", create_model)
    app.router.add_post(f"{v1}/get_info", get_info)
    app.router.add_post(f"{v1}/forward_backward", forward_backward)
    app.router.add_post(f"{v1}/optim_step", optim_step)
    app.router.add_post(f"{v1}/save_weights_for_sampler", save_weights_for_sampler)
    app.router.add_post(f"{v1}/save_weights", save_weights)
    app.router.add_post(f"{v1}/load_weights", load_weights)
    app.router.add_post(f"{v1}/create_sampling_session", create_sampling_session)
    app.router.add_get(f"{v1}/samplers/{{sampler_id}}", get_sampler)
    app.router.add_post(f"{v1}/asample", asample)
    app.router.add_post(f"{v1}/retrieve_future", retrieve_future)
    return app
