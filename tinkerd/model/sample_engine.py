"""Step-wise sampling with continuous batching: requests join the running decode batch at the
next step boundary and each row leaves the moment it stops.

`add` admits requests: their prompt KV comes from the prefix cache where it holds a prefix,
and is computed once per distinct prompt otherwise, in chunks of at most `prefill_chunk`
tokens per step (so a long prompt never stalls the rows already decoding for its whole
prefill), then repeated for `num_samples`. When a prompt is done its rows join the decode
batch; `step` runs the next prefill chunk, draws one token for every active row and runs one
decode pass for the rows still going. Rows of every adapter and the base model decode
together.

Weights are pinned per row: a row routes to a frozen copy of its adapter as it was at
admission (`<id>\\x00<version>`), so a snapshot re-taken under the same id, an optimizer step
or an eviction between two decode steps never changes the weights a sequence is drawn from.

The decode batch itself (model/decode_batch.py) is tinkerd's own decode step over a KV arena
for Llama-family models (model/decoder.py), and transformers' forward over a left-padded
cache for the other models whose cache layers all keep keys and values (full attention or a
sliding window; `continuous_supported`) and that take no images. Others (linear attention's
recurrent state, image input) are served by the static batch of `sampling.sample`
(`continuous` False): `step` then runs every admitted request to its end.

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
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tinkerd.model import decoder, kernels
from tinkerd.model.decode_batch import ArenaBatch, DecodeBatch, PaddedBatch, full_cache, set_layer
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
    sampled_sequence,
    stop_conditions,
)
from tinkerd.model.training import body, unembed
from tinkerd.model.types import SampleInput, SampleOutput, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens prefilled per step (TINKERD_PREFILL_CHUNK_TOKENS)
PIN_SEP = "\x00"  # adapter id + PIN_SEP + weights version: a row's frozen adapter copy

Deltas = dict[Hashable, list[tuple[int, Choice]]]  # key -> [(sample index, choice)] in order


def continuous_supported(model: torch.nn.Module, takes_images: bool) -> bool:
    """True if every layer of the model's cache keeps keys and values (full attention or a
    sliding window: no recurrent state) and it takes no images: what the decode batches
    handle. They keep every position of a sliding layer (`full_cache`), the window is the
    attention mask's."""
    if takes_images:
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot size a cache from
        return False
    kinds = (DynamicLayer, DynamicSlidingWindowLayer)
    return bool(cache.layers) and all(type(layer) in kinds for layer in cache.layers)


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


@dataclass
class _Request:
    extras: _PromptExtras | None  # None while its prompt is being prefilled
    rows: list[_Row]
    left: int  # rows not finished yet


