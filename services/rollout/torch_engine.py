"""The embedded multi-LoRA engine: one continuous decode batch for all tenants.

Two layers:

- ``ModelRunner`` (single-threaded, no asyncio): a Hugging Face causal LM
  (Qwen3, Qwen2, Llama families) whose decoder layers are re-driven by a lean
  forward of our own, reusing the model's weights: q/k/v and gate/up fused
  into ``MultiLoraLinear`` groups with stacked per-slot LoRA factors and a
  per-row slot index (one gathered low-rank product per group for the whole
  batch), and a preallocated per-row KV cache. Rows live compacted at batch
  indices ``0..B-1``; each row's tokens sit at cache positions ``0..pos-1`` of
  its own cache row (no padding, no rebuild): a decode step writes the new
  key/value at the row's own position (``scatter_``) and masks keys past it;
  rows that leave are filled by moving the last rows into the holes
  (swap-remove), so only moved rows are copied.
- ``TorchEngine`` (the ``shared.engine.Engine``): an engine thread that runs
  schedule (apply slot writes, aborts, admit) -> execute (prefill newcomers,
  one batched decode step for every running row) -> update (vectorized
  sampling, append, retire finished rows, resolve futures on the asyncio loop
  thread-safely).

Sampling is reproducible per row regardless of batch mates: each row draws its
uniform from a counter-based hash of (row seed, token position) computed for
the whole batch at once, instead of a stateful generator per row.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F

from shared.devices import resolve_device, resolve_dtype
from shared.engine import (
    AdapterKey,
    AdapterNotLoaded,
    Engine,
    EngineError,
    EngineStats,
    GeneratedSample,
    GenerationResult,
    LoraSignature,
)
from shared.messages import SamplingParams
from services.rollout.lora_layers import (
    LORA_GROUPS,
    MODULE_TO_GROUP,
    MultiLoraLinear,
    PreparedAdapter,
    SegmentPlan,
    SlotSelection,
    prepare_adapter,
    read_peft_dir,
    scaling_from_config,
)

log = structlog.get_logger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
STEP_TENANTS_KEPT = 1000
CACHE_LENGTH_QUANTUM = 64  # cache length grows in multiples of this many positions
RNG_MODULUS = 2**31 - 1  # Lehmer modulus: products of 31-bit values stay inside int64
RNG_MULTIPLIERS = (48271, 69621, 16807)
CLOSE_JOIN_TIMEOUT_S = 30.0
# Reuse gathered LoRA factors across decode steps only while they take less
# than this (a big model x many rows would rather gather every step).
GATHER_REUSE_MAX_BYTES = 1 << 30


# ================================================================ model runner


@dataclass
class _Layer:
    """One decoder layer's weights, as our forward uses them."""

    input_norm_w: torch.Tensor
    post_norm_w: torch.Tensor
    qk_norm_w: torch.Tensor | None  # [q heads + kv heads, head_dim] (Qwen3); None elsewhere
    qkv: MultiLoraLinear
    o: MultiLoraLinear
    gate_up: MultiLoraLinear
    down: MultiLoraLinear
    act: object


