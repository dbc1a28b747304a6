"""The decode batch's KV state: which rows decode together, their keys and values, and the
logits of each row's next draw. `sample_engine.SampleEngine` keeps the rows' tokens and
outputs; a batch here only runs the model.

Two kinds, one interface (`DecodeBatch`):
- `ArenaBatch`: tinkerd's own decode step (model/decoder.py) over a KV arena written in
  place. Llama-family models.
- `PaddedBatch`: transformers' forward over a left-padded `DynamicCache` (a join pads and
  concatenates, a step appends). Every other model with a plain full-attention cache.

`add` and `keep` return the new slot order as indices into the old rows (plus the added
ones, numbered after them), so the engine can re-order its own per-row state the same way.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tinkerd.model.decoder import Decoder, Groups, route_groups
from tinkerd.model.lora import MultiLoraModel, segments_for
from tinkerd.model.prefix_cache import KV
from tinkerd.model.training import body, unembed


class DecodeBatch(Protocol):
    logits: torch.Tensor | None  # (rows, vocab) float32: each row's next draw

    def add(self, routes: list[str | None], kvs: list[KV], logits: torch.Tensor) -> list[int]:
        """Add rows (route, prompt KV (1, heads, L, dim) per layer, next-token logits)."""
        ...

    def keep(self, slots: list[int]) -> list[int]:
        """Drop every row not in `slots`."""
        ...

    def decode(self, tokens: list[int]) -> None:
        """Each row's next token in, next logits out."""
        ...


class ArenaBatch:
    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.arena = decoder.arena()
        self.routes: list[str | None] = []
        self.lengths: list[int] = []  # positions with KV, per slot
        self.logits: torch.Tensor | None = None

    def add(self, routes: list[str | None], kvs: list[KV], logits: torch.Tensor) -> list[int]:
        old = len(self.routes)
        lengths = [kv[0][0].shape[2] for kv in kvs]
        self.arena.reserve(old + len(routes), max(lengths) + 1)
        for i, kv in enumerate(kvs):
            self.arena.write_prompt(old + i, kv)
        self.arena.rows = old + len(routes)
        self.routes += routes
        self.lengths += lengths
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        return list(range(old + len(routes)))

    def keep(self, slots: list[int]) -> list[int]:
        """Rows past the new end move into the freed slots below it (one row's KV each)."""
        n = len(slots)
        kept = set(slots)
        holes = [s for s in range(n) if s not in kept]
        movers = [s for s in range(n, len(self.routes)) if s in kept]
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            self.arena.move(mover, hole, self.lengths[mover])
            order[hole] = mover
        self.routes = [self.routes[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]
        self.arena.rows = n
        if n == 0:
            self.arena.clear()
            self.logits = None
        else:
            assert self.logits is not None
            self.logits = self.logits[torch.tensor(order, device=self.logits.device)]
        self.decoder.adapters.keep_only({r for r in self.routes if r is not None})
        return order

    def decode(self, tokens: list[int]) -> None:
        device = self.decoder.device
        lengths = torch.tensor(self.lengths, device=device)
        with torch.autocast(device.type, enabled=False):  # the decoder sets its own dtypes
            self.logits = self.decoder.forward(
                torch.tensor(tokens, device=device), lengths, self.arena, self._groups()
            )
        self.lengths = [n + 1 for n in self.lengths]

    def _groups(self) -> Groups:
        return route_groups(self.routes, self.decoder.device)


class PaddedBatch:
    """Keys right-aligned in a left-padded cache; rows sorted by route so each adapter's
    rows are one LoRA segment. Columns no row uses any more are cut when rows leave."""

    def __init__(self, lora: MultiLoraModel, device: torch.device) -> None:
        self.lora = lora
        self.device = device
        self.routes: list[str | None] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns) 1 = real position
        self.next_pos: torch.Tensor | None = None  # (rows,) position of each row's next token
        self.logits: torch.Tensor | None = None

    def add(self, routes: list[str | None], kvs: list[KV], logits: torch.Tensor) -> list[int]:
        old = len(self.routes)
        lengths = [kv[0][0].shape[2] for kv in kvs]
        width = max([*lengths, 0 if self.mask is None else self.mask.shape[1]])
        everyone = self.routes + routes
        order = sorted(range(len(everyone)), key=lambda i: (everyone[i] or "", i))
        index = torch.tensor(order, device=self.device)
        identity = order == list(range(len(everyone)))
        cache = self.cache if self.cache is not None else full_cache(self.lora.model.config)
        for li, layer in enumerate(cache.layers):
            parts_k, parts_v = [], []
            if old:
                pad = width - layer.keys.shape[2]
                parts_k.append(F.pad(layer.keys, (0, 0, pad, 0)))
                parts_v.append(F.pad(layer.values, (0, 0, pad, 0)))
            for kv in kvs:
                k, v = kv[li]
                pad = width - k.shape[2]
                parts_k.append(F.pad(k, (0, 0, pad, 0)))
                parts_v.append(F.pad(v, (0, 0, pad, 0)))
            keys, values = torch.cat(parts_k), torch.cat(parts_v)
            if not identity:
                keys, values = keys.index_select(0, index), values.index_select(0, index)
            set_layer(layer, keys, values)
        masks, positions, all_logits = [], [], []
        if old:
            assert self.mask is not None and self.next_pos is not None
            assert self.logits is not None
            masks.append(F.pad(self.mask, (width - self.mask.shape[1], 0)))
            positions.append(self.next_pos)
            all_logits.append(self.logits)
        for n in lengths:
            mask = torch.zeros((1, width), dtype=torch.long, device=self.device)
            mask[0, width - n :] = 1
            masks.append(mask)
            positions.append(torch.tensor([n], device=self.device))
        all_logits.append(logits)
        self.cache = cache
        self.mask = torch.cat(masks)
        self.next_pos = torch.cat(positions)
        self.logits = torch.cat(all_logits)
        if not identity:
            self.mask = self.mask.index_select(0, index)
            self.next_pos = self.next_pos.index_select(0, index)
            self.logits = self.logits.index_select(0, index)
        self.routes = [everyone[i] for i in order]
        return order

    def keep(self, slots: list[int]) -> list[int]:
        self.routes = [self.routes[i] for i in slots]
        if not slots:
            self.cache = self.mask = self.next_pos = self.logits = None
            return slots
        assert self.cache is not None and self.mask is not None
        assert self.next_pos is not None and self.logits is not None
        index = torch.tensor(slots, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).to(torch.long).argmax())  # first column some row uses
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            set_layer(
                layer,
                layer.keys.index_select(0, index)[:, :, first:],
                layer.values.index_select(0, index)[:, :, first:],
            )
        self.next_pos = self.next_pos.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        return slots

    def decode(self, tokens: list[int]) -> None:
        assert self.mask is not None and self.next_pos is not None
        rows = len(tokens)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        with self.lora.route(segments_for(self.routes)):
            hidden = body(self.lora.model)(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=self.next_pos.unsqueeze(1),
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            self.logits = unembed(self.lora, hidden[:, -1]).float()
        self.next_pos = self.next_pos + 1


def full_cache(config: object) -> DynamicCache:
    """The model's cache with plain growing layers, also where it has sliding-window layers
    (transformers masks the window by position; a sliding layer would drop keys that a row
    joining the batch later, or a prefix cache entry, still needs)."""
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() for _ in cache.layers]
    return cache


def set_layer(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
