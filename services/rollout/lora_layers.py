"""Multi-LoRA linear layers: stacked per-slot adapters, one gathered low-rank
product for the whole batch (the BGMV idea), and the layout of a PEFT
adapter's tensors into those slots (the files themselves are read by
``shared.peft_files``).

A ``MultiLoraLinear`` fuses the linears of one decoder layer that read the
same input (q/k/v, gate/up) into one base matmul, and keeps for every slot
``S`` the LoRA factors of all its targeted members side by side:

- ``lora_A_S_I_R``: [slots, in, R] with R = rank x number of targeted members
  (member t owns columns ``t*rank : (t+1)*rank``; a smaller rank is zero-padded);
- ``lora_B_S_R_O``: [slots, R, out] block-diagonal (member t's rows map only to
  its own output columns), with the adapter's scaling already folded in.

Slot 0 stays all zeros: the base model. A forward gathers the factors of every
row's slot once (``index_select``) and applies ``base(x) + (x @ A_row) @ B_row``
with two batched matmuls: one gathered low-rank product per layer group for
the whole batch, whatever the mix of adapters (BGMV). The factors are stored
pre-transposed so the gathered tensors feed ``bmm`` contiguously.

Decode steps may instead use a segment plan (SGMV): rows grouped by slot into
a padded [groups, rows per group] layout, so the gather takes one copy of the
factors per adapter in the batch rather than one per row and each ``bmm``
multiplies G real matrices instead of B matrix-vector pairs. Still one
gathered product for the whole batch; on CPU it costs about a third of BGMV
when several rows share an adapter (the usual case: n samples per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared.engine import EngineError, LoraSignature
from shared.peft_files import parse_lora_key

# Groups of one decoder layer: (submodule, group name, members sharing one input).
LORA_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", "o", ("o_proj",)),
    ("mlp", "gate_up", ("gate_proj", "up_proj")),
    ("mlp", "down", ("down_proj",)),
)
MODULE_TO_GROUP: dict[str, str] = {m: g for _, g, members in LORA_GROUPS for m in members}


class SlotSelection:
    """The per-row slot index of the forward in progress, shared by every
    ``MultiLoraLinear`` of a model. ``slot_idx_B`` None: no row uses an
    adapter, so the LoRA path is skipped entirely (the base model's cost).

    ``reuse_key`` not None: the gathered factors of a layer may be reused by
    the next forward with the same key. Decode steps of an unchanged batch
    (same rows, no slot written) share a key, so the gather runs once per
    batch change instead of once per step."""

    def __init__(self) -> None:
        self.slot_idx_B: torch.Tensor | None = None
        self.reuse_key: int | None = None
        self.segments: SegmentPlan | None = None

    def select(
        self, slot_idx_B: torch.Tensor | None, reuse_key: int | None = None,
        segments: "SegmentPlan | None" = None,
    ) -> None:
        self.slot_idx_B = slot_idx_B
        self.reuse_key = reuse_key
        self.segments = segments


@dataclass
class SegmentPlan:
    """Rows grouped by slot for one-token steps: group g holds up to M rows of
    slot ``slot_G[g]``; ``gather_GM`` lists, group after group, the batch row
    of every padded position (padding repeats a row of the group, its output
    is never read); ``position_B`` is each row's padded position."""

    slot_G: torch.Tensor
    gather_GM: torch.Tensor
    position_B: torch.Tensor
    groups: int
    per_group: int

    @staticmethod
    def build(slots_B: list[int], device, max_padding: float = 2.0) -> "SegmentPlan | None":
        """None when padding would exceed ``max_padding`` x the rows (use BGMV)."""
        rows_by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots_B):
            rows_by_slot.setdefault(slot, []).append(row)
        groups, per_group = len(rows_by_slot), max(len(r) for r in rows_by_slot.values())
        if groups * per_group > max_padding * len(slots_B):
            return None
        gather, position = [], [0] * len(slots_B)
        for g, rows in enumerate(rows_by_slot.values()):
            for j, row in enumerate(rows):
                position[row] = g * per_group + j
            gather.extend(rows + [rows[0]] * (per_group - len(rows)))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return SegmentPlan(as_tensor(list(rows_by_slot)), as_tensor(gather), as_tensor(position),
                           groups, per_group)