@dataclass
class _Unit:
    """One distinct prompt to prefill (in chunks): its rows' shared KV and next-token
    logits, and the requests waiting for it."""

    route: str | None
    weights: str  # prefix-cache key of the weights
    prompt: list[int]
    cached: int  # leading positions served from the prefix cache
    kv: KV  # positions 0..done-1 (the cached prefix at first)
    done: int  # positions with KV so far (`cached` at first)
    logits: torch.Tensor | None = None  # after the last prompt position
    hiddens: list[torch.Tensor] = field(default_factory=list)  # per chunk
    hidden: torch.Tensor | None = None  # (len(prompt) - cached, d), once done
    waiting: list[tuple[Hashable, SampleInput, str | None]] = field(default_factory=list)


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
        compute_dtype: torch.dtype | None = None,
        own_decoder: bool = True,
        decode_kernels: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self.lora = lora
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.context_length = context_length
        self.prefix_cache = prefix_cache
        self.continuous = continuous
        self.device = lora.model.get_output_embeddings().weight.device
        self.compute_dtype = compute_dtype or lora.model.get_output_embeddings().weight.dtype
        self.own_decoder = own_decoder and decoder.supports(lora.model)
        self.decode_kernels = decode_kernels  # the decoder's fused CPU kernels (model/kernels)
        if self.own_decoder and decode_kernels and self.device.type == "cpu":
            kernels.load()  # built now (once per machine), not at the first sample request
        self.prefill_chunk = max(1, prefill_chunk)
        self._requests: dict[Hashable, _Request] = {}
        self._rows: list[_Row] = []  # in the batch's slot order
        self._batch: DecodeBatch | None = None  # made at the first admission
        self._pending: list[_Unit] = []  # prompts being prefilled, oldest first
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
        """Admit validated requests (keys unique among the active ones) and run the first
        prefill chunk of their prompts; a request's rows join the decode batch when its
        prompt is prefilled. Raises (and admits none) if that first chunk fails."""
        if not self.continuous:
            self._static.extend(zip(keys, inputs, strict=True))
            return
        routes: list[str | None] = []
        try:
            for item in inputs:
                routes.append(self._pin(item.adapter_id))
            units, unit_of = self._units(inputs, routes)
        except Exception:
            for route in routes:
                self._unpin(route)
            raise
        for i, (key, item) in enumerate(zip(keys, inputs, strict=True)):
            self._requests[key] = _Request(None, [], 0)
            units[unit_of[i]].waiting.append((key, item, routes[i]))
        try:
            self._prefill_round(units)
        except Exception:
            for key in keys:
                self._requests.pop(key, None)
            for route in routes:
                self._unpin(route)
            raise
        self._pending.extend(u for u in units if u.done < len(u.prompt))

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
            units.append(_Unit(route, weights, list(item.prompt), cached, prefix_kv or [], cached))
        return units, unit_of

    # -- prefill, in chunks ----------------------------------------------------------------

    def _prefill_round(self, units: list[_Unit]) -> None:
        """The next chunk of each unit's prompt, oldest first, until `prefill_chunk` tokens
        are taken (at least one unit); units with the same prefilled length share one pass.
        A unit whose prompt is done joins the decode batch with its waiting requests."""
        budget = self.prefill_chunk
        ends: dict[int, int] = {}  # id(unit) -> end of this chunk
        for unit in units:
            if budget <= 0:
                break
            take = min(len(unit.prompt) - unit.done, budget)
            ends[id(unit)] = unit.done + take
            budget -= take
        chosen = [u for u in units if id(u) in ends]
        batch = self._batch_kind() if self.own_decoder else None
        if isinstance(batch, ArenaBatch) and batch.decoder.can_prefill:
            self._prefill_decoder(batch.decoder, chosen, [ends[id(u)] for u in chosen])
        else:
            by_done: dict[int, list[_Unit]] = {}
            for unit in chosen:
                by_done.setdefault(unit.done, []).append(unit)
            for group in by_done.values():
                group.sort(key=lambda u: u.route or "")
                self._prefill_pass(group, [ends[id(u)] for u in group])
        for unit in chosen:
            if unit.done == len(unit.prompt):
                self._join(unit)
        self._pending = [u for u in self._pending if u.done < len(u.prompt)]

    def _prefill_decoder(self, dec: decoder.Decoder, units: list[_Unit], ends: list[int]) -> None:
        """Positions [done, end) of every unit in one pass of tinkerd's decode step, each
        prompt token a row (decoder.prefill): no padding, whatever the units' lengths and
        cached prefixes."""
        chunks = [
            decoder.PrefillChunk(
                u.prompt[u.done : end], u.done, u.kv, u.route, end == len(u.prompt)
            )
            for u, end in zip(units, ends, strict=True)
        ]
        with torch.autocast(self.device.type, enabled=False):  # the decoder sets its dtypes
            results = dec.prefill(chunks)
        for u, end, got in zip(units, ends, results, strict=True):
            u.kv = got.kv
            u.hiddens.append(got.hidden)
            if got.logits is not None:
                u.logits = got.logits
            u.done = end

    def _prefill_pass(self, units: list[_Unit], ends: list[int]) -> None:
        """Positions [c, end) of units that have `c` positions of KV each, in one pass: the
        prefixes stacked, the chunks right-padded (causal attention: a padding position
        after a row's last token changes nothing before it), so each row's KV stays
        contiguous. Keeps each unit's KV, hidden states, and logits once its prompt ends."""
        c = units[0].done
        rest = [end - c for end in ends]
        width = max(rest)
        ids = torch.full((len(units), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(units), c + width), dtype=torch.long)
        attn[:, :c] = 1
        for i, u in enumerate(units):
            ids[i, : rest[i]] = torch.tensor(u.prompt[c : ends[i]])
            attn[i, c : c + rest[i]] = 1
        cache = full_cache(self.lora.model.config)
        if c:
            for li, layer in enumerate(cache.layers):
                set_layer(
                    layer,
                    torch.cat([u.kv[li][0] for u in units]),
                    torch.cat([u.kv[li][1] for u in units]),
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
            ending = [i for i, u in enumerate(units) if ends[i] == len(u.prompt)]
            if ending:
                last = hidden[torch.tensor(ending), torch.tensor([rest[i] - 1 for i in ending])]
                logits = unembed(self.lora, last).float()
                for j, i in enumerate(ending):
                    units[i].logits = logits[j]
        for i, u in enumerate(units):
            n = c + rest[i]
            u.kv = [
                (layer.keys[i : i + 1, :, :n], layer.values[i : i + 1, :, :n])
                for layer in cache.layers
            ]
            u.hiddens.append(hidden[i, : rest[i]])
            u.done = ends[i]

    def _join(self, unit: _Unit) -> None:
        """The unit's waiting requests get their prompt outputs and rows; the rows join the
        decode batch. The prompt's KV goes into the prefix cache."""
        unit.hidden = torch.cat(unit.hiddens) if len(unit.hiddens) > 1 else unit.hiddens[0]
        unit.hiddens = []
        rows: list[_Row] = []
        for key, item, route in unit.waiting:
            request = self._requests[key]
            request.extras = self._extras(item, route, unit)
            request.rows = self._new_rows(key, item, route)
            request.left = len(request.rows)
            rows.extend(request.rows)
            # One pin per row (the request took one): each row releases its own.
            for _ in range(len(request.rows) - 1):
                self._pin_again(route)
            if not request.rows:
                self._unpin(route)
        unit.waiting = []
        if self.prefix_cache is not None:
            block = self.prefix_cache.block
            if (len(unit.prompt) - 1) // block * block > unit.cached:
                self.prefix_cache.insert(unit.weights, unit.prompt[:-1], unit.kv)
        if rows:
            assert unit.logits is not None
            batch = self._batch_kind()
            logits = unit.logits.unsqueeze(0).expand(len(rows), -1)
            order = batch.add([row.route for row in rows], [unit.kv] * len(rows), logits)
            everyone = self._rows + rows
            self._rows = [everyone[i] for i in order]

    def _batch_kind(self) -> DecodeBatch:
        if self._batch is None:
            if self.own_decoder:
                self._batch = ArenaBatch(
                    decoder.Decoder(self.lora, self.compute_dtype, fused=self.decode_kernels)
                )
            else:
                self._batch = PaddedBatch(self.lora, self.device)
        return self._batch

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
        if self._pending:
            self._prefill_round(self._pending)
        live = [slot for slot, row in enumerate(self._rows) if row.stop_reason is None]
        if live:
            assert self._batch is not None and self._batch.logits is not None
            all_logits = self._batch.logits
            logits = all_logits if len(live) == len(self._rows) else all_logits[live]
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
            self._keep(keep)
        if self._rows:
            assert self._batch is not None
            self._batch.decode([row.tokens[-1] for row in self._rows])
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
        """Prefilled requests that asked for no samples at all: done on their next step."""
        empty = [key for key, r in self._requests.items() if r.extras is not None and not r.rows]
        return {key: self._output(self._requests.pop(key)) for key in empty}

    @staticmethod
    def _output(request: _Request) -> SampleOutput:
        e = request.extras
        assert e is not None
        return SampleOutput(
            [sampled_sequence(row) for row in request.rows],
            e.prompt_logprobs,
            e.topk_prompt_logprobs,
            target_prompt_logprobs=e.target_prompt_logprobs,
            prompt_alt_tokens=e.alt_tokens,
            prompt_alt_logprobs=e.alt_logprobs,
        )

    def _keep(self, slots: list[int]) -> None:
        """Only these rows stay in the decode batch."""
        assert self._batch is not None
        self._rows = [self._rows[i] for i in self._batch.keep(slots)]

    def cancel(self, keys: list[Hashable]) -> None:
        """Drop these requests' rows from the batch at once (no output for them)."""
        gone = set(keys)
        self._static = [(key, item) for key, item in self._static if key not in gone]
        for key in gone:
            self._requests.pop(key, None)
        for unit in self._pending:  # still prefilling: each waiting request holds one pin
            for key, _, route in unit.waiting:
                if key in gone:
                    self._unpin(route)
            unit.waiting = [w for w in unit.waiting if w[0] not in gone]
        self._pending = [u for u in self._pending if u.waiting]
        keep = []
        for slot, row in enumerate(self._rows):
            if row.key in gone:
                self._unpin(row.route)
            else:
                keep.append(slot)
        if len(keep) < len(self._rows):
            self._keep(keep)

    def abort(self) -> list[Hashable]:
        """Drop every active request (after a failed step); returns their keys."""
        keys = list(self._requests) + [key for key, _ in self._static]
        for row in self._rows:  # rows still in the batch hold their pin
            self._unpin(row.route)
        for unit in self._pending:
            for _, _, route in unit.waiting:
                self._unpin(route)
        self._pending.clear()
        self._requests.clear()
        self._static.clear()
        if self._rows:
            self._keep([])
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
