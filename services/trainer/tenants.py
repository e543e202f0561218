"""Per-tenant training state around one PEFT model and one optimizer.

The trainer holds the base model once, with one set of LoRA parameters, and
one Adam optimizer over them. Each tenant's LoRA weights, Adam moments and
step count live in CPU memory (pinned when the model is on CUDA) while other
tenants train. ``swap_in(tenant)`` copies that tenant's tensors into the
model's LoRA parameters and the optimizer's state tensors, in place (no
re-allocation, no new optimizer); ``swap_out()`` copies them back. Nothing
but the active tenant's state is ever written, so one tenant's update never
touches another's.

Each tenant has its own LoRA shape (``LoraSignature``: rank, alpha, target
modules), up to the deployment's: the model's LoRA parameters have the
deployment's (largest) shape, and a tenant's factors sit in their leading
rows of A / columns of B, the rest and every module it does not target kept
at zero. That is exactly the tenant's adapter: zero rows of A and columns of
B add nothing to ``B @ A``, their gradients are zero (each is a product with
the other factor's zeros), so Adam never moves them. ``swap_in`` also sets
every LoRA layer's scaling to the tenant's ``alpha / r``. Its state, the
version it publishes and its checkpoint hold only its own tensors, in its
own shape.

A new tenant starts from PEFT's default init (A ~ kaiming-uniform, B = 0, so
version 0 is exactly the base model), seeded by tenant name and seed so a
run is reproducible. Checkpoints (``checkpoint``) hold the optimizer state
only, not the adapter weights (those are the store's version of the same
number): ``<checkpoint_root>/<tenant>/v<version>/optimizer.safetensors`` + a
JSON sidecar ``state.json`` (step count, version, sha256 of the tensors
file); never pickle. Both files and the directory are fsynced before the
rename that makes a checkpoint visible; the newest ``CHECKPOINTS_KEPT`` of a
tenant stay. ``restore`` rebuilds a tenant after a restart: adapter weights
exactly from the latest complete version in the store, Adam moments from the
newest checkpoint that validates (sidecar readable, digest matching, every
tensor present with its shape); a torn or corrupt one is logged, renamed
aside (``.unusable-v<n>-*``) and the one before it used; with none usable the
moments start fresh. With ``checkpoint_every`` > 1, or after such a fallback,
the moments may be a few steps older than the weights: a documented
approximation that only affects the moment estimates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.adapters import AdapterStore, check_tenant_name, fsync_dir, fsync_file
from shared.engine import LoraSignature
from shared.peft_files import DEFAULT_ADAPTER_NAME, parse_lora_key, saved_tensor_name

log = structlog.get_logger(__name__)

ADAM_BETAS = (0.9, 0.95)  # as in tinker-cookbook's RL loop: faster second-moment adaptation for short runs
ADAM_EPS = 1e-8
CHECKPOINT_WEIGHTS_FILE = "optimizer.safetensors"
CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_FORMAT = 2  # 2: the sidecar records the tensors file's sha256 (1: it does not)
CHECKPOINTS_KEPT = 2  # per tenant: the newest, and one to fall back to if it is torn
_CHECKPOINT_DIR = re.compile(r"v(\d+)")  # fullmatch
_HASH_CHUNK_BYTES = 1 << 20


class CheckpointInvalid(ValueError):
    """A checkpoint that cannot be used; the message says why."""


class ShapeMismatch(ValueError):
    """A tenant shape the model's LoRA parameters cannot hold, or one that
    differs from the shape the tenant already has; the message says why."""


@dataclass
class TenantState:
    """One tenant's state while it is not the active tenant. ``version`` is
    the adapter version these weights are (0 = base); ``shape`` its own
    LoRA shape; ``adam_step`` the number of optimizer steps taken. Tensor
    dicts are keyed by PEFT names, one entry per factor of a targeted module,
    in the tenant's shape (A [r, in], B [out, r])."""

    tenant: str
    version: int
    shape: LoraSignature
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    adam_step: int = 0


