"""The torch engine's model runner: batched multi-LoRA forward passes with
a per-row KV cache. Single-threaded, no asyncio: the engine thread of
``services.rollout.torch_engine.TorchEngine`` drives it.

A Hugging Face causal LM (Qwen3, Qwen2, Llama families) whose decoder layers
are re-driven by a lean forward of our own, reusing the model's weights:
q/k/v and gate/up fused into ``MultiLoraLinear`` groups with stacked per-slot
LoRA factors and a per-row slot index (one gathered low-rank product per
group for the whole batch), and a preallocated per-row KV cache. Rows live
compacted at batch indices ``0..B-1``; each row's tokens sit at cache
positions ``0..pos-1`` of its own cache row (no padding, no rebuild): a
decode step writes the new key/value at the row's own position
(``scatter_``) and masks keys past it; rows that leave are filled by moving
the last rows into the holes (swap-remove), so only moved rows are copied.

Shape suffixes: ``_B`` rows, ``_R`` prompts of one prefill, ``_N`` new rows
of one prefill, ``_P`` / ``_L`` / ``_T`` positions, ``_H`` hidden, ``_D`` head
dimension, ``_V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.rollout.lora_layers import (
    LORA_GROUPS,
    MODULE_TO_GROUP,
    MultiLoraLinear,
    PreparedAdapter,
    SegmentPlan,
    SlotSelection,
    prepare_adapter,
)
from shared.devices import resolve_device, resolve_dtype
from shared.engine import EngineError, LoraSignature
from shared.peft_files import PeftFormatError, lora_scaling, read_peft_dir

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
CACHE_LENGTH_QUANTUM = 64  # cache length grows in multiples of this many positions
# Reuse gathered LoRA factors across decode steps only while they take less
# than this (a big model x many rows would rather gather every step).
GATHER_REUSE_MAX_BYTES = 1 << 30


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
    act: Callable[[torch.Tensor], torch.Tensor]


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
            try:
                tensors, config = read_peft_dir(Path(path))
                scaling, _ = lora_scaling(config, self.signature, Path(path))
            except PeftFormatError as exc:
                raise EngineError(str(exc)) from exc
        else:
            assert tensors is not None  # exactly one of the two was given
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
        new_pos = [length for length, c in zip(lens, copies_R, strict=True) for _ in range(c)]
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
        for hole, mover in zip(holes, movers, strict=True):
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