class ModelRunner:
    """Batched multi-LoRA forward with a per-row KV cache. Not thread-safe:
    one thread (the engine's) drives it."""

    def __init__(
        self,
        model_dir: str | Path,
        signature: LoraSignature,
        max_rows: int = 256,
        max_loras: int = 16,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        unknown = sorted(set(signature.target_modules) - set(MODULE_TO_GROUP))
        if unknown:
            raise EngineError(f"signature targets {unknown}; the engine supports {sorted(MODULE_TO_GROUP)}")
        self.signature = signature
        self.max_rows = max_rows
        self.num_slots = max_loras + 1
        self.device = resolve_device(device)
        try:
            self.dtype = resolve_dtype(dtype, self.device)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        config = AutoConfig.from_pretrained(model_dir)
        _check_config(config)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        model.eval().requires_grad_(False).to(self.device)
        self.config = config
        self._read_model(model, config)
        self._init_rows()

    # ---------------------------------------------------------------- setup

    def _read_model(self, model, config) -> None:
        inner = model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.attn_scale = self.head_dim**-0.5
        self.use_gqa = self.num_kv_heads != self.num_heads
        self.embed_w = inner.embed_tokens.weight
        self.vocab_size = self.embed_w.shape[0]
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head_w = model.lm_head.weight
        self.max_positions = int(config.max_position_embeddings)
        self.eos_token_ids = _eos_ids(model, config)
        self.selection = SlotSelection()
        self.layers: list[_Layer] = []
        self.lora_groups: list[dict[str, MultiLoraLinear]] = []
        for decoder in inner.layers:
            self.layers.append(self._fuse_layer(decoder))
        self._build_rope_tables(inner.rotary_emb)
        self._gathered_bytes_per_row = sum(
            g.gathered_bytes_per_row() for groups in self.lora_groups for g in groups.values()
        )
        self.use_segments = True  # SGMV decode when rows share adapters; False: always BGMV
        # a plain softmax(q k^T) @ v beats CPU SDPA's kernel for one query token
        self._manual_decode_attention = self.device.type == "cpu"
        self._model = model  # keeps embeddings / norms alive; the fused linears replace the originals

    def _fuse_layer(self, decoder) -> _Layer:
        groups: dict[str, MultiLoraLinear] = {}
        for parent_name, group_name, members in LORA_GROUPS:
            parent = getattr(decoder, parent_name)
            linears = {name: getattr(parent, name) for name in members}
            groups[group_name] = MultiLoraLinear(
                linears, self.signature.target_modules, self.num_slots, self.signature.rank, self.selection
            )
            for name in members:  # the fused copy replaces them: free the originals
                setattr(parent, name, torch.nn.Identity())
        self.lora_groups.append(groups)
        attn = decoder.self_attn
        qk_norm_w = None
        if hasattr(attn, "q_norm"):
            self.qk_norm_eps = attn.q_norm.variance_epsilon
            qk_norm_w = torch.cat([
                attn.q_norm.weight.expand(self.num_heads, -1),
                attn.k_norm.weight.expand(self.num_kv_heads, -1),
            ])
        self.norm_eps = decoder.input_layernorm.variance_epsilon
        return _Layer(
            input_norm_w=decoder.input_layernorm.weight,
            post_norm_w=decoder.post_attention_layernorm.weight,
            qk_norm_w=qk_norm_w,
            act=decoder.mlp.act_fn,
            **groups,
        )

    def _build_rope_tables(self, rotary) -> None:
        positions_1_L = torch.arange(self.max_positions, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos_1_L_D, sin_1_L_D = rotary(probe, positions_1_L)
        self.cos_L_D, self.sin_L_D = cos_1_L_D[0], sin_1_L_D[0]
        self.positions_L = positions_1_L[0]

    def _init_rows(self) -> None:
        self.num_rows = 0
        self.pos_B = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens in each row's cache
        self.slot_B = torch.zeros(0, dtype=torch.long, device=self.device)
        self._any_adapter = False
        # pos of row b = _pos_offset[b] + _decode_count: the max needs no tensor read
        self._pos_offset: list[int] = []
        self._decode_count = 0
        self._batch_generation = 0  # bumps when rows or slot contents change
        self._plan: SegmentPlan | None = None
        self._plan_generation = -1
        self._kv = torch.zeros(
            len(self.layers), 2, 0, self.num_kv_heads, 0, self.head_dim, device=self.device, dtype=self.dtype
        )
        self._arange_B = torch.zeros(0, dtype=torch.long, device=self.device)

    # ---------------------------------------------------------------- adapters

    def prepare(self, path: Path | None, tensors: dict[str, torch.Tensor] | None) -> PreparedAdapter:
        """Read and lay out an adapter for the slots (thread-safe, touches no slot)."""
        if (path is None) == (tensors is None):
            raise EngineError("give exactly one of an adapter path or tensors")
        if path is not None:
            tensors, config = read_peft_dir(Path(path))
            scaling, _ = scaling_from_config(config, self.signature, Path(path))
        else:
            scaling = self.signature.scaling
        return prepare_adapter(tensors, scaling, self.signature, self.lora_groups, self.device, self.dtype)

    def write_slot(self, slot: int, adapter: PreparedAdapter) -> None:
        """Copy an adapter into ``slot`` (1..max_loras); every factor is rewritten,
        so a reused slot keeps nothing of its previous adapter."""
        if not 1 <= slot < self.num_slots:
            raise EngineError(f"slot {slot} out of range 1..{self.num_slots - 1}")
        for layer_idx, groups in enumerate(self.lora_groups):
            for group_name, group in groups.items():
                factors = adapter.factors.get((layer_idx, group_name))
                if factors is None:
                    group.lora_A_S_I_R[slot].zero_()
                    group.lora_B_S_R_O[slot].zero_()
                else:
                    group.write_slot(slot, *factors)
        self._batch_generation += 1

    # ---------------------------------------------------------------- rows

    @property
    def max_pos(self) -> int:
        return max(self._pos_offset, default=0) + self._decode_count

    def prefill(
        self, prompts_R: list[list[int]], slots_R: list[int], copies_R: list[int], reserve_len: int
    ) -> torch.Tensor:
        """Run R prompts once and append ``copies_R[r]`` rows per prompt (the
        n samples of a request share the prompt's keys/values). Returns the
        next-token logits of the new rows, [N, V] float32. ``reserve_len`` is
        the longest total length any new row may reach."""
        R, P = len(prompts_R), max(len(p) for p in prompts_R)
        N, B0 = sum(copies_R), self.num_rows
        self._ensure_cache(B0 + N, reserve_len)
        lens = [len(p) for p in prompts_R]
        ids_R_P = torch.tensor([p + [0] * (P - len(p)) for p in prompts_R], device=self.device)
        src_N = torch.repeat_interleave(
            torch.arange(R, device=self.device), torch.tensor(copies_R, device=self.device)
        )
        slot_R = torch.tensor(slots_R, device=self.device)
        self.selection.select(slot_R if any(slots_R) else None)
        cos = self.cos_L_D[:P][None, :, None, :]
        sin = self.sin_L_D[:P][None, :, None, :]
        identity = all(c == 1 for c in copies_R)
        x = F.embedding(ids_R_P, self.embed_w)
        for layer_idx, layer in enumerate(self.layers):
            x = self._layer(layer, x, cos, sin, lambda q, k, v, i=layer_idx: self._prefill_attend(
                i, q, k, v, B0, N, P, None if identity else src_N))
        last_R_H = x[torch.arange(R, device=self.device), torch.tensor(lens, device=self.device) - 1]
        logits_R_V = self._logits(last_R_H)
        self._append_rows(src_N, slot_R, lens, copies_R)
        return logits_R_V if identity else logits_R_V.index_select(0, src_N)

    def _prefill_attend(self, layer_idx, q, k, v, B0, N, P, src_N):
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.attn_scale, enable_gqa=self.use_gqa
        )
        kv = self._kv[layer_idx]
        if src_N is None:
            kv[0, B0:B0 + N, :, :P] = k
            kv[1, B0:B0 + N, :, :P] = v
        else:
            kv[0, B0:B0 + N, :, :P] = k.index_select(0, src_N)
            kv[1, B0:B0 + N, :, :P] = v.index_select(0, src_N)
        return out

    def _append_rows(self, src_N, slot_R, lens, copies_R) -> None:
        new_pos = [length for length, c in zip(lens, copies_R) for _ in range(c)]
        self.pos_B = torch.cat([self.pos_B, torch.tensor(new_pos, device=self.device)])
        self.slot_B = torch.cat([self.slot_B, slot_R.index_select(0, src_N)])
        self._pos_offset.extend(p - self._decode_count for p in new_pos)
        self._rows_changed()

    def decode(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at its own position; returns logits [B, V] float32."""
        B = self.num_rows
        L = self.max_pos + 1
        pos_B = self.pos_B
        reuse = B * self._gathered_bytes_per_row <= GATHER_REUSE_MAX_BYTES
        self.selection.select(
            self.slot_B if self._any_adapter else None, self._batch_generation if reuse else None,
            self._segment_plan(),
        )
        cos = self.cos_L_D.index_select(0, pos_B)[:, None, None, :]
        sin = self.sin_L_D.index_select(0, pos_B)[:, None, None, :]
        mask_B_1_1_L = (self.positions_L[:L][None, :] <= pos_B[:, None])[:, None, None, :]
        if self._manual_decode_attention:
            mask_B_1_1_L = torch.zeros(mask_B_1_1_L.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~mask_B_1_1_L, float("-inf"))
        write_idx = pos_B.view(B, 1, 1, 1).expand(B, self.num_kv_heads, 1, self.head_dim)
        x = F.embedding(tokens_B, self.embed_w)[:, None, :]
        for layer_idx, layer in enumerate(self.layers):
            x = self._layer(layer, x, cos, sin, lambda q, k, v, i=layer_idx: self._decode_attend(
                i, q, k, v, B, L, write_idx, mask_B_1_1_L))
        self.pos_B = pos_B + 1
        self._decode_count += 1
        return self._logits(x[:, 0])

    def _segment_plan(self) -> SegmentPlan | None:
        """Rows grouped by slot (SGMV), rebuilt only when the rows change."""
        if not self._any_adapter:
            return None
        if self._plan_generation != self._batch_generation:
            self._plan = SegmentPlan.build(self.slot_B.tolist(), self.device) if self.use_segments else None
            self._plan_generation = self._batch_generation
        return self._plan

    def _decode_attend(self, layer_idx, q, k, v, B, L, write_idx, mask):
        k_cache = self._kv[layer_idx, 0, :B]
        v_cache = self._kv[layer_idx, 1, :B]
        k_cache.scatter_(2, write_idx, k)
        v_cache.scatter_(2, write_idx, v)
        if self._manual_decode_attention:  # mask is an additive bias here
            nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
            q_grouped = q.reshape(B, nkv, nh // nkv, hd)  # query head h reads kv head h // group
            scores = torch.matmul(q_grouped, k_cache[:, :, :L].transpose(-1, -2)).mul_(self.attn_scale)
            probs = scores.add_(mask).softmax(-1)
            return torch.matmul(probs, v_cache[:, :, :L]).view(B, nh, 1, hd)
        return F.scaled_dot_product_attention(
            q, k_cache[:, :, :L], v_cache[:, :, :L], attn_mask=mask,
            scale=self.attn_scale, enable_gqa=self.use_gqa,
        )

    def remove_rows(self, indices: list[int]) -> torch.Tensor:
        """Drop rows; the last surviving rows move into the holes. Returns the
        new order as old indices ([B_new] long tensor) for callers' row state."""
        B, gone = self.num_rows, set(indices)
        B_new = B - len(gone)
        holes = sorted(i for i in gone if i < B_new)
        movers = [i for i in range(B_new, B) if i not in gone]
        order = list(range(B_new))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            L = self.max_pos + 1
            hole_t = torch.tensor(holes, device=self.device)
            mover_t = torch.tensor(movers, device=self.device)
            self._kv[:, :, hole_t, :, :L] = self._kv[:, :, mover_t, :, :L]
        order_t = torch.tensor(order, dtype=torch.long, device=self.device)
        self.pos_B = self.pos_B.index_select(0, order_t)
        self.slot_B = self.slot_B.index_select(0, order_t)
        self._pos_offset = [self._pos_offset[i] for i in order]
        self._rows_changed()
        return order_t

    def _rows_changed(self) -> None:
        self._batch_generation += 1
        self.num_rows = len(self._pos_offset)
        self._any_adapter = bool((self.slot_B != 0).any()) if self.num_rows else False
        if not self.num_rows:
            self._decode_count = 0

    def _ensure_cache(self, rows: int, length: int) -> None:
        if length > self.max_positions:
            raise EngineError(f"sequence length {length} exceeds the model's {self.max_positions} positions")
        _, _, rows_now, _, len_now, _ = self._kv.shape
        if rows <= rows_now and length <= len_now:
            return
        new_rows = min(self.max_rows, max(rows, 2 * rows_now, 8))
        quantum = CACHE_LENGTH_QUANTUM
        new_len = min(self.max_positions, max(len_now, -(-length // quantum) * quantum))
        kv = self._kv.new_zeros(len(self.layers), 2, new_rows, self.num_kv_heads, new_len, self.head_dim)
        kv[:, :, : self.num_rows, :, :len_now] = self._kv[:, :, : self.num_rows]
        self._kv = kv

    # ---------------------------------------------------------------- layers

    def _layer(self, layer: _Layer, x_B_T_H, cos, sin, attend) -> torch.Tensor:
        B, T, _ = x_B_T_H.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        h = self._norm(x_B_T_H, layer.input_norm_w)
        qkv = layer.qkv(h).view(B, T, nh + 2 * nkv, hd)
        qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv:]
        if layer.qk_norm_w is not None:
            qk = self._head_norm(qk, layer.qk_norm_w)
        qk = qk * cos + _rotate_half(qk) * sin
        q = qk[:, :, :nh].transpose(1, 2)
        k = qk[:, :, nh:].transpose(1, 2)
        attn_B_NH_T_D = attend(q, k, v.transpose(1, 2))
        x_B_T_H = x_B_T_H + layer.o(attn_B_NH_T_D.transpose(1, 2).reshape(B, T, nh * hd))
        h = self._norm(x_B_T_H, layer.post_norm_w)
        gate_up = layer.gate_up(h)
        inter = gate_up.shape[-1] // 2
        return x_B_T_H + layer.down(layer.act(gate_up[..., :inter]) * gate_up[..., inter:])

    def _norm(self, x, weight) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.norm_eps)
        return weight * F.rms_norm(x.float(), weight.shape, None, self.norm_eps).to(x.dtype)

    def _head_norm(self, x_B_T_N_D, weight_N_D) -> torch.Tensor:
        normed = F.rms_norm(x_B_T_N_D.float(), (self.head_dim,), None, self.qk_norm_eps)
        return weight_N_D * normed.to(x_B_T_N_D.dtype)

    def _logits(self, h_B_H) -> torch.Tensor:
        weight, eps = self.final_norm
        if h_B_H.dtype == torch.float32:
            h_B_H = F.rms_norm(h_B_H, weight.shape, weight, eps)
        else:
            h_B_H = weight * F.rms_norm(h_B_H.float(), weight.shape, None, eps).to(h_B_H.dtype)
        return F.linear(h_B_H, self.lm_head_w).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_config(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"model type {config.model_type!r} not supported; use one of {SUPPORTED_MODEL_TYPES}")
    if getattr(config, "use_sliding_window", False):
        raise EngineError("sliding-window attention is not supported by the torch engine")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") == "dynamic":
        raise EngineError("dynamic RoPE scaling is not supported (positions are precomputed)")


def _eos_ids(model, config) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


# ================================================================ sampling


@dataclass
class RowSampling:
    """Sampling settings of the running rows, aligned with the runner's rows."""

    inv_temp_B: torch.Tensor  # 1/T; 1 for greedy rows (their logprobs are the raw model's)
    greedy_B: torch.Tensor  # bool
    top_k_B: torch.Tensor  # V where no truncation
    top_p_B: torch.Tensor
    seed_B: torch.Tensor  # 31-bit row seeds

    @staticmethod
    def empty(device) -> "RowSampling":
        z = lambda dtype: torch.zeros(0, dtype=dtype, device=device)  # noqa: E731
        return RowSampling(z(torch.float32), z(torch.bool), z(torch.long), z(torch.float32), z(torch.long))

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], vocab: int, device) -> "RowSampling":
        temps = [p.temperature for p in params]
        return RowSampling(
            inv_temp_B=torch.tensor([1.0 / t if t > 0 else 1.0 for t in temps], device=device),
            greedy_B=torch.tensor([t == 0 for t in temps], device=device),
            top_k_B=torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device),
            # top_p 1 must keep every token: compare against inf, not a rounded cumsum
            top_p_B=torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=device),
            seed_B=torch.tensor(seeds, dtype=torch.long, device=device),
        )

    def cat(self, other: "RowSampling") -> "RowSampling":
        return RowSampling(*(torch.cat([a, b]) for a, b in zip(self._fields(), other._fields())))

    def select(self, order_B: torch.Tensor) -> "RowSampling":
        return RowSampling(*(t.index_select(0, order_B) for t in self._fields()))

    def _fields(self):
        return (self.inv_temp_B, self.greedy_B, self.top_k_B, self.top_p_B, self.seed_B)


