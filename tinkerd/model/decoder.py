"""tinkerd's own decode step for Llama-family models: one forward pass of a batch of single
tokens, read top to bottom, over a KV arena instead of transformers' per-step cache.

Why not transformers' forward: at decode (one token per row) its per-layer overheads cost
more than the matmuls on a CPU. Its cache concatenates every layer's keys each step, the
padding mask sends SDPA down a slow path (4 ms a layer at 64 rows, measured), and plain
`F.linear` re-lays out each weight per call. Here the cache is an arena written in place, the
attention is two batched matmuls with a length mask, and on CPU each layer's q/k/v and
gate/up weights are fused and packed once (a copy of the base's linear weights, made when the
decoder is built; the base is frozen, so the copy never goes stale): float32 for the kernels'
linear, bfloat16 for oneDNN's (`packing`).

The arithmetic is transformers' (RMSNorm in float32 then scaled in the input dtype, RoPE from
the model's own rotary module, softmax in float32), so a row's logits equal the transformers
pass up to float rounding. Served families: `llama`, `qwen2`, `qwen3`, `mistral` (sliding
windows per layer included), with RoPE that does not depend on the sequence length;
everything else keeps the transformers path (`decode_batch.PaddedBatch`).

LoRA: the base matmul runs on every row; each adapter's low-rank delta runs on its own rows
(`Groups`), with the pinned (frozen) adapter's factors cast to the compute dtype once.

Fused kernels (model/kernels: RMSNorm, RoPE + KV write, attention, SiLU gate): on CPU, when
the model runs in its own dtype (float32 or bfloat16 weights and compute), each replaces a run
of small eager ops; elsewhere, or where they cannot be built, the eager ops below run. The
kernels' float32 linear serves the projections whenever they compute in float32 on CPU.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.model import kernels
from tinkerd.model.lora import LoraLinear, MultiLoraModel

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed whatever the length

Groups = list[tuple[str, torch.Tensor | None]]  # adapter id -> its rows (None: every row)


def supports(model: nn.Module) -> bool:
    """True if `decode` computes this model's forward pass."""
    config = model.config
    if getattr(config, "model_type", None) not in FAMILIES:
        return False
    if getattr(config, "hidden_act", None) != "silu":
        return False
    kinds = set(getattr(config, "layer_types", None) or ())
    if not kinds <= {"full_attention", "sliding_attention"}:
        return False
    body = getattr(model, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    return getattr(rotary, "rope_type", None) in STATIC_ROPE


def sliding_windows(config: object, layers: int) -> list[int | None]:
    """Each layer's attention window (keys at positions p - window + 1 .. p), None: full.
    Per `layer_types` where the config has them (Qwen2/3), else one `sliding_window` for
    every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    return [window or None] * layers


def mkldnn_packing(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's pre-packed linear is available (CPU builds of torch, float32; bfloat16 only
    where oneDNN has a bf16 path: AVX512 or AVX-NE-CONVERT, else its reorder raises)."""
    return (
        device.type == "cpu"
        and (
            dtype == torch.float32
            or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        )
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packing(device: torch.device, dtype: torch.dtype, kernels_on: bool) -> str | None:
    """How `Proj` lays out its weights: "kernel" (the kernels' float32 linear, 1.2-1.6x faster
    than oneDNN's at 1-16 rows on an AVX2 EPYC: BENCHMARKS.md), "mkldnn"
    (oneDNN's packed linear), or None (plain `F.linear` on the base's weights, no copy)."""
    if kernels_on and device.type == "cpu" and dtype == torch.float32 and kernels.load():
        return "kernel"
    return "mkldnn" if mkldnn_packing(device, dtype) else None


class Proj:
    """The base part of one or more LoraLinears that read the same input (q/k/v, gate/up):
    one fused matmul over a packed copy of their weights on CPU (`packing`); plain separate
    calls elsewhere (no copy)."""

    def __init__(self, layers: Sequence[LoraLinear], dtype: torch.dtype, pack: str | None) -> None:
        self.layers = list(layers)
        self.sizes = [layer.out_features for layer in layers]
        self.dtype = dtype
        self.pack = pack
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if pack:
            weight = torch.cat([layer.base.weight.detach() for layer in layers]).to(dtype)
            if pack == "kernel":
                self.packed = _ops().pack_linear(weight)
            else:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
            if any(layer.base.bias is not None for layer in layers):
                self.bias = torch.cat(
                    [
                        layer.base.bias.detach()
                        if layer.base.bias is not None
                        else torch.zeros(layer.out_features)
                        for layer in layers
                    ]
                ).to(dtype)

    def __call__(self, x: torch.Tensor, groups: Groups, lora: "LoraCache") -> torch.Tensor:
        x = x.to(self.dtype)
        if self.pack == "kernel":
            out = _ops().linear(x, self.packed, sum(self.sizes), self.bias)
        elif self.pack == "mkldnn":
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            outs = [
                F.linear(x, layer.base.weight.to(self.dtype), _cast(layer.base.bias, self.dtype))
                for layer in self.layers
            ]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if groups:
            start = 0
            for layer, size in zip(self.layers, self.sizes, strict=True):
                lora.add_delta(out[:, start : start + size], x, layer, groups)
                start += size
        return out


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class LoraCache:
    """Each pinned adapter's factors per layer, cast to the compute dtype once. Pinned copies
    (`<id>\\x00<version>`) never change, so a cast made at first use stays right."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._cast: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def add_delta(
        self, out: torch.Tensor, x: torch.Tensor, layer: LoraLinear, groups: Groups
    ) -> None:
        """out[rows] += (x[rows] A^T) (scaling B)^T for each adapter's rows."""
        for adapter_id, rows in groups:
            pair = self._factors(adapter_id, layer)
            if pair is None:
                continue
            a, b = pair
            if rows is None:
                out.add_(F.linear(F.linear(x, a), b))
            else:
                out.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), a), b))

    def _factors(
        self, adapter_id: str, layer: LoraLinear
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = (adapter_id, id(layer))
        pair = self._cast.get(key)
        if pair is None:
            found = layer.adapters.get(adapter_id)
            if found is None:
                return None
            a, b, scaling = found
            pair = (a.detach().to(self.dtype), (b.detach() * scaling).to(self.dtype))
            self._cast[key] = pair
        return pair

    def keep_only(self, adapter_ids: set[str]) -> None:
        """Forget the casts of adapters no row uses any more."""
        self._cast = {k: v for k, v in self._cast.items() if k[0] in adapter_ids}


@dataclass
class PrefillChunk:
    """Prompt positions [start, start + len(tokens)) of one prompt, under `route`'s
    weights; `prefix`: its KV for positions [0, start) (per layer (1, heads, start, dim));
    `last`: the chunk ends the prompt (its next-token logits are wanted)."""

    tokens: list[int]
    start: int
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]]
    route: str | None
    last: bool


