"""The generation engine interface that the rollout service drives.

Two implementations: ``services.rollout.torch_engine.TorchEngine`` (embedded,
CPU / small GPU, tests, demo) and ``services.rollout.vllm_engine.VLLMEngine``
(production on NVIDIA GPUs). The rollout service does not know which one it has.

Adapters are addressed by ``AdapterKey(tenant, version)``; a key is registered
once and never reloaded in place (versions are immutable). ``None`` as the key
means the base model.
"""

from __future__ import annotations

import abc
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from shared.messages import SamplingParams

if TYPE_CHECKING:  # torch is heavy: `clora check` must not import it
    import torch

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """A request the engine cannot serve (unknown adapter, bad prompt...)."""


class AdapterNotLoaded(EngineError):
    pass


@dataclass(frozen=True, order=True)
class AdapterKey:
    tenant: str
    version: int

    @property
    def name(self) -> str:
        """The engine-facing name, never reused for another version."""
        return f"{self.tenant}@v{self.version}"


@dataclass(frozen=True)
class LoraSignature:
    """A LoRA shape: the deployment's (the largest every slot is preallocated
    for) or one tenant's own (a rank up to it, a subset of its targets)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def shape_problems(self, shape: LoraSignature) -> list[str]:
        """Why an adapter of ``shape`` cannot live in this deployment's slots
        (rank over this rank, alpha not finite > 0, targets not a non-empty
        subset of these); [] when it can. A smaller rank is zero-padded in a
        slot: exactly the same adapter."""
        problems = []
        if not 1 <= shape.rank <= self.rank:
            problems.append(f"LoRA rank {shape.rank} is not between 1 and the deployment's maximum {self.rank}")
        if not (math.isfinite(shape.alpha) and shape.alpha > 0):
            problems.append(f"lora_alpha {shape.alpha} is not a finite number > 0")
        outside = sorted(set(shape.target_modules) - set(self.target_modules))
        if outside or not shape.target_modules:
            problems.append(f"target modules {list(shape.target_modules)} are not a non-empty subset of the "
                            f"deployment's {list(self.target_modules)}")
        return problems

    def tenant_shape(self, rank: int, alpha: float | None, targets: Sequence[str] | None) -> LoraSignature:
        """A tenant's own LoRA shape; ``None`` alpha or targets: this
        deployment's. Targets keep this deployment's order."""
        chosen = self.target_modules if targets is None else tuple(
            [t for t in self.target_modules if t in targets] + [t for t in targets if t not in self.target_modules])
        return LoraSignature(rank=rank, alpha=self.alpha if alpha is None else float(alpha), target_modules=chosen)


@dataclass
class GeneratedSample:
    token_ids: list[int]
    logprobs: list[float]  # one per token, under the sampling policy
    finish_reason: FinishReason


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    samples: list[GeneratedSample]
    adapter: AdapterKey | None  # exactly the version that produced every sample
    queue_wait_s: float = 0.0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class EngineStats:
    """Counters for observability and tests (not timing-based assertions).

    ``step_tenants`` keeps, for the most recent decode steps, the set of
    tenants (None = base) whose rows were in that step's batch;
    ``shared_steps`` counts, since start, the decode steps that held both
    tenants of each pair ``"a|b"`` (a < b)."""

    decode_steps: int = 0
    prefill_steps: int = 0
    generated_tokens: int = 0
    adapter_loads: int = 0
    adapter_retires: int = 0
    running_rows: int = 0
    waiting_rows: int = 0
    step_tenants: list[frozenset[str | None]] = field(default_factory=list)
    shared_steps: Counter[str] = field(default_factory=Counter)


class Engine(abc.ABC):
    """Async generation engine with multi-LoRA support."""

    signature: LoraSignature

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the engine loop."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the loop; pending requests fail with ``EngineError``."""

    @abc.abstractmethod
    async def register_adapter(
        self,
        key: AdapterKey,
        path: Path | None = None,
        tensors: "dict[str, torch.Tensor] | None" = None,
    ) -> None:
        """Make ``key`` usable, from a PEFT directory or PEFT-named tensors.
        Idempotent for a key already registered; never blocks decode."""

    @abc.abstractmethod
    async def retire_adapter(self, key: AdapterKey) -> None:
        """Forget ``key`` once no running request uses it."""

    @abc.abstractmethod
    def has_adapter(self, key: AdapterKey) -> bool: ...

    @abc.abstractmethod
    async def generate(
        self,
        prompt_token_ids: list[int],
        adapter: AdapterKey | None,
        sampling: SamplingParams,
    ) -> GenerationResult:
        """Generate ``sampling.n`` completions. Raises ``AdapterNotLoaded`` for
        an unregistered key. Cancelling the call aborts its rows."""

    @property
    @abc.abstractmethod
    def capacity_rows(self) -> int:
        """How many rows (samples) can decode at once; the rollout service
        reads no more requests than fit (backpressure)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def failure(self) -> str | None:
        """Why the engine died, or None while it can serve. A dead engine is
        the service's failure, not a request's: the rollout service stops and
        leaves its requests for redelivery."""

    @abc.abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer of the served model."""