def lora_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters of ``peft_model``, by PEFT name."""
    params = {saved_tensor_name(name): p for name, p in peft_model.named_parameters() if "lora_" in name}
    if not params:
        raise ValueError("the model has no LoRA parameters")
    return params


def tenant_seed(tenant: str, seed: int) -> int:
    return zlib.crc32(f"{tenant}:{seed}".encode())


def same_shape(a: LoraSignature, b: LoraSignature) -> bool:
    return a.rank == b.rank and a.alpha == b.alpha and set(a.target_modules) == set(b.target_modules)


def describe_shape(shape: LoraSignature) -> str:
    return f"rank {shape.rank}, alpha {shape.alpha:g}, targets {sorted(shape.target_modules)}"


def live_part(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The view of a deployment-shaped factor that a rank-``rank`` tenant
    uses: A's first ``rank`` rows, B's first ``rank`` columns."""
    return tensor[:rank] if ".lora_A." in name else tensor[:, :rank]


def lora_layers(peft_model) -> list:
    """The PEFT LoRA layers of ``peft_model`` (each has a ``scaling`` per adapter)."""
    from peft.tuners.lora import LoraLayer

    return [module for module in peft_model.modules() if isinstance(module, LoraLayer)]


class TenantBank:
    """All tenants' states, the model's LoRA parameters and the one optimizer."""

    def __init__(
        self,
        peft_model,
        store: AdapterStore,
        checkpoint_root: Path | str,
        learning_rate: float = 1e-3,
    ) -> None:
        self.model = peft_model
        self.store = store
        self.checkpoint_root = Path(checkpoint_root)
        self.params = lora_parameters(peft_model)
        self.layers = lora_layers(peft_model)
        self.module_of = {name: _module_name(name) for name in self.params}
        self.device = next(iter(self.params.values())).device
        self.pin_memory = self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS)
        self._init_optimizer_state()
        self.tenants: dict[str, TenantState] = {}
        self.active: str | None = None  # whose tensors are in the model and optimizer now

    # ------------------------------------------------------------ registry

    def has(self, tenant: str) -> bool:
        return tenant in self.tenants

    def get(self, tenant: str) -> TenantState:
        return self.tenants[tenant]

    def register(self, tenant: str, seed: int = 0, shape: LoraSignature | None = None) -> TenantState:
        """A new tenant at version 0 of ``shape`` (None: the model's own):
        PEFT's default init, so it equals the base."""
        check_tenant_name(tenant)
        if tenant in self.tenants:
            raise ValueError(f"tenant {tenant!r} is already registered")
        shape = self.model_shape() if shape is None else shape
        self.check_fits(shape)
        generator = torch.Generator().manual_seed(tenant_seed(tenant, seed))
        weights = {name: self._init_lora_tensor(name, self._tenant_size(name, shape.rank), generator)
                   for name in self._tenant_names(shape)}
        state = TenantState(tenant, 0, shape, weights, _zeros_like(weights), _zeros_like(weights))
        self.tenants[tenant] = state
        return state

    def ensure(self, tenant: str, seed: int = 0, shape: LoraSignature | None = None) -> TenantState:
        """The tenant's state: in memory, else restored from the store and its
        checkpoint, else newly registered with ``shape``. ``ShapeMismatch``
        when ``shape`` is given and the tenant has another one."""
        state = self.tenants.get(tenant) or self.restore(tenant) or self.register(tenant, seed, shape)
        if shape is not None and not same_shape(state.shape, shape):
            raise ShapeMismatch(f"{tenant}'s adapter has {describe_shape(state.shape)}; "
                                f"the job asks for {describe_shape(shape)}")
        return state

    def model_shape(self) -> LoraSignature:
        """The largest shape the model's LoRA parameters hold (the deployment's)."""
        config = self.model.peft_config[DEFAULT_ADAPTER_NAME]
        targets = tuple(dict.fromkeys(self.module_of.values()))
        return LoraSignature(rank=int(config.r), alpha=float(config.lora_alpha), target_modules=targets)

    def check_fits(self, shape: LoraSignature) -> None:
        """``ShapeMismatch`` unless the model's LoRA parameters can hold ``shape``."""
        problems = self.model_shape().shape_problems(shape)
        if problems:
            raise ShapeMismatch("; ".join(problems))

    def set_version(self, tenant: str, version: int) -> None:
        self.tenants[tenant].version = version

    def forget(self, tenant: str) -> None:
        """Drop a tenant's in-memory state (the next ``ensure`` restores it from
        the store and its checkpoint). The model's LoRA tensors are left as
        they are: the next ``swap_in`` overwrites all of them."""
        if self.active == tenant:
            self.active = None
        self.tenants.pop(tenant, None)

    # ------------------------------------------------------------ swapping

    def swap_in(self, tenant: str) -> None:
        """Make ``tenant`` the one the model and optimizer train. A no-op when
        it already is; otherwise the active tenant is swapped out first."""
        if self.active == tenant:
            return
        state = self.tenants[tenant]
        self.swap_out()
        rank = state.shape.rank
        with torch.no_grad():
            for name, param in self.params.items():
                opt_state = self.optimizer.state[param]
                for full, saved in ((param, state.weights), (opt_state["exp_avg"], state.exp_avg),
                                    (opt_state["exp_avg_sq"], state.exp_avg_sq)):
                    full.zero_()  # padding and untargeted modules: zero, so exactly the tenant's adapter
                    if name in saved:
                        live_part(name, full, rank).copy_(saved[name], non_blocking=True)
                opt_state["step"].fill_(float(state.adam_step))
            for layer in self.layers:
                layer.scaling[DEFAULT_ADAPTER_NAME] = state.shape.scaling
        self.active = tenant

    def swap_out(self) -> None:
        """Copy the active tenant's tensors back to its CPU state."""
        if self.active is None:
            return
        state = self.tenants[self.active]
        rank = state.shape.rank
        with torch.no_grad():
            for name in state.weights:
                param = self.params[name]
                opt_state = self.optimizer.state[param]
                state.weights[name].copy_(live_part(name, param, rank), non_blocking=True)
                state.exp_avg[name].copy_(live_part(name, opt_state["exp_avg"], rank), non_blocking=True)
                state.exp_avg_sq[name].copy_(live_part(name, opt_state["exp_avg_sq"], rank), non_blocking=True)
        state.adam_step = self._optimizer_step()
        self._synchronize()
        self.active = None

    def set_learning_rate(self, learning_rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

    # ------------------------------------------------------------ reading state

    def adapter_tensors(self, tenant: str) -> dict[str, torch.Tensor]:
        """The tenant's current LoRA weights by PEFT name, in its own shape
        (views of the live parameters for the active tenant: the caller copies
        them before the next step)."""
        state = self.tenants[tenant]
        if tenant == self.active:
            return {name: live_part(name, self.params[name], state.shape.rank).detach() for name in state.weights}
        return dict(state.weights)

    def optimizer_tensors(self, tenant: str) -> tuple[dict[str, torch.Tensor], int]:
        """``exp_avg/<name>`` and ``exp_avg_sq/<name>`` tensors and the step count."""
        state = self.tenants[tenant]
        if tenant == self.active:
            moments = {}
            for name in state.weights:
                opt_state = self.optimizer.state[self.params[name]]
                moments[f"exp_avg/{name}"] = live_part(name, opt_state["exp_avg"], state.shape.rank)
                moments[f"exp_avg_sq/{name}"] = live_part(name, opt_state["exp_avg_sq"], state.shape.rank)
            return moments, self._optimizer_step()
        moments = {f"exp_avg/{n}": t for n, t in state.exp_avg.items()}
        moments.update({f"exp_avg_sq/{n}": t for n, t in state.exp_avg_sq.items()})
        return moments, state.adam_step

    # ------------------------------------------------------------ checkpoints

    def write_checkpoint(self, tenant: str, version: int, moments: dict[str, torch.Tensor], adam_step: int) -> Path:
        """Write ``moments`` as the checkpoint of ``version`` (temp dir, fsync,
        rename), then drop all but the tenant's newest ``CHECKPOINTS_KEPT``.
        Files only: safe beside the model thread, given copies of the moments."""
        tenant_dir = self.checkpoint_root / check_tenant_name(tenant)
        final = tenant_dir / f"v{version}"
        staging = tenant_dir / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            cpu_moments = {n: t.detach().to("cpu").contiguous() for n, t in moments.items()}
            save_file(cpu_moments, str(staging / CHECKPOINT_WEIGHTS_FILE), metadata={"format": "pt"})
            fsync_file(staging / CHECKPOINT_WEIGHTS_FILE)
            sidecar = {"format": CHECKPOINT_FORMAT, "tenant": tenant, "version": version, "adam_step": adam_step,
                       "sha256": _file_sha256(staging / CHECKPOINT_WEIGHTS_FILE)}
            (staging / CHECKPOINT_STATE_FILE).write_text(json.dumps(sidecar))
            fsync_file(staging / CHECKPOINT_STATE_FILE)
            fsync_dir(staging)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_dir(tenant_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._prune_checkpoints(tenant)
        return final

    def checkpoints(self, tenant: str) -> list[tuple[int, Path]]:
        """The tenant's checkpoints as ``(version, directory)``, newest first
        (whether or not they validate)."""
        tenant_dir = self.checkpoint_root / check_tenant_name(tenant)
        if not tenant_dir.is_dir():
            return []
        found = [(int(m.group(1)), entry) for entry in tenant_dir.iterdir()
                 if (m := _CHECKPOINT_DIR.fullmatch(entry.name))]
        return sorted(found, reverse=True)

    def checkpoint_versions(self, tenant: str) -> list[int]:
        """The adapter versions the tenant's checkpoints belong to (the store keeps them)."""
        return [version for version, _ in self.checkpoints(tenant)]

    def restore(self, tenant: str) -> TenantState | None:
        """Rebuild a tenant from the store (weights and shape, exact) and its
        newest valid checkpoint (moments); None when the store has no version
        of it. ``ShapeMismatch`` when the model cannot hold the stored shape."""
        version = self.store.latest_version(tenant)
        if version == 0:
            return None
        path = self.store.path(tenant, version)
        shape = self.store.load_shape(path)
        self.check_fits(shape)
        stored = self.store.load_tensors(path)
        weights = {}
        for name in self._tenant_names(shape):
            size = self._tenant_size(name, shape.rank)
            if name not in stored or tuple(stored[name].shape) != size:
                raise ShapeMismatch(f"{path}: {name} missing or not of shape {list(size)}")
            weights[name] = self._cpu_buffer(size).copy_(stored[name])
        state = TenantState(tenant, version, shape, weights, _zeros_like(weights), _zeros_like(weights))
        checkpoint_version = self._load_checkpoint(state)
        self.tenants[tenant] = state
        log.info("tenant_restored", tenant=tenant, version=version, checkpoint_version=checkpoint_version,
                 adam_step=state.adam_step)
        return state

    # ------------------------------------------------------------ internals

    def _load_checkpoint(self, state: TenantState) -> int | None:
        """Moments and step count from the newest checkpoint that validates;
        the checkpoint's version, or None (moments stay zero)."""
        for version, path in self.checkpoints(state.tenant):
            try:
                moments, sidecar = self._read_checkpoint(path, state)
            except CheckpointInvalid as exc:
                log.warning("checkpoint_unusable", tenant=state.tenant, path=str(path), reason=str(exc))
                self._set_aside(path)
                continue
            for name in state.weights:
                state.exp_avg[name].copy_(moments[f"exp_avg/{name}"])
                state.exp_avg_sq[name].copy_(moments[f"exp_avg_sq/{name}"])
            state.adam_step = int(sidecar["adam_step"])
            return version
        return None

    def _read_checkpoint(self, path: Path, state: TenantState) -> tuple[dict[str, torch.Tensor], dict]:
        """The moments and sidecar of one checkpoint, or ``CheckpointInvalid``."""
        try:
            sidecar = json.loads((path / CHECKPOINT_STATE_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointInvalid(f"unreadable {CHECKPOINT_STATE_FILE}: {exc}") from exc
        if not isinstance(sidecar, dict) or sidecar.get("format") not in (1, CHECKPOINT_FORMAT):
            raise CheckpointInvalid(f"{CHECKPOINT_STATE_FILE} is not a checkpoint sidecar of a known format")
        if sidecar.get("tenant") != state.tenant or not isinstance(sidecar.get("adam_step"), int):
            raise CheckpointInvalid("sidecar names another tenant or has no integer adam_step")
        if sidecar.get("version") != int(path.name[1:]) or sidecar["version"] > state.version:
            # Moments from a version the store does not have (store reset?): not these.
            raise CheckpointInvalid(f"sidecar version {sidecar.get('version')} for a tenant at version {state.version}")
        weights_path = path / CHECKPOINT_WEIGHTS_FILE
        try:
            # format 2 always records the sha256: a sidecar of that format without one is not trusted
            if sidecar["format"] == CHECKPOINT_FORMAT and _file_sha256(weights_path) != sidecar.get("sha256"):
                raise CheckpointInvalid(f"{CHECKPOINT_WEIGHTS_FILE} does not match the sha256 in its sidecar")
            moments = load_file(str(weights_path), device="cpu")
        except (OSError, SafetensorError) as exc:
            raise CheckpointInvalid(f"unreadable {CHECKPOINT_WEIGHTS_FILE}: {type(exc).__name__}: {exc}") from exc
        for name, weights in state.weights.items():
            for kind in ("exp_avg", "exp_avg_sq"):
                tensor = moments.get(f"{kind}/{name}")
                if tensor is None or tensor.shape != weights.shape:
                    raise CheckpointInvalid(f"{kind}/{name} missing or of the wrong shape")
        return moments, sidecar

    def _set_aside(self, path: Path) -> None:
        """Move an unusable checkpoint out of the ``v<n>`` namespace (kept for
        inspection), so it no longer counts as one of the newest kept."""
        aside = path.with_name(f".unusable-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except OSError as exc:
            log.warning("checkpoint_set_aside_failed", path=str(path), error=str(exc))

    def _prune_checkpoints(self, tenant: str) -> None:
        for _, entry in self.checkpoints(tenant)[CHECKPOINTS_KEPT:]:
            shutil.rmtree(entry, ignore_errors=True)

    def _init_optimizer_state(self) -> None:
        """Create Adam's state tensors once (as Adam itself would lazily), so
        swapping only ever copies into them."""
        for param in self.params.values():
            self.optimizer.state[param] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }

    def _optimizer_step(self) -> int:
        first = next(iter(self.params.values()))
        return int(self.optimizer.state[first]["step"].item())

    def _cpu_buffer(self, size: tuple[int, ...]) -> torch.Tensor:
        dtype = next(iter(self.params.values())).dtype
        buffer = torch.empty(size, dtype=dtype, device="cpu")
        return buffer.pin_memory() if self.pin_memory else buffer

    def _tenant_names(self, shape: LoraSignature) -> list[str]:
        """The PEFT names of a tenant's tensors: the factors of its target modules, in model order."""
        return [name for name in self.params if self.module_of[name] in shape.target_modules]

    def _tenant_size(self, name: str, rank: int) -> tuple[int, ...]:
        return tuple(live_part(name, self.params[name], rank).shape)

    def _init_lora_tensor(self, name: str, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        buffer = self._cpu_buffer(size)
        if ".lora_A." in name:
            # PEFT's default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(size[1])
            init = torch.empty(size, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            return buffer.copy_(init)
        return buffer.zero_()  # lora_B: zero, so the adapter starts as the identity

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _module_name(name: str) -> str:
    parsed = parse_lora_key(name)
    if parsed is None:
        raise ValueError(f"LoRA parameter {name!r} is not a decoder layer's module")
    return parsed[1]


def _zeros_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeros of the same shapes, dtype and (pinned) memory."""
    return {name: torch.zeros_like(t).pin_memory() if t.is_pinned() else torch.zeros_like(t)
            for name, t in tensors.items()}


def cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies on the CPU that no later step changes (the tensors may be views of live parameters)."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["TenantBank", "TenantState", "CheckpointInvalid", "ShapeMismatch", "lora_parameters", "tenant_seed",
           "same_shape", "describe_shape", "live_part", "lora_layers",
           "ADAM_BETAS", "CHECKPOINT_WEIGHTS_FILE", "CHECKPOINT_STATE_FILE", "CHECKPOINTS_KEPT"]
