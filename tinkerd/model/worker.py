"""A worker owns one base model on one device and executes batches for many adapters.

This is the interface the engine schedules against. Every method takes and returns plain data
(dataclasses, tensors on CPU), so a worker can later live in another process or machine without
the layers above changing. Methods are not thread-safe: the engine calls one at a time.
"""

import dataclasses
import itertools
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from tinkerd.model.loading import BaseModel, BaseModelInfo
from tinkerd.model.lora import Adapter, LoraConfig, MultiLoraModel
from tinkerd.model.optimizer import AdamParams, AdapterOptimizer, OptimStepResult
from tinkerd.model.prefix_cache import PrefixCache
from tinkerd.model.sample_engine import (
    DEFAULT_PREFILL_CHUNK,
    Deltas,
    SampleEngine,
    continuous_supported,
)
from tinkerd.model.sampling import validate_sample_input
from tinkerd.model.training import forward_backward, validate_input
from tinkerd.model.types import (
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    ImageInput,
    SampleInput,
    SampleOutput,
)
from tinkerd.model.vision import check_input, vision_support

log = logging.getLogger(__name__)

DEFAULT_PREFIX_CACHE_BYTES = 512 << 20


class UnknownAdapterError(KeyError):
    """The adapter id is not loaded on this worker."""


@dataclass
class AdapterState:
    """Everything needed to persist an adapter: PEFT-named weights and optimizer moments."""

    config: LoraConfig
    target_modules: list[str]  # short module names, as PEFT's `target_modules`
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None