@dataclass
class SamplingFlags:
    """Which sampling paths the current rows need (skips work none of them use)."""

    any_sampled: bool = False
    any_greedy: bool = False
    any_truncation: bool = False


def counter_uniform(seed_B: torch.Tensor, counter_B: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) per row from (seed, counter): a few Lehmer rounds
    with xor-shift mixing in int64 (all products stay below 2^63)."""
    m = RNG_MODULUS
    x = (seed_B * RNG_MULTIPLIERS[0] + (counter_B % m) * RNG_MULTIPLIERS[2] + 1) % m
    for multiplier in RNG_MULTIPLIERS[:2]:
        x = (x * multiplier) % m
        x = x ^ (x >> 11)
    x = (x * RNG_MULTIPLIERS[0]) % m
    return x.to(torch.float64).div_(m).to(torch.float32).clamp_(max=1.0 - 2**-24)


def sample_tokens(
    logits_B_V: torch.Tensor, rows: RowSampling, flags: SamplingFlags, counter_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], logprobs [B]): logprob of the chosen token under the
    temperature-scaled full distribution (before top-k/top-p); greedy rows
    report the unscaled distribution's logprob."""
    if not flags.any_sampled:
        tokens_B = logits_B_V.argmax(-1)
        return tokens_B, _gather(torch.log_softmax(logits_B_V, -1), tokens_B)
    logprobs_B_V = torch.log_softmax(logits_B_V * rows.inv_temp_B[:, None], -1)
    probs_B_V = logprobs_B_V.exp()
    u_B = counter_uniform(rows.seed_B, counter_B)
    if flags.any_truncation:
        sorted_B_V, order_B_V = probs_B_V.sort(-1, descending=True)
        rank_V = torch.arange(sorted_B_V.shape[-1], device=sorted_B_V.device)
        cum_B_V = sorted_B_V.cumsum(-1)
        keep = (rank_V[None] < rows.top_k_B[:, None]) & (cum_B_V - sorted_B_V < rows.top_p_B[:, None])
        cdf_B_V = (sorted_B_V * keep).cumsum(-1)
        pick_B = _search(cdf_B_V, u_B)
        tokens_B = order_B_V.gather(1, pick_B[:, None])[:, 0]
    else:
        tokens_B = _search(probs_B_V.cumsum(-1), u_B)
    if flags.any_greedy:
        tokens_B = torch.where(rows.greedy_B, logits_B_V.argmax(-1), tokens_B)
    return tokens_B, _gather(logprobs_B_V, tokens_B)