class MultiLoraLinear(nn.Module):
    """Fused base linears of one input plus stacked per-slot LoRA factors."""

    # buffers, registered in __init__ (declared here for the type checker)
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A_S_I_R: torch.Tensor
    lora_B_S_R_O: torch.Tensor

    def __init__(
        self,
        linears: dict[str, nn.Linear],
        targets: tuple[str, ...],
        num_slots: int,
        rank: int,
        selection: SlotSelection,
    ) -> None:
        super().__init__()
        self.member_names = tuple(linears)
        self.out_sizes = tuple(lin.out_features for lin in linears.values())
        self.in_features = next(iter(linears.values())).in_features
        self.rank = rank
        self.selection = selection
        first = next(iter(linears.values()))
        device, dtype = first.weight.device, first.weight.dtype
        self.register_buffer("weight", torch.cat([lin.weight.detach() for lin in linears.values()]))
        has_bias = any(lin.bias is not None for lin in linears.values())
        bias = None
        if has_bias:
            bias = torch.cat([
                lin.bias.detach() if lin.bias is not None
                else torch.zeros(lin.out_features, device=device, dtype=dtype)
                for lin in linears.values()
            ])
        self.register_buffer("bias", bias)
        self.lora_members = tuple(name for name in self.member_names if name in targets)
        lora_rank_total = rank * len(self.lora_members)
        out_total = sum(self.out_sizes)
        self.register_buffer(
            "lora_A_S_I_R",
            torch.zeros(num_slots, self.in_features, lora_rank_total, device=device, dtype=dtype),
        )
        self.register_buffer(
            "lora_B_S_R_O",
            torch.zeros(num_slots, lora_rank_total, out_total, device=device, dtype=dtype),
        )
        self._gathered_key: int | None = None
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def gathered_bytes_per_row(self) -> int:
        """Size of one row's gathered factors (what reuse keeps per row)."""
        per_slot = self.lora_A_S_I_R[0].numel() + self.lora_B_S_R_O[0].numel()
        return per_slot * self.lora_A_S_I_R.element_size()

    def member_out_offset(self, name: str) -> int:
        index = self.member_names.index(name)
        return sum(self.out_sizes[:index])

    def forward(self, x_B_T_I: torch.Tensor) -> torch.Tensor:
        y_B_T_O = torch.nn.functional.linear(x_B_T_I, self.weight, self.bias)
        slot_idx_B = self.selection.slot_idx_B
        if slot_idx_B is None or not self.lora_members:
            return y_B_T_O
        segments = self.selection.segments
        if segments is not None and x_B_T_I.shape[1] == 1:
            return self._forward_segments(x_B_T_I, y_B_T_O, segments)
        a_B_I_R, b_B_R_O = self._gather(slot_idx_B)
        return y_B_T_O.baddbmm_(torch.bmm(x_B_T_I, a_B_I_R), b_B_R_O)

    def _forward_segments(self, x_B_1_I, y_B_1_O, plan: SegmentPlan) -> torch.Tensor:
        B = x_B_1_I.shape[0]
        a_G_I_R, b_G_R_O = self._gather(plan.slot_G)
        x_G_M_I = x_B_1_I.view(B, -1).index_select(0, plan.gather_GM).view(plan.groups, plan.per_group, -1)
        delta_G_M_O = torch.bmm(torch.bmm(x_G_M_I, a_G_I_R), b_G_R_O)
        delta_B_O = delta_G_M_O.view(plan.groups * plan.per_group, -1).index_select(0, plan.position_B)
        return y_B_1_O.add_(delta_B_O.view(B, 1, -1))

    def _gather(self, slot_idx_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.selection.reuse_key
        if key is not None and key == self._gathered_key and self._gathered is not None:
            return self._gathered
        gathered = (
            self.lora_A_S_I_R.index_select(0, slot_idx_B),
            self.lora_B_S_R_O.index_select(0, slot_idx_B),
        )
        self._gathered_key, self._gathered = key, (gathered if key is not None else None)
        return gathered

    def write_slot(self, slot: int, a_I_R: torch.Tensor, b_R_O: torch.Tensor) -> None:
        self.lora_A_S_I_R[slot].copy_(a_I_R)
        self.lora_B_S_R_O[slot].copy_(b_R_O)

    def empty_slot_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero factors shaped like one slot, on CPU in fp32 (filled by parsing)."""
        return (
            torch.zeros(self.lora_A_S_I_R.shape[1:], dtype=torch.float32),
            torch.zeros(self.lora_B_S_R_O.shape[1:], dtype=torch.float32),
        )


# ------------------------------------------------------------ adapter layout


@dataclass
class PreparedAdapter:
    """An adapter laid out for the slots of one model: for every
    (layer index, group name), the slot factors (A [in, R], B [R, out]) on the
    engine's device and dtype, scaling folded into B. Copying it into a slot
    is a handful of ``copy_`` calls."""

    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    rank: int


def prepare_adapter(
    tensors: dict[str, torch.Tensor],
    scaling: float,
    signature: LoraSignature,
    layers: list[dict[str, MultiLoraLinear]],
    device: torch.device,
    dtype: torch.dtype,
) -> PreparedAdapter:
    """Validate PEFT-named tensors against the model's slots and lay them out.
    ``layers[i][group]`` is layer i's ``MultiLoraLinear`` of that group."""
    pairs = _pair_factors(tensors, signature, layers)
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rank_seen = 0
    for (layer_idx, module), (a_r_in, b_out_r) in sorted(pairs.items()):
        group = layers[layer_idx][MODULE_TO_GROUP[module]]
        key = (layer_idx, MODULE_TO_GROUP[module])
        if key not in factors:
            factors[key] = group.empty_slot_factors()
        a_I_R, b_R_O = factors[key]
        rank = a_r_in.shape[0]
        rank_seen = max(rank_seen, rank)
        col = signature.rank * group.lora_members.index(module)
        out = group.member_out_offset(module)
        a_I_R[:, col:col + rank] = a_r_in.T.float()
        b_R_O[col:col + rank, out:out + b_out_r.shape[0]] = b_out_r.T.float() * scaling
    prepared = {
        key: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
        for key, (a, b) in factors.items()
    }
    return PreparedAdapter(factors=prepared, scaling=scaling, rank=rank_seen)


def _pair_factors(
    tensors: dict[str, torch.Tensor],
    signature: LoraSignature,
    layers: list[dict[str, MultiLoraLinear]],
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Group tensors into (layer, module) -> (A [r, in], B [out, r]) with every check."""
    if not tensors:
        raise EngineError("adapter holds no tensors")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = parse_lora_key(name)
        if parsed is None:
            raise EngineError(f"unexpected adapter tensor {name!r} (only LoRA A/B of decoder layers)")
        layer_idx, module, half = parsed
        if module not in signature.target_modules:
            raise EngineError(
                f"adapter targets {module!r}, not in the signature {list(signature.target_modules)}"
            )
        if layer_idx >= len(layers):
            raise EngineError(f"adapter tensor {name!r}: the model has {len(layers)} layers")
        if half in halves.setdefault((layer_idx, module), {}):
            raise EngineError(f"adapter holds two lora_{half} tensors for layer {layer_idx} {module}")
        halves[(layer_idx, module)][half] = tensor
    pairs = {}
    for (layer_idx, module), found in halves.items():
        if set(found) != {"A", "B"}:
            raise EngineError(f"layer {layer_idx} {module}: needs both lora_A and lora_B")
        a, b = found["A"], found["B"]
        _check_shapes(layer_idx, module, a, b, signature, layers[layer_idx][MODULE_TO_GROUP[module]])
        pairs[(layer_idx, module)] = (a, b)
    _check_finite(pairs)
    return pairs


def _check_finite(pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One check over every factor (per-tensor checks cost more than the
    load); the slow search for the culprit runs only on failure."""
    flat = torch.cat([t.reshape(-1).float() for pair in pairs.values() for t in pair])
    if bool(torch.isfinite(flat).all()):
        return
    for (layer_idx, module), (a, b) in sorted(pairs.items()):
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise EngineError(f"layer {layer_idx} {module}: non-finite values")


def _check_shapes(
    layer_idx: int, module: str, a: torch.Tensor, b: torch.Tensor,
    signature: LoraSignature, group: MultiLoraLinear,
) -> None:
    where = f"layer {layer_idx} {module}"
    out_size = group.out_sizes[group.member_names.index(module)]
    if a.ndim != 2 or b.ndim != 2:
        raise EngineError(f"{where}: lora_A and lora_B must be matrices")
    rank = a.shape[0]
    if a.shape[1] != group.in_features or b.shape != (out_size, rank):
        raise EngineError(
            f"{where}: shapes A {tuple(a.shape)} B {tuple(b.shape)} do not fit the model "
            f"(expected A [r, {group.in_features}], B [{out_size}, r])"
        )
    if rank > signature.rank:
        raise EngineError(f"{where}: rank {rank} exceeds the signature's rank {signature.rank}")
