"""Multi-adapter LoRA: one frozen base model, many low-rank adapters, chosen per batch row.

Each targeted `nn.Linear` is wrapped in a `LoraLinear` that holds a reference to every adapter's
(A, B) pair for that layer. Before a forward pass the caller sets the routing: contiguous
segments of the batch's rows and the adapter each segment uses (rows are sorted by adapter, so
each adapter's low-rank matmuls are one call per layer). A layer called on tokens flattened to
(rows × seq, hidden), as Qwen3.5-MoE's shared expert is, maps the row segments to token ranges
(`token_ranges`, shared with the experts). Rows whose adapter is None run the plain base model.
Gradients reach only the adapter a row used, because that adapter's parameters are the only
ones on the row's path.

MoE models' routed experts (fused 3-D parameters in a transformers `*Experts` module) are wrapped
in a `LoraExperts` (tinkerd/model/moe_lora.py) instead, with one LoRA pair per expert and
projection, PEFT's `target_parameters` layout. Such a target is named `<module path>/<parameter>`
(`EXPERT_TARGET_SEP`), e.g. `model.layers.0.mlp.experts/gate_up_proj`; its tensors carry PEFT's
saved names (`...experts.base_layer.lora_A.weight` for the inner of PEFT's nested wrappers).
Routers are not adapted (they are not `nn.Linear` in transformers 5).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.constants import EXPERT_TARGET_SEP, module_kind
from tinkerd.model.moe_lora import LoraExperts, expert_param_names, token_ranges


@dataclass(frozen=True)
class LoraConfig:
    """Tinker's LoRA options (`lora_config` of create_model); alpha defaults to 32 as in Tinker."""

    rank: int = 32
    alpha: float = 32.0
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("at least one of train_attn, train_mlp, train_unembed must be true")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch use `adapter_id` (None: the base model)."""

    adapter_id: str | None
    start: int
    end: int


@dataclass
class Routing:
    """Shared by all LoraLinear layers of one model: the segments of the current batch."""

    segments: list[Segment] = field(default_factory=list)


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus the LoRA pairs of any number of adapters."""

    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        # adapter_id -> (A [r, in], B [out, r], scaling). Not registered as submodule
        # parameters: adapters own their tensors and come and go at runtime.
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        segments = self.routing.segments
        pairs = [self.adapters.get(s.adapter_id) if s.adapter_id else None for s in segments]
        if all(p is None for p in pairs):
            return out
        if len(segments) == 1:
            return out + self._delta(x, pairs[0], out.dtype)
        if self._uniform(segments, pairs):
            return out + self._batched_delta(x, pairs, len(segments), out.dtype)
        # Rows of a (rows, seq, in) input, or their token ranges when the module sees tokens
        # flattened to (rows × seq, in) (e.g. Qwen3.5-MoE's shared expert).
        ranges = token_ranges(segments, x.shape[0])
        # split/cat rather than slicing: the backward of a slice zero-fills a full-size
        # gradient per segment, the backward of split is a single concatenation.
        parts = x.split([end - start for start, end in ranges])
        deltas = [
            self._delta(part, pair, out.dtype)
            if pair is not None
            else out.new_zeros((*part.shape[:-1], self.out_features))
            for part, pair in zip(parts, pairs, strict=True)
        ]
        return out + torch.cat(deltas)

    @staticmethod
    def _uniform(
        segments: list[Segment], pairs: list[tuple[torch.Tensor, torch.Tensor, float] | None]
    ) -> bool:
        """Every segment has an adapter, the same number of rows and the same rank: the
        shape of RL batches (many tenants, one or a few rows each)."""
        size = segments[0].end - segments[0].start
        rank = pairs[0][0].shape[0] if pairs[0] is not None else -1
        return all(
            p is not None and p[0].shape[0] == rank and s.end - s.start == size
            for s, p in zip(segments, pairs, strict=True)
        )

    @staticmethod
    def _batched_delta(
        x: torch.Tensor,
        pairs: list[tuple[torch.Tensor, torch.Tensor, float]],
        n: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """All segments' low-rank products as two batched matmuls instead of 2n small ones."""
        a = torch.stack([p[0] for p in pairs]).to(dtype)  # (n, r, in)
        b = torch.stack([p[1] * p[2] for p in pairs]).to(dtype)  # (n, out, r)
        xs = x.to(dtype).reshape(n, -1, x.shape[-1])  # (n, rows*tokens, in)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        return delta.reshape(*x.shape[:-1], b.shape[1])

    @staticmethod
    def _delta(
        x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor, float], dtype: torch.dtype
    ) -> torch.Tensor:
        a, b, scaling = pair
        return F.linear(F.linear(x.to(dtype), a.to(dtype)), (b * scaling).to(dtype))


@dataclass
class Adapter:
    """One tenant's LoRA weights: PEFT-named parameters and the config they were built from."""

    adapter_id: str
    config: LoraConfig
    params: dict[str, nn.Parameter]  # "<module path>.lora_A.weight" / ".lora_B.weight"
    trainable: bool = True

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


