"""Tinker API operations on the trainer (stream ``tinker_ops``).

A Tinker run is a tenant of the trainer's ``TenantBank``: its adapter and
Adam moments are swapped in and out exactly like a scheduler experiment's.
What a run has on top, kept here: the gradient it accumulates over
``forward_backward`` calls until ``optim_step``. That gradient lives in this
module (one tensor per LoRA factor, in the run's own shape), never in the
model's ``.grad``: a scheduler train step in between clears those.

Losses (Tinker's, summed over tokens and data; position i of a datum's
``model_input`` predicts ``target_tokens[i]``):

- ``cross_entropy``: ``-weights * logp``
- ``importance_sampling``: ``-exp(logp - q) * A``
- ``ppo``: ``-min(r * A, clip(r, low, high) * A)``, ``r = exp(logp - q)``

``save_weights`` writes the run's next immutable version to the adapter
store (the writer scheduler experiments use) and the service announces it
on ``adapters``; the run's versions are never pruned (sampling clients may
hold any of them). ``save_state`` / ``load_state``: adapter + Adam state as
safetensors under ``<data_dir>/tinker_states/<run>/<name>/`` with a JSON
sidecar (shape, step count, sha256 of both files); written to a temporary
directory, fsynced, renamed.

Every op is answered by a ``TinkerOpResult``; a bad op gets ``ok`` False
and the reason, and changes nothing. An op id already answered (a
redelivery) gets the same result again without running twice.

Runs live in memory (``release`` frees one). After a trainer restart a run
comes back from its newest saved version (``save_weights``) with fresh Adam
moments and no accumulated gradient; ``save_state`` / ``load_state`` is the
way to keep everything.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from services.trainer import grpo
from services.trainer.tenants import ADAM_BETAS, ADAM_EPS, TenantState, cpu_copies, live_part, same_shape
from shared.adapters import AdapterStoreError, fsync_dir, fsync_file
from shared.engine import LoraSignature
from shared.messages import AdapterPublished, TrainStats, is_experiment_id, now
from shared.tinker_messages import AdamParams, Datum, TensorData, TinkerOp, TinkerOpResult, is_checkpoint_name

CONSUMER_GROUP = "trainer-tinker"
STATES_DIR = "tinker_states"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SIDECAR_FILE = "state.json"
LOSS_INPUTS = {
    "cross_entropy": ({"target_tokens"}, {"weights"}),  # (required, optional)
    "importance_sampling": ({"target_tokens", "logprobs", "advantages"}, set()),
    "ppo": ({"target_tokens", "logprobs", "advantages"}, set()),
}
ANSWERS_KEPT = 4096  # results remembered by op id, so a redelivered op is answered, not run again
MAX_OP_ID_CHARS = 128
PPO_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}

log = structlog.get_logger(__name__)


def is_op_id(value: str) -> bool:
    return 0 < len(value) <= MAX_OP_ID_CHARS and value.isprintable()


class OpRefused(ValueError):
    """An op that cannot be done as asked; the text says why (a user error)."""


async def on_tinker_op(service, op: TinkerOp, entry) -> None:
    """The trainer service's handler of ``tinker_ops``: run the op in the
    model thread, announce a saved version, then answer."""
    with structlog.contextvars.bound_contextvars(run_id=op.run_id, op_id=op.op_id, op=op.op):
        result, published = await service._in_model_thread(service.tinker.run, op, service.consumer_name)
        for message in published:
            await service.bus.publish(message)
        if not result.ok:
            service.log.info("tinker_op_refused", error=result.error, error_kind=result.error_kind)
        await service.bus.publish(result)


def checked_names_root(root: Path, run_id: str, name: str) -> Path:
    """``root/<run>/<name>`` after validating both parts (never a path from a message)."""
    if not is_experiment_id(run_id):
        raise OpRefused(f"run id {run_id!r} is not a valid id")
    if not is_checkpoint_name(name):
        raise OpRefused(f"checkpoint name {name!r} is not valid (letters, digits, '_', '-', '.'; up to 64)")
    return root / run_id / name


class TinkerRuns:
    """Executes ``TinkerOp``s on a ``TrainerCore`` (in its model thread)."""

    def __init__(self, core, states_root: Path) -> None:
        self.core = core
        self.bank = core.bank
        self.states_root = states_root
        self.grads: dict[str, dict[str, torch.Tensor]] = {}  # run -> accumulated gradient, run's own shape
        self.published: list[AdapterPublished] = []  # by the op being run (save_weights)
        self.answered: OrderedDict[str, TinkerOpResult] = OrderedDict()  # op id -> result, newest last

    def run(self, op: TinkerOp, worker: str = "") -> tuple[TinkerOpResult, list[AdapterPublished]]:
        """The op's result and the versions it published (to announce). An op
        id answered already (a redelivery) gets its first result again and is
        not run twice: a gradient is never accumulated twice."""
        if op.op_id in self.answered:
            return self.answered[op.op_id], []
        self.published = []
        result = self.handle(op, worker)
        if is_op_id(op.op_id):
            self.answered[op.op_id] = result
            while len(self.answered) > ANSWERS_KEPT:
                self.answered.popitem(last=False)
        return result, self.published

    # ------------------------------------------------------------ dispatch

    def handle(self, op: TinkerOp, worker: str = "") -> TinkerOpResult:
        result = TinkerOpResult(op_id=op.op_id, run_id=op.run_id, op=op.op, ok=True, trainer=worker)
        try:
            if not is_op_id(op.op_id):
                raise OpRefused(f"op id of {len(op.op_id)} characters: 1 to {MAX_OP_ID_CHARS} printable ones")
            if not is_experiment_id(op.run_id):
                raise OpRefused(f"run id {op.run_id!r} is not a valid id")
            getattr(self, f"_op_{op.op}")(op, result)
        except (ValueError, AdapterStoreError) as exc:  # OpRefused, ShapeMismatch, a bad stored version
            result.ok, result.error, result.error_kind = False, str(exc), "user"
        except Exception as exc:  # ours (disk, torch, a bug): answered, so the gateway's future ends, never retried
            log.exception("tinker_op_failed", run_id=op.run_id, op=op.op)
            result.ok, result.error, result.error_kind = False, f"{type(exc).__name__}: {exc}", "server"
        if result.ok and op.run_id in self.bank.tenants:
            state = self.bank.get(op.run_id)
            result.lora_rank = state.shape.rank
            if op.op != "save_weights":
                result.adapter_version = self.core.store.latest_version(op.run_id)
        result.ts = now()
        return result

    def _run(self, run_id: str) -> TenantState:
        state = self.bank.tenants.get(run_id) or self.bank.restore(run_id)
        if state is None:
            raise OpRefused(f"run {run_id!r} does not exist (create it first)")
        return state

    # ------------------------------------------------------------ ops

    def _op_create(self, op: TinkerOp, result: TinkerOpResult) -> None:
        if self.bank.has(op.run_id) or self.core.store.latest_version(op.run_id) > 0:
            raise OpRefused(f"run {op.run_id!r} already exists")
        shape = self.core.signature.tenant_shape(op.lora_rank, None, None)
        if problems := self.core.signature.shape_problems(shape):
            raise OpRefused("; ".join(problems))
        self.bank.register(op.run_id, op.seed, shape)

    def _op_release(self, op: TinkerOp, result: TinkerOpResult) -> None:
        self.grads.pop(op.run_id, None)
        self.bank.forget(op.run_id)

    def _op_forward(self, op: TinkerOp, result: TinkerOpResult) -> None:
        self._run(op.run_id)
        self._forward(op, result, backward=False)

    def _op_forward_backward(self, op: TinkerOp, result: TinkerOpResult) -> None:
        self._run(op.run_id)
        self._forward(op, result, backward=True)

    def _op_optim_step(self, op: TinkerOp, result: TinkerOpResult) -> None:
        state = self._run(op.run_id)
        adam = op.adam or AdamParams()
        check_adam(adam)
        grads = self.grads.pop(op.run_id, None) or {}
        self.bank.swap_in(op.run_id)
        params = self.bank.params
        for name, param in params.items():
            param.grad = torch.zeros_like(param)
            if name in grads:
                live_part(name, param.grad, state.shape.rank).copy_(grads[name])
        result.metrics["grad_norm"] = self._clip(adam.grad_clip_norm)
        self._adam_step(adam)
        self.bank.optimizer.zero_grad(set_to_none=True)

    def _op_save_weights(self, op: TinkerOp, result: TinkerOpResult) -> None:
        state = self._run(op.run_id)
        store = self.core.store
        version = store.latest_version(op.run_id) + 1
        path, digest = store.write_version(op.run_id, version, self.bank.adapter_tensors(op.run_id), state.shape,
                                           self.core.base_model)
        self.bank.set_version(op.run_id, version)
        result.adapter_version, result.name = version, op.name
        self.published.append(AdapterPublished(
            experiment_id=op.run_id, version=version, step=version, path=str(path), digest=digest,
            stats=TrainStats(), trainer=result.trainer, ts=now()))

    def _op_save_state(self, op: TinkerOp, result: TinkerOpResult) -> None:
        state = self._run(op.run_id)
        final = checked_names_root(self.states_root, op.run_id, op.name)
        moments, adam_step = self.bank.optimizer_tensors(op.run_id)
        adapter = cpu_copies(self.bank.adapter_tensors(op.run_id))
        optimizer = cpu_copies(moments)
        write_state(final, adapter, optimizer, {
            "rank": state.shape.rank, "alpha": state.shape.alpha, "target_modules": list(state.shape.target_modules),
            "adam_step": adam_step})
        result.name = op.name

    def _op_load_state(self, op: TinkerOp, result: TinkerOpResult) -> None:
        source = op.source_run_id if op.source_run_id is not None else op.run_id
        adapter, optimizer, sidecar = read_state(checked_names_root(self.states_root, source, op.name))
        shape = LoraSignature(rank=int(sidecar["rank"]), alpha=float(sidecar["alpha"]),
                              target_modules=tuple(sidecar["target_modules"]))
        existing = self.bank.tenants.get(op.run_id) or self.bank.restore(op.run_id)
        if existing is not None and not same_shape(existing.shape, shape):
            raise OpRefused(f"checkpoint {op.name!r} has rank {shape.rank}, run {op.run_id!r} rank "
                            f"{existing.shape.rank}")
        state = existing or self.bank.register(op.run_id, 0, shape)
        try:
            self._check_tensors(state, adapter, optimizer if op.with_optimizer else None)
        except OpRefused:
            if existing is None:
                self.bank.forget(op.run_id)  # refused: the run is not created either
            raise
        if self.bank.active == op.run_id:
            self.bank.swap_out()
        for name in state.weights:
            state.weights[name].copy_(adapter[name])
            if op.with_optimizer:
                state.exp_avg[name].copy_(optimizer[f"exp_avg/{name}"])
                state.exp_avg_sq[name].copy_(optimizer[f"exp_avg_sq/{name}"])
            else:
                state.exp_avg[name].zero_()
                state.exp_avg_sq[name].zero_()
        state.adam_step = int(sidecar["adam_step"]) if op.with_optimizer else 0
        self.grads.pop(op.run_id, None)
        result.name = op.name

    def _op_compute_logprobs(self, op: TinkerOp, result: TinkerOpResult) -> None:
        """Version 0 is the base model: no run needed (a base-model sampling client has none)."""
        self._check_data(op.data, None)
        if op.adapter_version == 0:
            with torch.no_grad(), self.core.model.disable_adapter():
                result.loss_fn_outputs = [self._prompt_logprobs(datum.model_input) for datum in op.data]
            return
        state = self._run(op.run_id)
        weights = self._version_weights(op.run_id, op.adapter_version, state)
        self.bank.swap_in(op.run_id)
        saved = {n: live_part(n, self.bank.params[n], state.shape.rank).detach().clone() for n in state.weights}
        try:
            with torch.no_grad():
                self._set_live(state, weights)
                result.loss_fn_outputs = [self._prompt_logprobs(datum.model_input) for datum in op.data]
        finally:
            self._set_live(state, saved)

    def _prompt_logprobs(self, tokens: list[int]) -> dict[str, TensorData]:
        """Each token's log-probability given the ones before it; the first NaN."""
        logprobs = [math.nan]
        if len(tokens) > 1:
            logprobs += self._logprobs(tokens[:-1], tokens[1:]).tolist()
        return {"logprobs": TensorData(data=logprobs)}

    # ------------------------------------------------------------ model work

    def _forward(self, op: TinkerOp, result: TinkerOpResult, backward: bool) -> None:
        self._check_data(op.data, op.loss_fn)
        config = loss_config(op)
        self.bank.swap_in(op.run_id)
        state = self.bank.get(op.run_id)
        optimizer = self.bank.optimizer
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        outputs = []
        with torch.set_grad_enabled(backward):
            for datum in op.data:
                logp = self._logprobs(datum.model_input, _ints(datum.loss_fn_inputs["target_tokens"]))
                elementwise = elementwise_loss(op.loss_fn, logp, datum, config)
                loss = elementwise.sum()
                if not math.isfinite(loss.item()):
                    optimizer.zero_grad(set_to_none=True)
                    raise OpRefused("the loss is not finite; no gradient was added")
                if backward:
                    loss.backward()
                total += loss.item()
                outputs.append({"logprobs": TensorData(data=logp.detach().float().cpu().tolist()),
                                "elementwise_loss": TensorData(data=elementwise.detach().float().cpu().tolist())})
        if backward:
            accumulated = dict(self.grads.get(op.run_id, {}))  # replaced whole: a failure half-way adds nothing
            for name in state.weights:
                grad = self.bank.params[name].grad
                if grad is None:
                    continue
                part = live_part(name, grad, state.shape.rank).detach().clone()
                accumulated[name] = accumulated[name] + part if name in accumulated else part
            self.grads[op.run_id] = accumulated
            optimizer.zero_grad(set_to_none=True)
        result.loss_fn_outputs = outputs
        result.metrics["loss:sum"] = total

    def _logprobs(self, input_ids: list[int], targets: list[int]) -> torch.Tensor:
        """Log-probability of each target token at its position (temperature 1)."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.bank.device)
        logits = self.core.model(input_ids=ids).logits[0]
        return grpo.token_logprobs(logits, torch.tensor(targets, dtype=torch.long, device=self.bank.device))

    def _clip(self, max_norm: float) -> float:
        params = list(self.bank.params.values())
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))

    def _adam_step(self, adam: AdamParams) -> None:
        """One step of Adam with decoupled weight decay (AdamW), the given
        hyperparameters; the bank's defaults are put back afterwards."""
        optimizer = self.bank.optimizer
        with torch.no_grad():
            if adam.weight_decay > 0:
                for param in self.bank.params.values():
                    param.mul_(1.0 - adam.learning_rate * adam.weight_decay)
        for group in optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps)
        try:
            optimizer.step()
        finally:
            for group in optimizer.param_groups:
                group.update(betas=ADAM_BETAS, eps=ADAM_EPS)

    def _set_live(self, state: TenantState, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in weights.items():
                live_part(name, self.bank.params[name], state.shape.rank).copy_(tensor)

    def _version_weights(self, run_id: str, version: int, state: TenantState) -> dict[str, torch.Tensor]:
        """The weights of saved version ``version`` (>= 1) of the run."""
        store = self.core.store
        if version < 1 or not store.is_complete(run_id, version):
            raise OpRefused(f"run {run_id!r} has no saved version {version}")
        stored = store.load_tensors(store.path(run_id, version))
        self._check_tensors(state, stored, None)
        return {name: stored[name] for name in state.weights}

    # ------------------------------------------------------------ checks

    def _check_tensors(self, state: TenantState, adapter: dict, optimizer: dict | None) -> None:
        for name, tensor in state.weights.items():
            if name not in adapter or adapter[name].shape != tensor.shape:
                raise OpRefused(f"saved weights lack {name} of shape {list(tensor.shape)}")
            if optimizer is not None:
                for key in (f"exp_avg/{name}", f"exp_avg_sq/{name}"):
                    if key not in optimizer or optimizer[key].shape != tensor.shape:
                        raise OpRefused(f"saved optimizer state lacks {key} of shape {list(tensor.shape)}")

    def _check_data(self, data: list[Datum], loss_fn: str | None) -> None:
        if not data:
            raise OpRefused("no data")
        vocab = self.core.vocab_size
        total = 0
        for index, datum in enumerate(data):
            problem = datum_problem(datum, loss_fn, vocab)
            if problem:
                raise OpRefused(f"datum {index}: {problem}")
            total += len(datum.model_input)
            if len(datum.model_input) > self.core.budget.max_packed_row_tokens:
                raise OpRefused(f"datum {index}: {len(datum.model_input)} tokens, over the trainer's "
                                f"max_packed_row_tokens {self.core.budget.max_packed_row_tokens}")
        if total > self.core.budget.max_train_tokens:
            raise OpRefused(f"{total} tokens, over the trainer's max_train_tokens {self.core.budget.max_train_tokens}")


def datum_problem(datum: Datum, loss_fn: str | None, vocab: int) -> str:
    """Why ``datum`` cannot be used with ``loss_fn`` ('' when it can; None: no loss, tokens only)."""
    tokens = datum.model_input
    if not tokens:
        return "model_input is empty"
    if min(tokens) < 0 or max(tokens) >= vocab:
        return f"a model_input token is outside the vocabulary [0, {vocab})"
    if loss_fn is None:
        return ""
    required, optional = LOSS_INPUTS[loss_fn]
    names = set(datum.loss_fn_inputs)
    if missing := required - names:
        return f"loss_fn_inputs lacks {sorted(missing)} (needed by {loss_fn})"
    if unknown := names - required - optional:
        return f"loss_fn_inputs has {sorted(unknown)}, not inputs of {loss_fn}"
    for name, tensor in datum.loss_fn_inputs.items():
        if len(tensor.data) != len(tokens) or (tensor.shape and tensor.shape != [len(tokens)]):
            return f"loss_fn_inputs[{name!r}] has {len(tensor.data)} values for {len(tokens)} input tokens"
        if not all(math.isfinite(value) for value in tensor.data):
            return f"loss_fn_inputs[{name!r}] has a value that is not finite"
    targets = datum.loss_fn_inputs["target_tokens"].data
    if any(not float(t).is_integer() or not 0 <= t < vocab for t in targets):
        return f"a target token is not an integer in [0, {vocab})"
    return ""


def check_adam(adam: AdamParams) -> None:
    values = [adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay, adam.grad_clip_norm]
    if not all(math.isfinite(v) for v in values):
        raise OpRefused("adam parameters must be finite")
    if adam.learning_rate < 0 or adam.eps < 0 or adam.weight_decay < 0 or adam.grad_clip_norm < 0:
        raise OpRefused("adam learning_rate, eps, weight_decay and grad_clip_norm must be >= 0")
    if not (0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1):
        raise OpRefused("adam beta1 and beta2 must be in [0, 1)")


def loss_config(op: TinkerOp) -> dict[str, float]:
    if op.loss_fn != "ppo":
        if op.loss_fn_config:
            raise OpRefused(f"{op.loss_fn} takes no loss_fn_config")
        return {}
    if unknown := set(op.loss_fn_config) - set(PPO_DEFAULTS):
        raise OpRefused(f"ppo loss_fn_config has unknown keys {sorted(unknown)}")
    config = {**PPO_DEFAULTS, **op.loss_fn_config}
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise OpRefused("ppo clip thresholds must be finite, low <= high")
    return config


def elementwise_loss(loss_fn: str, logp: torch.Tensor, datum: Datum, config: dict[str, float]) -> torch.Tensor:
    """The loss of each target token of ``datum`` (its sum is the datum's loss)."""
    inputs = datum.loss_fn_inputs

    def tensor(name: str) -> torch.Tensor:
        return torch.tensor(inputs[name].data, dtype=torch.float32, device=logp.device)

    logp = logp.float()
    if loss_fn == "cross_entropy":
        weights = tensor("weights") if "weights" in inputs else torch.ones_like(logp)
        return -weights * logp
    ratio = torch.exp(logp - tensor("logprobs"))
    advantages = tensor("advantages")
    if loss_fn == "importance_sampling":
        return -ratio * advantages
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _ints(tensor: TensorData) -> list[int]:
    return [int(value) for value in tensor.data]


# ---------------------------------------------------------------- state files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_state(final: Path, adapter: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
                sidecar: dict) -> None:
    """Both tensor files and the sidecar in a temporary directory, fsynced,
    then renamed to ``final`` (an older state of that name is replaced)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_file(adapter, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
        save_file(optimizer, str(staging / OPTIMIZER_FILE), metadata={"format": "pt"})
        for name in (ADAPTER_FILE, OPTIMIZER_FILE):
            fsync_file(staging / name)
        sidecar = {**sidecar, "sha256": {n: _sha256(staging / n) for n in (ADAPTER_FILE, OPTIMIZER_FILE)}}
        (staging / SIDECAR_FILE).write_text(json.dumps(sidecar))
        fsync_file(staging / SIDECAR_FILE)
        fsync_dir(staging)
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Adapter tensors, optimizer tensors and sidecar of a saved state; ``OpRefused`` when absent or damaged."""
    if not (path / SIDECAR_FILE).is_file():
        raise OpRefused(f"no saved state {path.name!r} of run {path.parent.name!r}")
    try:
        sidecar = json.loads((path / SIDECAR_FILE).read_text())
        for name in (ADAPTER_FILE, OPTIMIZER_FILE):
            if _sha256(path / name) != sidecar["sha256"][name]:
                raise OpRefused(f"saved state {path.name!r}: {name} does not match its recorded digest")
        return load_file(str(path / ADAPTER_FILE)), load_file(str(path / OPTIMIZER_FILE)), sidecar
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        if isinstance(exc, OpRefused):
            raise
        raise OpRefused(f"saved state {path.name!r} is unreadable: {type(exc).__name__}: {exc}") from exc
