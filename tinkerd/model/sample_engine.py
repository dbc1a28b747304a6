"""Step-wise sampling with continuous batching: requests join the running decode batch at the
next step boundary and each row leaves the moment it stops.

`add` prefills new requests (their prompt KV from the prefix cache where it holds a prefix,
computed once per distinct prompt otherwise, then repeated for `num_samples`) and merges
their rows into the decode batch; `step` draws one token for every active row and runs one
decode forward pass for the rows still going. Rows of every adapter and the base model decode
together, sorted by adapter so each adapter's LoRA rows stay contiguous.

Weights are pinned per row: a row routes to a frozen copy of its adapter as it was at
admission (`<id>\\x00<version>`), so a snapshot re-taken under the same id, an optimizer step
or an eviction between two decode steps never changes the weights a sequence is drawn from.

The batch cache is left-padded: a row's keys sit right-aligned, columns no row uses any more
are cut off when rows leave, and a join pads the shorter side. This path serves models whose
every cache layer is a plain full-attention `DynamicLayer` and that take no images; others
(sliding windows, linear attention, Qwen-VL's M-RoPE) are served by the static batch of
`sampling.sample` (`continuous` False): `step` then runs every admitted request to its end.

Every draw and output is the static path's (`sampling.choose_tokens`, `_prompt_extras`);
each row's generator is seeded by its request's seed and sample index only, so a request gives
the same tokens whatever else is in the batch, up to the batching-numerics caveat
(docs/api.md): a different batch or prefix split changes float rounding, which can flip a
near-tie.
"""

import dataclasses
import logging
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tinkerd.model.lora import Adapter, MultiLoraModel, segments_for
from tinkerd.model.prefix_cache import KV, PrefixCache
from tinkerd.model.sampling import (
    Choice,
    Draw,
    _prompt_extras,
    _PromptExtras,
    _stopped_by_string,
    choose_tokens,
    first_needed_position,
    row_seed,
    sample,
    stop_conditions,
)
from tinkerd.model.training import body, unembed
from tinkerd.model.types import SampledSequence, SampleInput, SampleOutput, SamplingParams

log = logging.getLogger(__name__)

PIN_SEP = "\x00"  # adapter id + PIN_SEP + weights version: a row's frozen adapter copy

Deltas = dict[Hashable, list[tuple[int, Choice]]]  # key -> [(sample index, choice)] in order


def continuous_supported(model: torch.nn.Module, takes_images: bool) -> bool:
    """True if every layer of the model's cache is a plain growing KV layer (no sliding window,
    no recurrent state) and it takes no images: what the merged left-padded batch handles."""
    if takes_images:
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot size a cache from
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class _Row:
    """One sequence being drawn: request `key`, sample `index`."""

    key: Hashable
    index: int
    route: str | None  # pinned adapter id (None: base)
    params: SamplingParams
    generator: torch.Generator
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    limit: int
    topk: int
    record_stability: bool
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    base_logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None

    def sequence(self) -> SampledSequence:
        return SampledSequence(
            self.tokens,
            self.logprobs,
            self.stop_reason or "length",
            self.topk_logprobs if self.topk > 0 else None,
            self.behaviour_logprobs if self.record_stability else None,
            self.base_logprobs if self.record_stability else None,
        )


@dataclass
class _Request:
    extras: _PromptExtras
    rows: list[_Row]
    left: int  # rows not finished yet


@dataclass
class _Unit:
    """One distinct prompt to prefill: its rows' shared KV and next-token logits."""

    route: str | None
    weights: str  # prefix-cache key of the weights
    prompt: list[int]
    cached: int  # leading positions served from the prefix cache
    prefix_kv: KV | None
    kv: KV = field(default_factory=list)
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # (len(prompt) - cached, d)