def _search(cdf_B_V: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    target = (u_B * cdf_B_V[:, -1])[:, None]
    return torch.searchsorted(cdf_B_V, target, right=True)[:, 0].clamp_(max=cdf_B_V.shape[-1] - 1)


def _gather(values_B_V: torch.Tensor, index_B: torch.Tensor) -> torch.Tensor:
    return values_B_V.gather(1, index_B[:, None])[:, 0]


# ================================================================ engine state


@dataclass(eq=False)
class _Request:
    prompt_token_ids: list[int]
    adapter: AdapterKey | None
    slot: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    future: asyncio.Future
    submitted_at: float
    seeds: list[int]
    samples: list[GeneratedSample | None] = field(default_factory=list)
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    rows_left: int = 0
    done: bool = False  # finished, aborted or failed: its adapter reference is released


@dataclass(eq=False)
class _Row:
    request: _Request
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Abort:
    request: _Request


@dataclass(eq=False)
class _SlotWrite:
    key: AdapterKey
    adapter: PreparedAdapter
    future: asyncio.Future


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    """Settle an asyncio future from any thread (no-op if already done)."""

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    loop = future.get_loop()
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(settle)


# ================================================================ engine


class TorchEngine(Engine):
    """Continuous-batching multi-LoRA engine on a Hugging Face causal LM.

    Slots: ``max_loras`` adapter slots plus slot 0 (base). A registered key
    keeps its slot until retired; a retired key's slot frees once no waiting
    or running row uses it. When a registration finds every slot taken, it
    evicts the least-recently-used key that no row uses (``has_adapter`` then
    turns False for it; the rollout service re-registers on
    ``AdapterNotLoaded``); when every slot is in use by rows, the write waits
    until one frees, while decode goes on.

    ``torch_threads`` > 0 sets the engine thread's intra-op threads (OpenMP
    counts are per thread: setting them in the caller does not reach the
    engine thread); on a small shared CPU box 1 or 2 avoids oversubscription,
    which costs far more than it gains. ``ignore_eos`` (benchmarks) stops rows
    only on ``stop_token_ids`` and ``max_tokens``. A stop token is kept as the last completion token (its
    logprob matters to the trainer).
    """

    def __init__(
        self,
        model_dir: str | Path,
        signature: LoraSignature,
        max_rows: int = 256,
        max_loras: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int = 0,
        ignore_eos: bool = False,
    ) -> None:
        if max_rows < 1 or max_loras < 1:
            raise EngineError("max_rows and max_loras must be >= 1")
        self.model_dir = Path(model_dir)
        self.signature = signature
        self.max_rows = max_rows
        self.max_loras = max_loras
        self._device_name, self._dtype_name = device, dtype
        self._torch_threads = torch_threads
        self._ignore_eos = ignore_eos
        # set by start()
        self._runner: ModelRunner | None = None
        self._tokenizer = None
        self._thread: threading.Thread | None = None
        # shared between the asyncio thread and the engine thread (under _lock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: collections.deque = collections.deque()
        self._slots: dict[AdapterKey, int] = {}
        self._retiring: dict[AdapterKey, int] = {}
        self._refs: collections.Counter[AdapterKey] = collections.Counter()
        self._last_used: dict[AdapterKey, int] = {}
        self._use_clock = 0
        self._free_slots: list[int] = list(range(max_loras, 0, -1))
        self._stopping = False
        self._failure: str | None = None
        self._stats = EngineStats()
        self._step_tenants: collections.deque = collections.deque(maxlen=STEP_TENANTS_KEPT)
        # asyncio-thread only
        self._loading: dict[AdapterKey, asyncio.Task] = {}
        # engine-thread only
        self._waiting: collections.deque[_Request] = collections.deque()
        self._pending_writes: list[_SlotWrite] = []
        self._rows: list[_Row] = []
        self._row_sampling: RowSampling | None = None
        self._flags = SamplingFlags()
        self._last_tokens_B: torch.Tensor | None = None
        self._tenants: frozenset[str | None] = frozenset()
        self._tenant_pairs: list[str] = []

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._runner = await asyncio.to_thread(self._load_runner)
        self._row_sampling = RowSampling.empty(self._runner.device)
        self._last_tokens_B = torch.zeros(0, dtype=torch.long, device=self._runner.device)
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()
        log.info("torch_engine_started", model_dir=str(self.model_dir), device=str(self._runner.device),
                 dtype=str(self._runner.dtype), max_rows=self.max_rows, max_loras=self.max_loras)

    def _load_runner(self) -> ModelRunner:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return ModelRunner(self.model_dir, self.signature, self.max_rows, self.max_loras,
                           self._device_name, self._dtype_name)

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._lock:
            self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join, CLOSE_JOIN_TIMEOUT_S)
        self._fail_everything("engine closed")
        log.info("torch_engine_closed", decode_steps=self._stats.decode_steps)

    def failure(self) -> str | None:
        return self._failure

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineError(f"engine failed: {self._failure}")
        if self._thread is None or self._stopping:
            raise EngineError("engine is not running")

    # ---------------------------------------------------------------- adapters

    async def register_adapter(
        self, key: AdapterKey, path: Path | None = None, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        self._check_alive()
        with self._lock:
            if key in self._retiring:  # same immutable contents: un-retire
                self._slots[key] = self._retiring.pop(key)
            if key in self._slots:
                self._touch(key)
                return
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load_adapter(key, path, tensors), name=f"load_adapter:{key.name}")
            self._loading[key] = task
            task.add_done_callback(lambda _t, k=key: self._loading.pop(k, None))
        await asyncio.shield(task)

    async def _load_adapter(self, key: AdapterKey, path, tensors) -> None:
        started = time.monotonic()
        adapter = await asyncio.to_thread(self._runner.prepare, None if path is None else Path(path), tensors)
        written = asyncio.get_running_loop().create_future()
        self._post(_SlotWrite(key, adapter, written))
        await written
        log.info("adapter_registered", adapter=key.name, rank=adapter.rank,
                 load_s=round(time.monotonic() - started, 4))

    async def retire_adapter(self, key: AdapterKey) -> None:
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return
            self._last_used.pop(key, None)
            if self._refs[key] == 0:
                self._free_slots.append(slot)
                self._stats.adapter_retires += 1
            else:
                self._retiring[key] = slot

    def has_adapter(self, key: AdapterKey) -> bool:
        return key in self._slots

    def _touch(self, key: AdapterKey) -> None:
        self._use_clock += 1
        self._last_used[key] = self._use_clock

    # ---------------------------------------------------------------- generate

    async def generate(
        self, prompt_token_ids: list[int], adapter: AdapterKey | None, sampling: SamplingParams
    ) -> GenerationResult:
        self._check_alive()
        self._validate(prompt_token_ids, sampling)
        request = self._new_request(list(prompt_token_ids), adapter, sampling)
        self._post(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            self._post(_Abort(request))
            raise

    def _validate(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        runner = self._runner
        if not prompt_token_ids:
            raise EngineError("empty prompt")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= runner.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {runner.vocab_size})")
        if not 1 <= sampling.n <= self.max_rows:
            raise EngineError(f"n must be in 1..{self.max_rows} (the engine's rows)")
        if sampling.max_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise EngineError("need max_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if len(prompt_token_ids) + sampling.max_tokens > runner.max_positions:
            raise EngineError(f"prompt + max_tokens exceeds the model's {runner.max_positions} positions")

    def _new_request(self, prompt, adapter, sampling) -> _Request:
        with self._lock:
            if adapter is None:
                slot = 0
            else:
                slot = self._slots.get(adapter)
                if slot is None:
                    raise AdapterNotLoaded(f"adapter {adapter.name} is not loaded")
                self._refs[adapter] += 1
                self._touch(adapter)
        stop_ids = frozenset(sampling.stop_token_ids)
        if not self._ignore_eos:
            stop_ids |= self._runner.eos_token_ids
        return _Request(
            prompt_token_ids=prompt, adapter=adapter, slot=slot, sampling=sampling, stop_ids=stop_ids,
            future=asyncio.get_running_loop().create_future(), submitted_at=time.monotonic(),
            seeds=_row_seeds(sampling), samples=[None] * sampling.n, rows_left=sampling.n,
        )

    @property
    def capacity_rows(self) -> int:
        return self.max_rows

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
            return EngineStats(
                decode_steps=s.decode_steps, prefill_steps=s.prefill_steps,
                generated_tokens=s.generated_tokens, adapter_loads=s.adapter_loads,
                adapter_retires=s.adapter_retires, running_rows=len(self._rows),
                waiting_rows=sum(r.sampling.n for r in list(self._waiting)),
                step_tenants=list(self._step_tenants),
                shared_steps=collections.Counter(s.shared_steps),
            )

    def tokenizer(self):
        return self._tokenizer

    def _post(self, command) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wake.set()

    # ================================================================ engine thread

    def _run(self) -> None:
        if self._torch_threads > 0:  # OpenMP thread counts are per calling thread
            torch.set_num_threads(self._torch_threads)
        try:
            with torch.inference_mode():
                while True:
                    self._wake.clear()
                    self._take_inbox()
                    if self._stopping:
                        return
                    self._apply_slot_writes()
                    admitted = self._admit()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                    elif not admitted:
                        self._wake.wait()
        except BaseException as exc:  # the loop is dead: every waiter must hear it
            log.exception("torch_engine_failed")
            self._failure = repr(exc)
            self._fail_everything(f"engine failed: {exc!r}")

    def _take_inbox(self) -> None:
        if not self._inbox:
            return
        with self._lock:
            commands = list(self._inbox)
            self._inbox.clear()
        for command in commands:
            if isinstance(command, _Request):
                self._waiting.append(command)
            elif isinstance(command, _Abort):
                self._abort(command.request)
            else:
                self._pending_writes.append(command)

    # ---------------------------------------------------------------- slots

    def _apply_slot_writes(self) -> None:
        """Copy loaded adapters into free slots; runs between two steps, so no
        row ever sees a half-written slot."""
        still_waiting = []
        for write in self._pending_writes:
            slot = self._claim_slot()
            if slot is None:
                still_waiting.append(write)
                continue
            self._runner.write_slot(slot, write.adapter)
            with self._lock:
                self._slots[write.key] = slot
                self._touch(write.key)
                self._stats.adapter_loads += 1
            _resolve(write.future)
        self._pending_writes = still_waiting

    def _claim_slot(self) -> int | None:
        with self._lock:
            if self._free_slots:
                return self._free_slots.pop()
            idle = [k for k in self._slots if self._refs[k] == 0]
            if not idle:
                return None
            victim = min(idle, key=lambda k: self._last_used.get(k, 0))
            self._last_used.pop(victim, None)
            log.info("adapter_evicted", adapter=victim.name)
            return self._slots.pop(victim)

    def _release(self, request: _Request) -> None:
        """Drop a finished request's hold on its adapter (once)."""
        if request.done:
            return
        request.done = True
        key = request.adapter
        if key is None:
            return
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] <= 0:
                del self._refs[key]
                slot = self._retiring.pop(key, None)
                if slot is not None:
                    self._free_slots.append(slot)
                    self._stats.adapter_retires += 1

    # ---------------------------------------------------------------- schedule

    def _admit(self) -> list[_Request]:
        free_rows = self.max_rows - len(self._rows)
        admitted = []
        while self._waiting and self._waiting[0].sampling.n <= free_rows:
            request = self._waiting.popleft()
            free_rows -= request.sampling.n
            request.admitted_at = time.monotonic()
            admitted.append(request)
        return admitted

    def _abort(self, request: _Request) -> None:
        if request.done:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        indices = [i for i, row in enumerate(self._rows) if row.request is request]
        if indices:
            self._remove_rows(indices)
        self._release(request)

    # ---------------------------------------------------------------- execute + update

    def _prefill(self, requests: list[_Request]) -> None:
        runner = self._runner
        B0 = len(self._rows)
        logits_N_V = runner.prefill(
            [r.prompt_token_ids for r in requests], [r.slot for r in requests],
            [r.sampling.n for r in requests],
            reserve_len=max(len(r.prompt_token_ids) + r.sampling.max_tokens for r in requests),
        )
        params = [r.sampling for r in requests for _ in range(r.sampling.n)]
        seeds = [seed for r in requests for seed in r.seeds]
        new_sampling = RowSampling.build(params, seeds, runner.vocab_size, runner.device)
        self._row_sampling = self._row_sampling.cat(new_sampling)
        self._rows.extend(_Row(r, i) for r in requests for i in range(r.sampling.n))
        flags = _flags_for(params)
        tokens_N, logprobs_N = sample_tokens(logits_N_V, new_sampling, flags, runner.pos_B[B0:])
        self._last_tokens_B = torch.cat([self._last_tokens_B, tokens_N])
        now = time.monotonic()
        for request in requests:
            request.first_token_at = now
        with self._lock:
            self._stats.prefill_steps += 1
        self._rows_changed()
        self._record(B0, tokens_N.tolist(), logprobs_N.tolist())

    def _decode(self) -> None:
        runner = self._runner
        logits_B_V = runner.decode(self._last_tokens_B)
        tokens_B, logprobs_B = sample_tokens(logits_B_V, self._row_sampling, self._flags, runner.pos_B)
        self._last_tokens_B = tokens_B
        with self._lock:
            self._stats.decode_steps += 1
            self._stats.generated_tokens += len(self._rows)
            self._step_tenants.append(self._tenants)
            self._stats.shared_steps.update(self._tenant_pairs)
        self._record(0, tokens_B.tolist(), logprobs_B.tolist())

    def _record(self, start: int, tokens: list[int], logprobs: list[float]) -> None:
        """Append each row's new token; retire rows that stopped."""
        finished = []
        rows = self._rows
        for offset, (token, logprob) in enumerate(zip(tokens, logprobs)):
            row = rows[start + offset]
            row.token_ids.append(token)
            row.logprobs.append(logprob)
            if token in row.request.stop_ids or len(row.token_ids) >= row.request.sampling.max_tokens:
                finished.append(start + offset)
        if finished:
            self._finish(finished)

    def _finish(self, indices: list[int]) -> None:
        now = time.monotonic()
        finished_rows = [self._rows[i] for i in indices]
        self._remove_rows(indices)  # before resolving: a caller's next stats() no longer sees them
        for row in finished_rows:
            request = row.request
            reason = "stop" if row.token_ids[-1] in request.stop_ids else "length"
            request.samples[row.sample_index] = GeneratedSample(row.token_ids, row.logprobs, reason)
            request.rows_left -= 1
            if request.rows_left == 0:
                self._complete(request, now)

    def _complete(self, request: _Request, now: float) -> None:
        self._release(request)
        _resolve(request.future, GenerationResult(
            prompt_token_ids=request.prompt_token_ids,
            samples=request.samples,
            adapter=request.adapter,
            queue_wait_s=request.admitted_at - request.submitted_at,
            time_to_first_token_s=request.first_token_at - request.submitted_at,
            decode_s=now - request.first_token_at,
        ))

    def _remove_rows(self, indices: list[int]) -> None:
        order_B = self._runner.remove_rows(indices)
        order = order_B.tolist()
        self._rows = [self._rows[i] for i in order]
        self._row_sampling = self._row_sampling.select(order_B)
        self._last_tokens_B = self._last_tokens_B.index_select(0, order_B)
        self._rows_changed()

    def _rows_changed(self) -> None:
        self._flags = _flags_for([row.request.sampling for row in self._rows])
        self._tenants = frozenset(
            None if row.request.adapter is None else row.request.adapter.tenant for row in self._rows
        )
        named = sorted(t for t in self._tenants if t is not None)
        self._tenant_pairs = [f"{a}|{b}" for i, a in enumerate(named) for b in named[i + 1:]]

    def _fail_everything(self, reason: str) -> None:
        """Fail every request and pending write (the loop is gone)."""
        with self._lock:
            commands = list(self._inbox)
            self._inbox.clear()
        requests = {id(r.request): r.request for r in self._rows}
        requests.update({id(r): r for r in self._waiting})
        requests.update({id(c): c for c in commands if isinstance(c, _Request)})
        for request in requests.values():
            self._release(request)
            _resolve(request.future, error=EngineError(reason))
        writes = self._pending_writes + [c for c in commands if isinstance(c, _SlotWrite)]
        for write in writes:
            _resolve(write.future, error=EngineError(reason))
        self._pending_writes, self._waiting, self._rows = [], collections.deque(), []


def _flags_for(params: list[SamplingParams]) -> SamplingFlags:
    return SamplingFlags(
        any_sampled=any(p.temperature > 0 for p in params),
        any_greedy=any(p.temperature == 0 for p in params),
        any_truncation=any(p.top_k > 0 or p.top_p < 1.0 for p in params if p.temperature > 0),
    )


_SYSTEM_RANDOM = random.SystemRandom()


def _row_seeds(sampling: SamplingParams) -> list[int]:
    """One 31-bit seed per sample: derived from the request seed (reproducible)
    or drawn from the OS (seed None)."""
    if sampling.seed is None:
        return [_SYSTEM_RANDOM.getrandbits(31) for _ in range(sampling.n)]
    return [random.Random(sampling.seed * 1_000_003 + i).getrandbits(31) for i in range(sampling.n)]