class ModelWorker:
    def __init__(
        self,
        base: BaseModel,
        *,
        autocast_dtype: torch.dtype | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        continuous_sampling: bool = True,
        own_decoder: bool = True,
        decode_kernels: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self.base = base
        self.lora = MultiLoraModel(base.model)
        self.optimizers: dict[str, AdapterOptimizer] = {}
        # Snapshot id → optim steps its source run had taken when it was frozen.
        self.snapshot_steps: dict[str, int] = {}
        self.autocast_dtype = autocast_dtype
        # Image input (Qwen-VL and Gemma 3 models); None: the model takes text only.
        self.vision = vision_support(
            base.model, getattr(base.model, "name_or_path", "") or base.info.name, base.info.name
        )
        # The decode batch (continuous batching where the model allows, see sample_engine).
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.sampler = SampleEngine(
            self.lora,
            base.tokenizer,
            eos_ids=base.info.eos_token_ids,
            pad_id=base.info.pad_token_id,
            context_length=base.info.context_length,
            prefix_cache=self.prefix_cache,
            continuous=continuous_sampling
            and continuous_supported(base.model, self.vision is not None),
            compute_dtype=autocast_dtype,
            own_decoder=own_decoder,
            decode_kernels=decode_kernels,
            prefill_chunk=prefill_chunk,
        )
        self._sample_adapters: dict[Hashable, str | None] = {}  # admitted key -> adapter id
        self._local_keys = itertools.count()

    @property
    def info(self) -> BaseModelInfo:
        return self.base.info

    def _autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(
            self.base.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled
        )

    def _adapter(self, adapter_id: str) -> Adapter:
        if adapter_id not in self.lora.adapters:
            raise UnknownAdapterError(adapter_id)
        return self.lora.adapters[adapter_id]

    def add_adapter(self, adapter_id: str, config: LoraConfig) -> None:
        adapter = self.lora.add_adapter(adapter_id, config)
        self.optimizers[adapter_id] = AdapterOptimizer(adapter.parameters())

    def remove_adapter(self, adapter_id: str) -> None:
        self._adapter(adapter_id)
        self.lora.remove_adapter(adapter_id)
        self.optimizers.pop(adapter_id, None)
        self.snapshot_steps.pop(adapter_id, None)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.lora.adapters

    def snapshot_adapter(self, source_id: str, snapshot_id: str) -> None:
        """Freeze a copy of an adapter's current weights for sampling (replacing an earlier
        snapshot of the same id: inflight samplers follow one mutable target)."""
        self._adapter(source_id)
        self.lora.snapshot(source_id, snapshot_id)
        self.snapshot_steps[snapshot_id] = self.optim_steps(source_id)

    def optim_steps(self, adapter_id: str) -> int:
        """Optimizer steps a trainable adapter has taken (0 for one without an optimizer)."""
        optimizer = self.optimizers.get(adapter_id)
        return optimizer.steps if optimizer is not None else 0

    def validate(self, item: ForwardBackwardInput) -> None:
        """Raise LossInputError for a request that can never run (see training.validate_input)."""
        if item.adapter_id is not None:
            self._adapter(item.adapter_id)
        validate_input(item, self.info.vocab_size, self.info.context_length)
        for i, datum in enumerate(item.data):
            self.check_images(datum.tokens, datum.images, f"data[{i}].model_input")

    def forward_backward(self, inputs: list[ForwardBackwardInput]) -> list[ForwardBackwardOutput]:
        """One batched pass over every input; inputs must be validated first.
        stable_reinforce gets the adapter's current optim step count (for its staleness)."""
        inputs = [self._with_optim_steps(item) for item in inputs]
        with self._autocast():
            return forward_backward(self.lora, inputs, self.info.pad_token_id)

    def _with_optim_steps(self, item: ForwardBackwardInput) -> ForwardBackwardInput:
        if item.adapter_id is None:
            return item
        self._adapter(item.adapter_id)
        if item.loss_fn != "stable_reinforce":
            return item
        config = {**item.loss_fn_config, "optim_steps": float(self.optim_steps(item.adapter_id))}
        return dataclasses.replace(item, loss_fn_config=config)

    def activation_bytes_per_token(self) -> int:
        """Memory one training token costs during forward_backward, measured, not guessed.

        A probe adapter runs two forward passes of different lengths while a hook adds up the
        tensors autograd saves for backward (weights count in both and cancel out). Backward
        holds about as much again in gradients of those activations, hence the factor 2
        (on SmolLM2 in float32: 1.36 MB saved per token, 2.7 MB peak RSS per token).
        """
        probe = "__activation_probe__"
        self.add_adapter(probe, LoraConfig(seed=0))  # seeded: leaves the global RNG alone
        try:
            saved = [self._saved_bytes(probe, n) for n in (8, 40)]
        finally:
            self.remove_adapter(probe)
        return max(1, 2 * (saved[1] - saved[0]) // 32)

    def _saved_bytes(self, adapter_id: str, tokens: int) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        ids = torch.arange(tokens) % self.info.vocab_size
        datum = Datum(ids.tolist(), {"target_tokens": ids, "weights": torch.ones(tokens)})
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.forward_backward([ForwardBackwardInput(adapter_id, [datum])])
        self.zero_grad(adapter_id)
        return sum(storages.values())

    def optim_step(self, adapter_id: str, params: AdamParams) -> OptimStepResult:
        adapter = self._adapter(adapter_id)
        if not adapter.trainable:
            raise ValueError(f"adapter {adapter_id!r} is a frozen snapshot")
        return self.optimizers[adapter_id].step(params)

    def adapter_bytes(self, adapter_id: str) -> int:
        """Memory held by an adapter's weights (its optimizer moments not counted)."""
        return sum(p.numel() * p.element_size() for p in self._adapter(adapter_id).parameters())

    def has_pending_grads(self, adapter_id: str) -> bool:
        """Gradients accumulated by forward_backward that no optim_step has applied yet."""
        return any(p.grad is not None for p in self._adapter(adapter_id).parameters())

    def zero_grad(self, adapter_id: str) -> None:
        for p in self._adapter(adapter_id).parameters():
            p.grad = None

    def validate_sample(self, item: SampleInput) -> None:
        """Raise ValueError for a sample request that can never run."""
        if item.adapter_id is not None:
            self._adapter(item.adapter_id)
        validate_sample_input(item, self.info.vocab_size, self.info.context_length)
        self.check_images(item.prompt, item.prompt_images, "prompt")

    def check_images(self, tokens: list[int], images: list[ImageInput], what: str) -> None:
        """Raise ImageError (a ValueError) for images this model cannot take; decode and
        process the others (see vision.check_input)."""
        check_input(tokens, images, self.vision, self.info.name, what)

    def sample(self, inputs: list[SampleInput]) -> list[SampleOutput]:
        """Generate for every input (admitted together, decoded to the end, alongside any
        requests already admitted); inputs must be validated first. Calls each input's
        `on_token` hook with its tokens after every decode step."""
        if not inputs:
            return []
        keys = [("local", next(self._local_keys)) for _ in inputs]
        hooks = {key: item.on_token for key, item in zip(keys, inputs, strict=True)}
        self.sample_admit(keys, [dataclasses.replace(item, on_token=None) for item in inputs])
        results: dict[Hashable, SampleOutput] = {}
        while any(key not in results for key in keys):
            finished, deltas = self.sample_step(0.0)  # one step: hooks see tokens as drawn
            for key, tokens in deltas.items():
                hook = hooks.get(key)
                for index, choice in tokens if hook is not None else ():
                    try:
                        hook(index, choice)
                    except Exception:  # a caller's hook never breaks the batch for the others
                        log.warning("on_token hook failed; dropped", exc_info=True)
                        hooks[key] = None
                        break
            results.update(finished)
        return [results[key] for key in keys]

    # -- step-wise sampling (the scheduler's continuous batch) ---------------------------

    def sample_admit(self, keys: list[Hashable], inputs: list[SampleInput]) -> None:
        """Prefill validated requests and add their rows to the decode batch (`keys`: unique
        among active requests; plain data, `on_token` is not called here). Raises, admitting
        none, on an unknown adapter or a failed prefill."""
        for item in inputs:
            if item.adapter_id is not None:
                self._adapter(item.adapter_id)
        with self._autocast():
            self.sampler.add(keys, inputs)
        for key, item in zip(keys, inputs, strict=True):
            self._sample_adapters[key] = item.adapter_id

    def sample_step(self, max_seconds: float | None) -> tuple[dict[Hashable, SampleOutput], Deltas]:
        """Decode steps for every active row until `max_seconds` have passed (at least one
        step; None: until the batch is empty). Returns the requests that finished and every
        request's new tokens [(sample index, Choice)] in draw order. If a step fails the
        whole batch is dropped (see `sample_abort`) and the error raised."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        finished: dict[Hashable, SampleOutput] = {}
        deltas: Deltas = {}
        while self.sampler.active():
            with self._autocast():
                done, new = self.sampler.step()
            for key, tokens in new.items():
                deltas.setdefault(key, []).extend(tokens)
            for key, out in done.items():
                adapter_id = self._sample_adapters.pop(key, None)
                if adapter_id is not None:
                    out.weights_step = self.snapshot_steps.get(adapter_id)
                finished[key] = out
            if deadline is not None and time.monotonic() >= deadline:
                break
        return finished, deltas

    def sample_active(self) -> int:
        """Requests admitted and not yet finished."""
        return self.sampler.active()

    def sample_cancel(self, keys: list[Hashable]) -> None:
        """Drop these requests from the decode batch (cancelled: no output)."""
        self.sampler.cancel(keys)
        for key in keys:
            self._sample_adapters.pop(key, None)

    def sample_abort(self) -> list[Hashable]:
        """Drop every active request (after a failed step); returns their keys."""
        keys = self.sampler.abort()
        for key in keys:
            self._sample_adapters.pop(key, None)
        return keys

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(lookups, hits) of the prompt prefix cache since startup."""
        if self.prefix_cache is None:
            return 0, 0
        return self.prefix_cache.stats.lookups, self.prefix_cache.stats.hits

    def export_adapter(self, adapter_id: str, *, with_optimizer: bool) -> AdapterState:
        adapter = self._adapter(adapter_id)
        names = list(adapter.params)
        weights = {k: v.detach().cpu().clone() for k, v in adapter.params.items()}
        optimizer = None
        if with_optimizer and adapter_id in self.optimizers:
            optimizer = self.optimizers[adapter_id].state_tensors(names)
        targets = sorted({p.rsplit(".", 1)[-1] for p in self.lora.target_paths(adapter.config)})
        return AdapterState(adapter.config, targets, weights, optimizer)

    def import_snapshot(self, snapshot_id: str, state: AdapterState) -> None:
        """Load saved weights as a frozen, sample-only adapter (no optimizer state)."""
        if self.has_adapter(snapshot_id):
            self.remove_adapter(snapshot_id)
        adapter = self.lora.add_adapter(snapshot_id, state.config)
        self.lora.load_weights(snapshot_id, state.weights)
        adapter.trainable = False
        for p in adapter.parameters():
            p.requires_grad_(False)

    def import_adapter(self, adapter_id: str, state: AdapterState) -> None:
        """Create (or replace) an adapter from saved state; optimizer moments if present."""
        if self.has_adapter(adapter_id):
            self.remove_adapter(adapter_id)
        self.add_adapter(adapter_id, state.config)
        self.lora.load_weights(adapter_id, state.weights)
        if state.optimizer:
            names = list(self._adapter(adapter_id).params)
            self.optimizers[adapter_id].load_state_tensors(names, state.optimizer)