class SampleEngine:
    """The decode batch of one model. Not thread-safe: the worker calls one method at a time."""

    def __init__(
        self,
        lora: MultiLoraModel,
        tokenizer: object,
        *,
        eos_ids: tuple[int, ...],
        pad_id: int,
        context_length: int,
        prefix_cache: PrefixCache | None = None,
        continuous: bool = True,
    ) -> None:
        self.lora = lora
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.context_length = context_length
        self.prefix_cache = prefix_cache
        self.continuous = continuous
        self.device = lora.model.get_output_embeddings().weight.device
        self._requests: dict[Hashable, _Request] = {}
        self._rows: list[_Row] = []  # batch order (sorted by route)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, columns) 1 = real position
        self._next_pos: torch.Tensor | None = None  # (rows,) position of each row's next token
        self._logits: torch.Tensor | None = None  # (rows, vocab) for the next draw
        self._pins: dict[str, int] = {}  # pinned copy -> rows using it
        self._static: list[tuple[Hashable, SampleInput]] = []  # not-continuous mode
        # adapter id -> (its Adapter object, epoch): a new object (re-snapshot, reload) under
        # the same id gets a new epoch; weakly held, so dropped weights are not kept alive.
        self._epochs: dict[str, tuple[weakref.ref[Adapter], int]] = {}
        self._next_epoch = 0

    # -- admission -----------------------------------------------------------------------

    def active(self) -> int:
        """Requests admitted and not finished."""
        return len(self._requests) + len(self._static)

    @torch.no_grad()
    def add(self, keys: list[Hashable], inputs: list[SampleInput]) -> None:
        """Admit validated requests (keys unique among the active ones): prefill them and add
        their rows to the decode batch. Raises (and admits none) if the prefill fails."""
        if not self.continuous:
            self._static.extend(zip(keys, inputs, strict=True))
            return
        routes: list[str | None] = []
        try:
            for item in inputs:
                routes.append(self._pin(item.adapter_id))
            units, unit_of = self._units(inputs, routes)
            self._prefill(units)
            extras = [
                self._extras(item, routes[i], units[unit_of[i]]) for i, item in enumerate(inputs)
            ]
        except Exception:
            for route in routes:
                self._unpin(route)
            raise
        rows: list[_Row] = []
        sources: list[int] = []
        for i, (key, item) in enumerate(zip(keys, inputs, strict=True)):
            new = self._new_rows(key, item, routes[i])
            self._requests[key] = _Request(extras[i], new, len(new))
            rows.extend(new)
            sources.extend([unit_of[i]] * len(new))
            # One pin per row (the request took one): each row releases its own.
            for _ in range(len(new) - 1):
                self._pin_again(routes[i])
            if not new:
                self._unpin(routes[i])
        if rows:
            self._merge(rows, sources, units)

    def _pin(self, adapter_id: str | None) -> str | None:
        """A frozen copy of the adapter's current weights for the rows being admitted."""
        if adapter_id is None:
            return None
        route = f"{adapter_id}{PIN_SEP}{self.weights_version(adapter_id)}"
        if route not in self.lora.adapters:
            self.lora.snapshot(adapter_id, route)
        self._pins[route] = self._pins.get(route, 0) + 1
        return route

    def weights_version(self, adapter_id: str) -> str:
        """Identifies the adapter's current weights: its object's epoch (a snapshot re-taken
        under the same id is a new object) and the in-place writes to its tensors (optimizer
        steps, loads: torch counts them in each tensor's `_version`)."""
        adapter = self.lora.adapters[adapter_id]
        known = self._epochs.get(adapter_id)
        if known is None or known[0]() is not adapter:
            known = (weakref.ref(adapter), self._next_epoch)
            self._next_epoch += 1
            self._epochs[adapter_id] = known
        writes = sum(p._version for p in adapter.params.values())
        return f"{known[1]}.{writes}"

    def _pin_again(self, route: str | None) -> None:
        if route is not None:
            self._pins[route] += 1

    def _unpin(self, route: str | None) -> None:
        if route is None:
            return
        self._pins[route] -= 1
        if self._pins[route] == 0:
            del self._pins[route]
            self.lora.remove_adapter(route)

    def _units(
        self, inputs: list[SampleInput], routes: list[str | None]
    ) -> tuple[list[_Unit], list[int]]:
        """Distinct (weights, prompt) pairs, each looked up in the prefix cache once."""
        units: list[_Unit] = []
        unit_of: list[int] = []
        seen: dict[tuple[str, tuple[int, ...]], int] = {}
        for item, route in zip(inputs, routes, strict=True):
            weights = route or ""
            need = first_needed_position(item)
            key = (weights, tuple(item.prompt))
            u = seen.get(key)
            if u is not None and units[u].cached <= need:
                unit_of.append(u)  # a concurrent request's prefill serves this one too
                if self.prefix_cache is not None:
                    self.prefix_cache.count_shared(len(item.prompt) - 1)
                continue
            cached, prefix_kv = 0, None
            if self.prefix_cache is not None:
                cached, prefix_kv = self.prefix_cache.lookup(weights, item.prompt, need)
            seen[key] = len(units)
            unit_of.append(len(units))
            units.append(_Unit(route, weights, list(item.prompt), cached, prefix_kv))
        return units, unit_of

    def _prefill(self, units: list[_Unit]) -> None:
        """Prompt KV, last-position logits and hidden states of every unit. Units without a
        cached prefix share one left-padded pass; the others continue their cached KV."""
        fresh = sorted((u for u in units if u.cached == 0), key=lambda u: u.route or "")
        if fresh:
            self._prefill_padded(fresh)
        by_length: dict[int, list[_Unit]] = {}
        for unit in units:
            if unit.cached > 0:
                by_length.setdefault(unit.cached, []).append(unit)
        for group in by_length.values():
            self._prefill_continued(sorted(group, key=lambda u: u.route or ""))
        if self.prefix_cache is not None:
            for unit in units:
                block = self.prefix_cache.block
                if (len(unit.prompt) - 1) // block * block > unit.cached:
                    self.prefix_cache.insert(unit.weights, unit.prompt[:-1], unit.kv)

    def _prefill_padded(self, units: list[_Unit]) -> None:
        width = max(len(u.prompt) for u in units)
        ids = torch.full((len(units), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(units), width), dtype=torch.long)
        for i, u in enumerate(units):
            ids[i, width - len(u.prompt) :] = torch.tensor(u.prompt)
            attn[i, width - len(u.prompt) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.lora.model.config)
        with self.lora.route(segments_for([u.route for u in units])):
            hidden = body(self.lora.model)(
                input_ids=ids,
                attention_mask=attn,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            logits = unembed(self.lora, hidden[:, -1]).float()
        for i, u in enumerate(units):
            n = len(u.prompt)
            u.kv = [
                (layer.keys[i : i + 1, :, width - n :], layer.values[i : i + 1, :, width - n :])
                for layer in cache.layers
            ]
            u.hidden = hidden[i, width - n :]
            u.logits = logits[i]

    def _prefill_continued(self, units: list[_Unit]) -> None:
        """Units continuing cached prefixes of one length, in one pass: the prefixes stacked,
        the rest right-padded (causal attention: a padding position after a row's last token
        changes nothing before it), so each row's KV stays contiguous."""
        c = units[0].cached
        rest = [len(u.prompt) - c for u in units]
        width = max(rest)
        ids = torch.full((len(units), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(units), c + width), dtype=torch.long)
        attn[:, :c] = 1
        for i, u in enumerate(units):
            ids[i, : rest[i]] = torch.tensor(u.prompt[c:])
            attn[i, c : c + rest[i]] = 1
        cache = DynamicCache(config=self.lora.model.config)
        for li, layer in enumerate(cache.layers):
            prefixes = [u.prefix_kv[li] for u in units if u.prefix_kv is not None]
            _set_layer(
                layer, torch.cat([k for k, _ in prefixes]), torch.cat([v for _, v in prefixes])
            )
        positions = torch.arange(c, c + width).expand(len(units), width)
        with self.lora.route(segments_for([u.route for u in units])):
            hidden = body(self.lora.model)(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            last = hidden[torch.arange(len(units)), torch.tensor(rest) - 1]
            logits = unembed(self.lora, last).float()
        for i, u in enumerate(units):
            n = c + rest[i]
            u.kv = [
                (layer.keys[i : i + 1, :, :n], layer.values[i : i + 1, :, :n])
                for layer in cache.layers
            ]
            u.hidden = hidden[i, : rest[i]]
            u.logits = logits[i]

    def _extras(self, item: SampleInput, route: str | None, unit: _Unit) -> _PromptExtras:
        assert unit.hidden is not None
        routed = dataclasses.replace(item, adapter_id=route, on_token=None)
        with self.lora.route(segments_for([route] * unit.hidden.shape[0])):
            return _prompt_extras(self.lora, unit.hidden, routed, offset=unit.cached)

    def _new_rows(self, key: Hashable, item: SampleInput, route: str | None) -> list[_Row]:
        stop_tokens, stop_strings = stop_conditions(item.params, self.eos_ids)
        limit = max(0, min(item.params.max_tokens, self.context_length - len(item.prompt)))
        rows = []
        for s in range(item.num_samples):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row_seed(item.params.seed, s))
            rows.append(
                _Row(
                    key,
                    s,
                    route,
                    item.params,
                    generator,
                    stop_tokens,
                    stop_strings,
                    limit,
                    item.topk_sample_logprobs,
                    item.record_stability,
                    stop_reason="length" if limit == 0 else None,
                )
            )
        return rows

    def _merge(self, rows: list[_Row], sources: list[int], units: list[_Unit]) -> None:
        """Add rows (each repeating its unit's KV) to the batch, right-aligned, re-sorted by
        route so each adapter's rows stay one segment."""
        old = len(self._rows)
        width = max([len(units[u].prompt) for u in sources] + [self._width()])
        everyone = self._rows + rows
        order = sorted(range(len(everyone)), key=lambda i: (everyone[i].route or "", i))
        index = torch.tensor(order, device=self.device)
        identity = order == list(range(len(everyone)))
        cache = (
            self._cache if self._cache is not None else DynamicCache(config=self.lora.model.config)
        )
        for li, layer in enumerate(cache.layers):
            parts_k, parts_v = [], []
            if old:
                pad = width - layer.keys.shape[2]
                parts_k.append(F.pad(layer.keys, (0, 0, pad, 0)))
                parts_v.append(F.pad(layer.values, (0, 0, pad, 0)))
            for u in sources:
                k, v = units[u].kv[li]
                pad = width - k.shape[2]
                parts_k.append(F.pad(k, (0, 0, pad, 0)))
                parts_v.append(F.pad(v, (0, 0, pad, 0)))
            keys, values = torch.cat(parts_k), torch.cat(parts_v)
            if not identity:
                keys, values = keys.index_select(0, index), values.index_select(0, index)
            _set_layer(layer, keys, values)
        masks, positions, logits = [], [], []
        if old:
            assert self._mask is not None and self._next_pos is not None
            assert self._logits is not None
            masks.append(F.pad(self._mask, (width - self._mask.shape[1], 0)))
            positions.append(self._next_pos)
            logits.append(self._logits)
        for u in sources:
            n = len(units[u].prompt)
            mask = torch.zeros((1, width), dtype=torch.long, device=self.device)
            mask[0, width - n :] = 1
            masks.append(mask)
            positions.append(torch.tensor([n], device=self.device))
            unit_logits = units[u].logits
            assert unit_logits is not None
            logits.append(unit_logits.unsqueeze(0))
        self._cache = cache
        self._mask = torch.cat(masks)
        self._next_pos = torch.cat(positions)
        self._logits = torch.cat(logits)
        if not identity:
            self._mask = self._mask.index_select(0, index)
            self._next_pos = self._next_pos.index_select(0, index)
            self._logits = self._logits.index_select(0, index)
        self._rows = [everyone[i] for i in order]

    def _width(self) -> int:
        return 0 if self._mask is None else self._mask.shape[1]

    # -- decoding ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> tuple[dict[Hashable, SampleOutput], Deltas]:
        """Draw one token for every active row, then one decode pass for those still going.
        Returns the requests finished now and each request's new tokens (in draw order)."""
        if not self.continuous:
            return self._static_step()
        deltas: Deltas = {}
        finished_rows: list[_Row] = []
        keep: list[int] = []
        live = [slot for slot, row in enumerate(self._rows) if row.stop_reason is None]
        if live:
            assert self._logits is not None
            logits = self._logits if len(live) == len(self._rows) else self._logits[live]
            rows = [self._rows[slot] for slot in live]
            draws = [Draw(row.params, row.generator, row.topk) for row in rows]
            for row, choice in zip(rows, choose_tokens(logits, draws), strict=True):
                self._record(row, choice, deltas)
        for slot, row in enumerate(self._rows):
            if row.stop_reason is None:
                keep.append(slot)
            else:
                finished_rows.append(row)
        finished = self._finish(finished_rows)
        finished.update(self._finish_empty())
        if len(keep) < len(self._rows):
            self._select(keep)
        if self._rows:
            self._decode()
        return finished, deltas

    def _record(self, row: _Row, choice: Choice, deltas: Deltas) -> None:
        row.tokens.append(choice.token)
        row.logprobs.append(choice.logprob)
        if choice.topk is not None:
            row.topk_logprobs.append(choice.topk)
        if row.record_stability:
            row.behaviour_logprobs.append(choice.behaviour_logprob)
            row.base_logprobs.append(choice.base_logprob)
        deltas.setdefault(row.key, []).append((row.index, choice))
        if choice.token in row.stop_tokens or _stopped_by_string(self.tokenizer, row):  # type: ignore[arg-type]
            row.stop_reason = "stop"
        elif len(row.tokens) >= row.limit:
            row.stop_reason = "length"

    def _finish(self, rows: list[_Row]) -> dict[Hashable, SampleOutput]:
        finished = {}
        for row in rows:
            self._unpin(row.route)
            request = self._requests[row.key]
            request.left -= 1
            if request.left == 0:
                finished[row.key] = self._output(self._requests.pop(row.key))
        return finished

    def _finish_empty(self) -> dict[Hashable, SampleOutput]:
        """Requests that asked for no samples at all: done on their first step."""
        empty = [key for key, r in self._requests.items() if not r.rows]
        return {key: self._output(self._requests.pop(key)) for key in empty}

    @staticmethod
    def _output(request: _Request) -> SampleOutput:
        e = request.extras
        return SampleOutput(
            [row.sequence() for row in request.rows],
            e.prompt_logprobs,
            e.topk_prompt_logprobs,
            target_prompt_logprobs=e.target_prompt_logprobs,
            prompt_alt_tokens=e.alt_tokens,
            prompt_alt_logprobs=e.alt_logprobs,
        )

    def _select(self, keep: list[int]) -> None:
        """Drop the rows not in `keep` and the leading columns no remaining row uses."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next_pos = self._logits = None
            return
        assert self._cache is not None and self._mask is not None
        assert self._next_pos is not None and self._logits is not None
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).to(torch.long).argmax())  # first column some row uses
        mask = mask[:, first:]
        for layer in self._cache.layers:
            _set_layer(
                layer,
                layer.keys.index_select(0, index)[:, :, first:],
                layer.values.index_select(0, index)[:, :, first:],
            )
        self._mask = mask
        self._next_pos = self._next_pos.index_select(0, index)
        self._logits = self._logits.index_select(0, index)

    def _decode(self) -> None:
        assert self._mask is not None and self._next_pos is not None
        ids = torch.tensor([[row.tokens[-1]] for row in self._rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        with self.lora.route(segments_for([row.route for row in self._rows])):
            hidden = body(self.lora.model)(
                input_ids=ids,
                attention_mask=self._mask,
                position_ids=self._next_pos.unsqueeze(1),
                past_key_values=self._cache,
                use_cache=True,
            ).last_hidden_state
            self._logits = unembed(self.lora, hidden[:, -1]).float()
        self._next_pos = self._next_pos + 1

    def cancel(self, keys: list[Hashable]) -> None:
        """Drop these requests' rows from the batch at once (no output for them)."""
        gone = set(keys)
        self._static = [(key, item) for key, item in self._static if key not in gone]
        for key in gone:
            self._requests.pop(key, None)
        keep = []
        for slot, row in enumerate(self._rows):
            if row.key in gone:
                self._unpin(row.route)
            else:
                keep.append(slot)
        if len(keep) < len(self._rows):
            self._select(keep)

    def abort(self) -> list[Hashable]:
        """Drop every active request (after a failed step); returns their keys."""
        keys = list(self._requests) + [key for key, _ in self._static]
        for row in self._rows:  # rows still in the batch hold their pin
            self._unpin(row.route)
        self._requests.clear()
        self._static.clear()
        self._select([])
        return keys

    # -- models the continuous batch cannot serve ----------------------------------------

    def _static_step(self) -> tuple[dict[Hashable, SampleOutput], Deltas]:
        """Every admitted request as one static batch (`sampling.sample`), to the end."""
        batch, self._static = self._static, []
        if not batch:
            return {}, {}
        deltas: Deltas = {}

        def recorder(key: Hashable) -> Callable[[int, Choice], None]:
            return lambda index, choice: deltas.setdefault(key, []).append((index, choice))

        inputs = [dataclasses.replace(item, on_token=recorder(key)) for key, item in batch]
        try:
            outputs = sample(
                self.lora,
                self.tokenizer,
                inputs,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                context_length=self.context_length,
            )
        except Exception:
            self._static = batch  # abort() reports them
            raise
        return {key: out for (key, _), out in zip(batch, outputs, strict=True)}, deltas


def _set_layer(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
