"""Multi-adapter LoRA on the routed experts of MoE models (transformers' fused `*Experts` modules).

transformers 5 stores a MoE layer's routed experts as 3-D `nn.Parameter`s inside one module,
called as `experts(hidden_states, top_k_index, top_k_weights)` on tokens flattened to
(tokens, hidden): `gate_up_proj` (or `up_proj` for non-gated experts) and `down_proj`, each
[E, out, in], or [E, in, out] when the module says `is_transposed` (gpt-oss), plus optional
`<name>_bias` [E, out] (kept frozen). `LoraExperts` wraps such a module and gives every adapter,
for every expert e and projection, a LoRA pair exactly as PEFT's `target_parameters`
(`lora.ParamWrapper`) does: W_e + scaling * B_e @ A_e in the (out, in) orientation, with the
per-adapter tensors in PEFT's flat layout, lora_A [r*E, in] (expert e: rows e*r..e*r+r) and
lora_B [out, r*E] (expert e: columns e, E+e, 2E+e, ...), so they save and load as PEFT's.

Multi-tenant: the routing `Segment`s are rows of the batch; a row of the (rows, seq) batch is
tokens [start*seq, end*seq) of the flattened input (`token_ranges`, which `LoraLinear` uses
too). Token-expert pairs are sorted by (expert, adapter): the base projection is one matmul per
expert that got tokens (as transformers' own grouped kernels), and each adapter's low-rank delta
one pair of matmuls per non-empty (expert, adapter) group. Tokens of rows without an adapter
get the base projection only. When no row has an adapter on this layer the wrapped module runs
unchanged (its configured experts implementation).
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # lora.py imports this module
    from tinkerd.model.lora import Routing, Segment

# 3-D expert weights that transformers' experts kernels (integrations/moe.py) understand:
# gated (`gate_up_proj` + `down_proj`) or plain (`up_proj` + `down_proj`) experts.
EXPERT_LAYOUTS = (("gate_up_proj", "down_proj"), ("up_proj", "down_proj"))

# (A [r*E, in], B [out, r*E], scaling), PEFT's flat layout.
LoraPair = tuple[torch.Tensor, torch.Tensor, float]


def token_ranges(segments: "list[Segment]", leading: int) -> list[tuple[int, int]]:
    """Each routing segment's [start, end) along an input's leading dimension of size `leading`.

    Segments count rows of the (rows, seq) batch. A module called on (rows, seq, ...) sees them
    as they are; one called on tokens flattened to (rows × seq, ...) (routed experts, and the
    shared experts of Qwen2-MoE-like blocks) sees row r as tokens [r·seq, (r+1)·seq). Any
    leading size that is a multiple of the rows maps that way (a multiple of 1 for the former)."""
    rows = segments[-1].end if segments else 0
    if rows <= 0 or leading % rows:
        raise ValueError(f"{leading} tokens do not split into the routing's {rows} rows")
    per_row = leading // rows
    return [(s.start * per_row, s.end * per_row) for s in segments]


def expert_param_names(module: nn.Module) -> list[str]:
    """The 3-D expert weights of `module` in registration order (PEFT's nesting order), or []
    if it isn't a fused experts module: its own parameters hold one of EXPERT_LAYOUTS, all 3-D
    with the same leading (expert) dimension."""
    params = dict(module.named_parameters(recurse=False))
    for layout in EXPERT_LAYOUTS:
        if not all(n in params and params[n].dim() == 3 for n in layout):
            continue
        if len({params[n].shape[0] for n in layout}) != 1:
            continue
        return [n for n in params if n in layout]
    return []


class LoraExperts(nn.Module):
    """A frozen fused-experts module plus the per-expert LoRA pairs of any number of adapters."""

    def __init__(self, base: nn.Module, routing: "Routing", param_names: list[str]) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.param_names = list(param_names)
        self.is_transposed = bool(getattr(base, "is_transposed", False))
        # adapter_id -> parameter name -> (A, B, scaling). Not registered as parameters.
        self.adapters: dict[str, dict[str, LoraPair]] = {}

    @property
    def num_experts(self) -> int:
        return int(getattr(self.base, self.param_names[0]).shape[0])

    def in_out(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one expert's projection `name` (as PEFT reads them)."""
        _, d1, d2 = getattr(self.base, name).shape
        return (int(d1), int(d2)) if self.is_transposed else (int(d2), int(d1))

    def peft_module_path(self, path: str, name: str) -> str:
        """PEFT's saved module path for parameter `name` of the experts module at `path`: PEFT
        nests one ParamWrapper per targeted parameter in registration order, so the first
        parameter sits under one `.base_layer` per parameter registered after it."""
        depth = len(self.param_names) - 1 - self.param_names.index(name)
        return path + ".base_layer" * depth

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        segments = self.routing.segments
        active = [self.adapters.get(s.adapter_id) if s.adapter_id else None for s in segments]
        if all(a is None for a in active) or args or kwargs:
            if any(a is not None for a in active):
                raise TypeError("LoraExperts: unexpected extra arguments with LoRA active")
            return self.base(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return self._lora_forward(hidden_states, top_k_index, top_k_weights, segments, active)

    def _lora_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        segments: "list[Segment]",
        active: list[dict[str, LoraPair] | None],
    ) -> torch.Tensor:
        if hidden_states.dim() != 2:
            raise ValueError(f"experts expect (tokens, hidden), got {tuple(hidden_states.shape)}")
        tokens = hidden_states.shape[0]
        ranges = token_ranges(segments, tokens)
        device = hidden_states.device
        n_experts = self.num_experts
        top_k = top_k_index.shape[-1]

        # One slot per adapter used on this layer (a row's adapter may appear in several
        # segments); slot n_slots: rows without LoRA here.
        slot_of: dict[str, int] = {}
        slot_loras: list[dict[str, LoraPair]] = []
        for seg, loras in zip(segments, active, strict=True):
            if loras is not None and seg.adapter_id not in slot_of:
                slot_of[seg.adapter_id] = len(slot_loras)
                slot_loras.append(loras)
        n_slots = len(slot_loras)
        token_slot = torch.full((tokens,), n_slots, dtype=torch.long, device=device)
        for seg, (start, end), loras in zip(segments, ranges, active, strict=True):
            if loras is not None:
                token_slot[start:end] = slot_of[seg.adapter_id]

        # Token-expert pairs sorted by (expert, slot): experts are contiguous blocks (one base
        # matmul each), (expert, slot) groups contiguous inside them (one LoRA pair each).
        expert_ids = top_k_index.reshape(-1).long()
        pair_slot = token_slot.repeat_interleave(top_k)
        key = expert_ids * (n_slots + 1) + pair_slot
        key_sorted, perm = torch.sort(key, stable=True)
        counts = torch.bincount(key_sorted, minlength=n_experts * (n_slots + 1))
        groups = [(g // (n_slots + 1), g % (n_slots + 1)) for g in counts.nonzero()[:, 0].tolist()]
        group_sizes = counts[counts > 0].tolist()
        expert_sizes = counts.view(n_experts, n_slots + 1).sum(1)
        experts_hit = expert_sizes.nonzero()[:, 0].tolist()
        expert_sizes = expert_sizes[expert_sizes > 0].tolist()
        plan = _Plan(groups, group_sizes, experts_hit, expert_sizes, slot_loras)

        x = hidden_states[perm // top_k]
        first, down = self.param_names[0], self.param_names[-1]
        h = self._project(x, first, plan)
        if first == "gate_up_proj":
            h = self.base._apply_gate(h) if hasattr(self.base, "_apply_gate") else _gate(self, h)
        else:
            h = self.base.act_fn(h)
        y = self._project(h, down, plan)
        if getattr(self.base, "has_post_expert_norm", False):
            y = self.base.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=device)
        y = y[inv].view(tokens, top_k, -1).sum(dim=1)
        return y.to(hidden_states.dtype)

    def _project(self, x: torch.Tensor, name: str, plan: "_Plan") -> torch.Tensor:
        """Base projection `name` of every pair (per expert) plus each group's LoRA delta."""
        weight = getattr(self.base, name)
        bias = getattr(self.base, f"{name}_bias", None)
        outs = []
        for e, part in zip(plan.experts_hit, x.split(plan.expert_sizes), strict=True):
            out = part @ weight[e] if self.is_transposed else F.linear(part, weight[e])
            if bias is not None:
                out = out + bias[e]
            outs.append(out)
        base_out = torch.cat(outs)
        n_experts = self.num_experts
        deltas = []
        any_delta = False
        for (e, slot), part in zip(plan.groups, x.split(plan.group_sizes), strict=True):
            pair = plan.slot_loras[slot].get(name) if slot < len(plan.slot_loras) else None
            if pair is None:
                deltas.append(base_out.new_zeros((part.shape[0], base_out.shape[-1])))
                continue
            a, b, scaling = pair
            rank = a.shape[0] // n_experts
            a_e = a.view(n_experts, rank, a.shape[-1])[e].to(part.dtype)  # (r, in)
            b_e = b.view(b.shape[0], rank, n_experts)[:, :, e]  # (out, r)
            deltas.append(F.linear(F.linear(part, a_e), (b_e * scaling).to(part.dtype)))
            any_delta = True
        if not any_delta:
            return base_out
        return base_out + torch.cat(deltas).to(base_out.dtype)


class _Plan:
    """The grouping of one forward's sorted token-expert pairs (shared by both projections)."""

    def __init__(
        self,
        groups: list[tuple[int, int]],
        group_sizes: list[int],
        experts_hit: list[int],
        expert_sizes: list[int],
        slot_loras: list[dict[str, LoraPair]],
    ) -> None:
        self.groups = groups
        self.group_sizes = group_sizes
        self.experts_hit = experts_hit
        self.expert_sizes = expert_sizes
        self.slot_loras = slot_loras


def _gate(experts: LoraExperts, gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' default gating (`_default_apply_gate`): act(gate) * up, concatenated."""
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.base.act_fn(gate) * up