class MultiLoraModel:
    """Wraps a causal LM's attention, MLP and unembedding Linears with LoraLinear, and its MoE
    experts modules with LoraExperts, in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.routing = Routing()
        self.layers: dict[str, LoraLinear] = {}
        # Experts module path -> its wrapper; targets `<path>/<parameter>` live in `kinds`.
        self.expert_layers: dict[str, LoraExperts] = {}
        self.kinds: dict[str, str] = {}
        self.adapters: dict[str, Adapter] = {}
        unembed = model.get_output_embeddings()
        for path, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                kind = "unembed" if module is unembed else module_kind(path)
                if kind is None:
                    continue
                wrapper = LoraLinear(module, self.routing)
                self.layers[path] = wrapper
                self.kinds[path] = kind
            else:
                names = expert_param_names(module) if path else []
                if not names or module_kind(f"{path}.{names[0]}") != "mlp":
                    continue
                wrapper = LoraExperts(module, self.routing, names)
                self.expert_layers[path] = wrapper
                for name in names:
                    self.kinds[f"{path}{EXPERT_TARGET_SEP}{name}"] = "mlp"
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, wrapper)

    def target_paths(self, config: LoraConfig) -> list[str]:
        wanted = {"attn": config.train_attn, "mlp": config.train_mlp}
        wanted["unembed"] = config.train_unembed
        return [p for p in self.kinds if wanted[self.kinds[p]]]

    def peft_module_path(self, target: str) -> str:
        """The module path of `target`'s tensors in PEFT's saved names (`<it>.lora_A.weight`)."""
        path, sep, name = target.partition(EXPERT_TARGET_SEP)
        return self.expert_layers[path].peft_module_path(path, name) if sep else target

    def _shape(self, target: str, rank: int) -> tuple[tuple[int, int], tuple[int, int], int]:
        """(A shape, B shape, in_features) of `target`'s LoRA pair at `rank` (PEFT's layout:
        experts stack their per-expert pairs as A [rank*E, in], B [out, rank*E])."""
        path, sep, name = target.partition(EXPERT_TARGET_SEP)
        if sep:
            layer = self.expert_layers[path]
            fan_in, fan_out = layer.in_out(name)
            stacked = rank * layer.num_experts
            return (stacked, fan_in), (fan_out, stacked), fan_in
        linear = self.layers[target]
        return (rank, linear.in_features), (linear.out_features, rank), linear.in_features

    def _device(self, target: str) -> torch.device:
        path, sep, name = target.partition(EXPERT_TARGET_SEP)
        if sep:
            return getattr(self.expert_layers[path].base, name).device
        return self.layers[target].weight.device

    def add_adapter(self, adapter_id: str, config: LoraConfig) -> Adapter:
        """Create an adapter: A from a seeded Kaiming-uniform init (as PEFT), B zero."""
        if adapter_id in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} already exists")
        gen = torch.Generator(device="cpu")
        if config.seed is not None:
            gen.manual_seed(config.seed)
        else:
            gen.seed()  # fresh entropy, without reseeding torch's global RNG
        params: dict[str, nn.Parameter] = {}
        for target in self.target_paths(config):
            a_shape, b_shape, fan_in = self._shape(target, config.rank)
            device = self._device(target)
            a = torch.empty(a_shape)
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound
            a.uniform_(-bound, bound, generator=gen)
            b = torch.zeros(b_shape)
            name = self.peft_module_path(target)
            params[f"{name}.lora_A.weight"] = nn.Parameter(a.to(device))
            params[f"{name}.lora_B.weight"] = nn.Parameter(b.to(device))
        adapter = Adapter(adapter_id, config, params)
        self._attach(adapter)
        return adapter

    def _attach(self, adapter: Adapter) -> None:
        self.adapters[adapter.adapter_id] = adapter
        scaling = adapter.config.scaling
        for target in self.target_paths(adapter.config):
            name = self.peft_module_path(target)
            pair = (
                adapter.params[f"{name}.lora_A.weight"],
                adapter.params[f"{name}.lora_B.weight"],
            )
            path, sep, param = target.partition(EXPERT_TARGET_SEP)
            if sep:
                experts = self.expert_layers[path].adapters.setdefault(adapter.adapter_id, {})
                experts[param] = (*pair, scaling)
            else:
                self.layers[target].adapters[adapter.adapter_id] = (*pair, scaling)

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id)
        for layer in self.layers.values():
            layer.adapters.pop(adapter_id, None)
        for experts in self.expert_layers.values():
            experts.adapters.pop(adapter_id, None)

    def load_weights(self, adapter_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors into an adapter (shapes must match its config)."""
        adapter = self.adapters[adapter_id]
        missing = set(adapter.params) - set(tensors)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, param in adapter.params.items():
                src = tensors[name]
                if src.shape != param.shape:
                    raise ValueError(f"{name}: shape {tuple(src.shape)} != {tuple(param.shape)}")
                param.copy_(src)

    def snapshot(self, source_id: str, new_id: str) -> Adapter:
        """An immutable copy of an adapter's current weights (for sampler snapshots)."""
        source = self.adapters[source_id]
        params = {
            k: nn.Parameter(v.detach().clone(), requires_grad=False)
            for k, v in source.params.items()
        }
        adapter = Adapter(new_id, source.config, params, trainable=False)
        self._attach(adapter)
        return adapter

    @contextmanager
    def route(self, segments: list[Segment]) -> Iterator[None]:
        """Use `segments` for every LoRA layer during the block."""
        previous = self.routing.segments
        self.routing.segments = segments
        try:
            yield
        finally:
            self.routing.segments = previous


def segments_for(adapter_ids: list[str | None]) -> list[Segment]:
    """Contiguous runs of equal adapter ids (callers sort rows by adapter first)."""
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(adapter_ids) + 1):
        if i == len(adapter_ids) or adapter_ids[i] != adapter_ids[start]:
            segments.append(Segment(adapter_ids[start], start, i))
            start = i
    return segments