@dataclass
class Prefilled:
    """A chunk's final hidden states (its tokens, hidden), its prompt's KV for positions
    [0, end) (per layer (1, heads, end, dim)), and the next-token logits if it was last."""

    hidden: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor | None


def route_groups(routes: Sequence[str | None], device: torch.device) -> Groups:
    """Each adapter's rows (None: all rows use it); base-model rows need no delta."""
    rows: dict[str, list[int]] = {}
    for row, route in enumerate(routes):
        if route is not None:
            rows.setdefault(route, []).append(row)
    if len(rows) == 1 and None not in routes:
        return [(next(iter(rows)), None)]
    return [(route, torch.tensor(r, device=device)) for route, r in rows.items()]


@dataclass
class _Layer:
    ln1: nn.Module
    qkv: Proj
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o: Proj
    ln2: nn.Module
    gate_up: Proj
    down: Proj


class KVArena:
    """Per-layer keys and values of the decode batch, written in place: row r's positions
    0..len_r-1 at `values[layer][r, :, :len_r]` and `keys[layer][r, :, :len_r]`, or with
    `keys_transposed` (the fused attention's layout: a run of positions is one vector per
    head dim) at `keys[layer][r, :, :, :len_r]`. Space grows in blocks (rows by doubling,
    positions by at least `block`, a copy only then); a leaving row's slot is filled by moving
    the last row into it (one row copied, never the batch re-ordered)."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        keys_transposed: bool = False,
    ) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.keys_transposed = keys_transposed
        self.block = 32
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # slots in use

    @property
    def capacity(self) -> tuple[int, int]:
        """(row slots, positions per slot) allocated."""
        return (self.values[0].shape[0], self.values[0].shape[2]) if self.values else (0, 0)

    def reserve(self, rows: int, positions: int) -> None:
        """Make room for `rows` slots of `positions` positions each."""
        have_rows, have_pos = self.capacity
        if rows <= have_rows and positions <= have_pos:
            return
        new_rows = max(have_rows, 8)
        while new_rows < rows:
            new_rows *= 2
        new_pos = have_pos
        if positions > have_pos:  # grow by an eighth: few copies, little unused width
            step = max(self.block, have_pos // 8)
            new_pos = -(-max(positions, have_pos + step) // self.block) * self.block
        layers, heads, dim = self.shape
        # The eager attention reads whole slots (masked: must be finite), the fused one only
        # what rows wrote: no fill needed.
        alloc = torch.empty if self.keys_transposed else torch.zeros
        for store, transposed in ((self.keys, self.keys_transposed), (self.values, False)):
            size = (
                (new_rows, heads, dim, new_pos) if transposed else (new_rows, heads, new_pos, dim)
            )
            for i in range(layers):
                fresh = alloc(size, dtype=self.dtype, device=self.device)
                if store and self.rows:
                    _positions(fresh, transposed)[: self.rows, :, :have_pos] = _positions(
                        store[i], transposed
                    )[: self.rows]
                if len(store) == layers:
                    store[i] = fresh
                else:
                    store.append(fresh)

    def write_prompt(self, slot: int, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A prompt's KV (per layer (1, heads, L, dim)) into `slot`, positions 0..L-1."""
        for i, (k, v) in enumerate(kv):
            n = k.shape[2]
            _positions(self.keys[i], self.keys_transposed)[slot, :, :n] = k[0]
            self.values[i][slot, :, :n] = v[0]

    def move(self, src: int, dst: int, length: int) -> None:
        for store, transposed in ((self.keys, self.keys_transposed), (self.values, False)):
            for t in store:
                view = _positions(t, transposed)
                view[dst, :, :length] = view[src, :, :length]

    def clear(self) -> None:
        self.keys, self.values, self.rows = [], [], 0


def _positions(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """An arena tensor as (slots, heads, positions, dim), a view either way."""
    return t.transpose(2, 3) if transposed else t


class Decoder:
    """The decode forward pass of one served model (see the module docstring)."""

    def __init__(
        self, lora: MultiLoraModel, compute_dtype: torch.dtype, fused: bool = True
    ) -> None:
        model = lora.model
        config = model.config
        body = model.model
        self.config = config
        self.embed = body.embed_tokens
        self.norm = body.norm
        self.rotary = body.rotary_emb
        self.model_dtype = self.embed.weight.dtype
        self.dtype = compute_dtype
        self.device = self.embed.weight.device
        pack = packing(self.device, compute_dtype, fused)
        layers = lora.layers

        def proj(*paths: str) -> Proj:
            return Proj([layers[p] for p in paths], compute_dtype, pack)

        self.layers = []
        for i, block in enumerate(body.layers):
            p = f"model.layers.{i}"
            attn = block.self_attn
            self.layers.append(
                _Layer(
                    block.input_layernorm,
                    proj(f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"),
                    getattr(attn, "q_norm", None),
                    getattr(attn, "k_norm", None),
                    proj(f"{p}.self_attn.o_proj"),
                    block.post_attention_layernorm,
                    proj(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
                    proj(f"{p}.mlp.down_proj"),
                )
            )
        head_path = next(p for p, k in lora.kinds.items() if k == "unembed")
        self.head = proj(head_path)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = body.layers[0].self_attn.scaling
        self.windows = sliding_windows(config, len(self.layers))
        self.kv_dtype = torch.promote_types(compute_dtype, self.model_dtype)
        # The kernels take one dtype everywhere (weights, compute, cache), head dims of whole
        # vectors and GQA groups of up to 8 queries.
        self.fused = (
            fused
            and self.device.type == "cpu"
            and self.model_dtype == compute_dtype
            and compute_dtype in (torch.float32, torch.bfloat16)
            and self.head_dim % 16 == 0
            and self.heads // self.kv_heads <= 8
            and kernels.load()
        )
        self.adapters = LoraCache(compute_dtype)
        self._cos = self._sin = torch.empty(0)

    def arena(self) -> KVArena:
        return KVArena(
            len(self.layers),
            self.kv_heads,
            self.head_dim,
            self.kv_dtype,
            self.device,
            keys_transposed=self.fused,
        )

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for `positions`, from a table the model's rotary module filled."""
        need = int(positions.max()) + 1
        if need > self._cos.shape[0]:
            size = max(need, 2 * self._cos.shape[0], 256)
            probe = torch.empty(0, dtype=self.model_dtype, device=self.device)
            cos, sin = self.rotary(probe, torch.arange(size, device=self.device)[None])
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[positions], self._sin[positions]

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, arena: KVArena, groups: Groups
    ) -> torch.Tensor:
        """Logits (rows, vocab) after each row's next token `tokens[r]` at position
        `lengths[r]`; writes that token's keys and values into the arena's slot r."""
        slots = torch.arange(tokens.shape[0], device=self.device)
        return self._logits(self._hidden(tokens, lengths, slots, arena, groups), groups)

    @property
    def can_prefill(self) -> bool:
        """`prefill` runs here (the fused kernels take a row's slot; the eager ops do not)."""
        return self.fused

    @torch.no_grad()
    def prefill(self, chunks: Sequence["PrefillChunk"]) -> list["Prefilled"]:
        """Prompt chunks through the decode step, every chunk token a row: a chunk's rows
        share one slot of a scratch arena at successive positions, so each row attends to
        the prompt's positions up to its own (causal, no padding). One forward for all
        chunks, whatever their lengths and prefixes; logits only for chunks that end a
        prompt (`last`)."""
        arena = self.arena()
        arena.reserve(len(chunks), max(c.start + len(c.tokens) for c in chunks) + 16)
        for slot, chunk in enumerate(chunks):
            if chunk.start:
                arena.write_prompt(slot, chunk.prefix)
        arena.rows = len(chunks)
        device = self.device
        tokens = torch.tensor([t for c in chunks for t in c.tokens], device=device)
        positions = torch.cat(
            [torch.arange(c.start, c.start + len(c.tokens), device=device) for c in chunks]
        )
        slots = torch.cat(
            [torch.full((len(c.tokens),), i, device=device) for i, c in enumerate(chunks)]
        )
        routes = [c.route for c in chunks for _ in c.tokens]
        hidden = self._hidden(tokens, positions, slots, arena, route_groups(routes, device))
        ends = torch.tensor([len(c.tokens) for c in chunks]).cumsum(0) - 1
        last = [i for i, c in enumerate(chunks) if c.last]
        logits: list[torch.Tensor] = []
        if last:
            rows = ends[torch.tensor(last)].to(device)
            logits = list(
                self._logits(hidden[rows], route_groups([chunks[i].route for i in last], device))
            )
        in_order = iter(logits)  # the last chunks' logits, in chunk order
        out = []
        for i, chunk in enumerate(chunks):
            n = chunk.start + len(chunk.tokens)
            kv = [
                (
                    _positions(k, arena.keys_transposed)[i : i + 1, :, :n].contiguous(),
                    v[i : i + 1, :, :n].clone(),
                )
                for k, v in zip(arena.keys, arena.values, strict=True)
            ]
            begin = int(ends[i]) - len(chunk.tokens) + 1
            row_logits = next(in_order) if chunk.last else None
            out.append(Prefilled(hidden[begin : int(ends[i]) + 1], kv, row_logits))
        return out

    def _logits(self, hidden: torch.Tensor, groups: Groups) -> torch.Tensor:
        logits = self.head(hidden, groups, self.adapters)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _hidden(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        slots: torch.Tensor,
        arena: KVArena,
        groups: Groups,
    ) -> torch.Tensor:
        """The final norm's output (rows, hidden) for each row's token `tokens[r]` at
        position `lengths[r]` of arena slot `slots[r]` (the eager ops: slot r), writing
        that token's keys and values there."""
        rows = tokens.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        # (+16: the fused attention reads whole blocks of up to 16 positions past a row's last)
        arena.reserve(int(slots.max()) + 1, int(lengths.max()) + 1 + (16 if self.fused else 0))
        width = arena.capacity[1]
        cos, sin = self._rope(lengths)
        fused = self.fused
        if not fused:
            # Attention reads every slot's whole capacity (a contiguous view: slicing it to
            # the longest row would make bmm copy it); an additive mask hides what a row has
            # not written: row r sees positions 0..len_r.
            masks = {w: self._mask(lengths, width, w) for w in set(self.windows)}
            # Where each row's new key goes in the flattened (slot, head, position) arena.
            heads_of = torch.arange(rows * kv_heads, device=self.device)
            at = heads_of * width + lengths.repeat_interleave(kv_heads)
            cos, sin = cos[:, None], sin[:, None]
        x = self.embed(tokens)
        lora = self.adapters
        norm = self._norm
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(norm(x, layer.ln1), groups, lora)
            qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
            v = qkv[:, (heads + kv_heads) * dim :]
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = qk[:, :heads], qk[:, heads:]
                qk = torch.cat((norm(q, layer.q_norm), norm(k, layer.k_norm)), 1)
            keys, values = arena.keys[i], arena.values[i]
            if fused:
                q = _ops().rope_store(qk, v, cos, sin, keys, values, lengths, slots, heads)
                window = self.windows[i] or 0
                attn = _ops().attend(q, keys, values, lengths, slots, window, self.scaling)
            else:
                qk = qk * cos + _rotate_half(qk) * sin  # RoPE on queries and keys at once
                keys.view(-1, dim).index_copy_(0, at, qk[:, heads:].reshape(-1, dim).to(keys.dtype))
                values.view(-1, dim).index_copy_(0, at, v.reshape(-1, dim).to(values.dtype))
                mask = masks[self.windows[i]]
                attn = self._attend(qk[:, :heads].to(keys.dtype), keys, values, rows, mask)
            x = x + layer.o(attn, groups, lora)
            up = layer.gate_up(norm(x, layer.ln2), groups, lora)
            x = x + layer.down(_ops().silu_mul(up) if fused else _silu_mul(up), groups, lora)
        return norm(x, self.norm)

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if self.fused and norm.weight.dtype == x.dtype:
            return _ops().rms_norm(x, norm.weight, norm.variance_epsilon)
        return _rms_norm(x, norm)

    def _mask(self, lengths: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
        """Additive mask (rows * kv heads, width, 1): row r sees positions 0..len_r, or only
        the last `window` of them."""
        position = torch.arange(width, device=self.device)[None]
        seen = position <= lengths[:, None]
        if window is not None:
            seen &= position > lengths[:, None] - window
        mask = torch.zeros(seen.shape, dtype=torch.float32, device=self.device)
        mask = mask.masked_fill_(~seen, float("-inf"))
        return mask.repeat_interleave(self.kv_heads, 0)[..., None]

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """softmax(q K^T * scaling + mask) V per row and head, GQA groups sharing their K/V:
        (rows, heads, dim) -> (rows, heads * dim)."""
        kv_heads, dim = self.kv_heads, self.head_dim
        group = self.heads // kv_heads
        positions = keys.shape[2]
        k = keys[:rows].view(rows * kv_heads, positions, dim)
        v = values[:rows].view(rows * kv_heads, positions, dim)
        qg = q.reshape(rows * kv_heads, group, dim)
        # K q^T (not q K^T): bmm runs 2x faster with the long dimension first (measured).
        scores = torch.bmm(k, qg.transpose(1, 2)).float()  # (rows*kv, width, group)
        scores = scores.mul_(self.scaling).add_(mask).transpose(1, 2)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)  # 3x faster over the last dim
        out = torch.bmm(probs, v)  # (rows*kv, group, dim)
        return out.reshape(rows, self.heads * dim)


def _ops() -> Any:
    return torch.ops.tinkerd_decode


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """A transformers RMSNorm module's arithmetic (float32 inside, then `weight *` in the
    input dtype), with the mean square from `vector_norm`: torch's `rms_norm` and `mean` take
    5-10x longer on these small rows on CPU (measured)."""
    x32 = x.float()
    inv = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
    inv = inv.square_().div_(x.shape[-1]).add_(norm.variance_epsilon).rsqrt_()
    return norm.weight * (x32 * inv).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
