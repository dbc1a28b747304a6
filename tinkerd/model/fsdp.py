"""A `ModelWorker` whose frozen base is sharded over the ranks of a torch.distributed gang.

Every rank of the gang runs this worker and receives every call (SPMD); the caller takes rank
0's answer. What is sharded and what is replicated:

* The base model: FSDP2 (`fully_shard`) on each decoder layer, and on the root model for the
  rest (embeddings, final norm, LM head, a vision tower). Each layer's weights are all-gathered
  when it runs and freed after, in forward and again in backward. The root unit is unsharded
  explicitly for the whole pass (`_unsharded`): tinkerd calls the decoder stack and the LM head
  separately (`training.body`, `training.unembed`), so the root's forward never runs, and the
  LM head is called once per chunk of tokens, a count that differs between ranks, which an FSDP
  unit of its own would turn into mismatched all-gathers. This is also what makes tied
  embeddings work: the shared weight lives in the root unit and is one plain tensor for the
  embedding and the head alike.
* LoRA adapters and their AdamW moments: replicated. They are not registered parameters
  (`lora.LoraLinear`), so FSDP leaves them alone. A new adapter is broadcast from rank 0 (an
  unseeded init draws fresh entropy per rank); gradients are all-reduced in one flat bucket at
  the end of each forward_backward, so every rank holds the whole batch's gradients and
  optim_step, has_pending_grads and exports give the same answer on every rank.
* A forward_backward's rows: every rank takes every `world`-th row of the flattened batch, runs
  tinkerd's own `forward_backward` on them, and the per-datum outputs are gathered back in the
  original order (metrics combined with `reduce_metrics`, weighted by datums).
* Sampling: every rank runs the same batch with the same seeds (an unseeded request gets a seed
  drawn on rank 0 and broadcast), so the ranks decode the same tokens and take the same
  all-gathers; every rank returns the same result. Each decoded token all-gathers every layer:
  fine for small models, a vLLM pool is the answer for large ones (docs/multi-device.md).

Collectives must match across ranks, so everything that decides whether a rank runs a pass or a
backward is decided from the whole batch, which every rank has: a rank without rows, or without
a training row while the batch trains, runs a filler row with zero loss weights, and while the
batch trains the input embeddings require grad, so every layer runs its backward on every rank.
An exception raised on one rank in the middle of a pass leaves the others waiting in a
collective until the process group's timeout; the gang is then lost and restarted.
"""

import dataclasses
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from tinkerd.model.loading import BaseModel
from tinkerd.model.lora import LoraConfig
from tinkerd.model.metrics import reduce_metrics
from tinkerd.model.types import (
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    SampleInput,
    SampleOutput,
)
from tinkerd.model.worker import ModelWorker

# Long enough for a slow pass on a busy host, short enough that a gang whose peer died in the
# middle of a collective gives up instead of hanging for gloo's default 30 minutes.
DEFAULT_TIMEOUT_S = 300.0

# Path components that mark a vision tower: its blocks stay in the root unit (replicated during
# the pass), because only the ranks holding image rows run them.
VISION_PARTS = ("visual", "vision_tower", "vision_model")


@dataclass(frozen=True)
class GangPlace:
    """Where this process sits in its gang."""

    rank: int
    world_size: int
    device: torch.device


def init_gang(
    rank: int,
    world_size: int,
    address: str,
    port: int,
    *,
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> GangPlace:
    """Join the gang's process group: gloo on CPU, NCCL on CUDA (`device` "cuda" picks the GPU
    by LOCAL_RANK, else by rank)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo",
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return GangPlace(rank, world_size, dev)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder's blocks: every child of a ModuleList named `layers` outside a vision
    tower."""
    blocks: list[nn.Module] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not isinstance(module, nn.ModuleList) or parts[-1] != "layers":
            continue
        if any(part in VISION_PARTS for part in parts):
            continue
        blocks.extend(module)
    return blocks


def shard_model(model: nn.Module, device: torch.device) -> None:
    """FSDP2 over the default process group: each decoder layer, then the root for the rest.

    One no-grad forward through the root follows, so FSDP takes the root model as the root of
    its units (it picks whichever unit runs forward first; tinkerd's passes start at a layer).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    root(model).reshard()


def root(model: nn.Module) -> FSDPModule:
    if not isinstance(model, FSDPModule):
        raise TypeError("the model is not sharded (shard_model first)")
    return model


class ShardedWorker(ModelWorker):
    """One rank's `ModelWorker` over an FSDP2-sharded base; see the module docstring."""

    def __init__(
        self, base: BaseModel, place: GangPlace, *, autocast_dtype: torch.dtype | None = None
    ) -> None:
        # LoRA layers are wrapped first. Sampling runs transformers' forward on the unsharded
        # base: tinkerd's decode step would keep a packed copy of every rank's whole base.
        super().__init__(base, autocast_dtype=autocast_dtype, own_decoder=False)
        self.place = place
        shard_model(base.model, base.device)
        self._train_pass = False
        base.model.get_input_embeddings().register_forward_hook(self._embeddings_hook)

    def _embeddings_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        """While the batch trains, make every rank's activations require grad, so each layer
        runs its backward (and its all-gather) on every rank whatever its rows' adapters are."""
        if self._train_pass and torch.is_grad_enabled() and not output.requires_grad:
            return output.detach().requires_grad_()
        return output

    @contextmanager
    def _unsharded(self) -> Iterator[None]:
        model = root(self.base.model)
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    def add_adapter(self, adapter_id: str, config: LoraConfig) -> None:
        """Create the adapter on every rank with rank 0's initial weights."""
        super().add_adapter(adapter_id, config)
        params = self.lora.adapters[adapter_id].parameters()
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for p, value in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.copy_(value.view_as(p))

    def forward_backward(self, inputs: list[ForwardBackwardInput]) -> list[ForwardBackwardOutput]:
        """This rank's rows through tinkerd's forward_backward, then the gradients all-reduced
        and the outputs gathered; every rank returns the whole batch's outputs."""
        rows = [(i, j) for i, item in enumerate(inputs) for j in range(len(item.data))]
        if not rows:
            return super().forward_backward(inputs)
        # Raise here, on every rank alike, what would otherwise raise on some ranks only.
        inputs = [self._with_optim_steps(item) for item in inputs]
        trainable = {
            i
            for i, item in enumerate(inputs)
            if item.adapter_id is not None and self.lora.adapters[item.adapter_id].trainable
        }
        training = [i for i in sorted(trainable) if not inputs[i].forward_only]
        trained = list(dict.fromkeys(inputs[i].adapter_id for i in training))
        # With a backward, every trainable adapter of the batch may get gradients (forward-only
        # rows of one get zeros, as in one process): all of them are reduced.
        reduced = list(dict.fromkeys(inputs[i].adapter_id for i in sorted(trainable)))
        reduced = reduced if trained else []
        mine = split_rows(rows, self.place.rank, self.place.world_size)
        local = [
            dataclasses.replace(inputs[i], data=[inputs[i].data[j] for j in js]) for i, js in mine
        ]
        if not local or (training and not any(i in training for i, _ in mine)):
            local.append(filler(inputs, trained[0] if trained else None))
        stashed = self._stash_grads(reduced)
        self._train_pass = bool(trained)
        outputs: list[ForwardBackwardOutput] | None = None
        error: BaseException | None = None
        try:
            with self._unsharded():
                outputs = super().forward_backward(local)
        except Exception as exc:  # reported on every rank after the gather below
            error = exc
        finally:
            self._train_pass = False
        parts: list[Any] = [None] * self.place.world_size
        mine_out = [(i, js, out) for (i, js), out in zip(mine, outputs or [], strict=False)]
        dist.all_gather_object(parts, (mine_out, error))
        errors = [e for _, e in parts if e is not None]
        if errors:
            for p, grad in zip(self._params(reduced), stashed, strict=True):
                p.grad = grad
            raise errors[0]
        self._reduce_grads(reduced, stashed)
        return merge_outputs(len(inputs), [p for p, _ in parts])

    def _params(self, adapter_ids: Sequence[str]) -> list[nn.Parameter]:
        return [p for a in adapter_ids for p in self.lora.adapters[a].parameters()]

    def _stash_grads(self, adapter_ids: Sequence[str]) -> list[torch.Tensor | None]:
        """Take the (already reduced) gradients out, so the pass leaves only this rank's."""
        stashed = []
        for p in self._params(adapter_ids):
            stashed.append(p.grad)
            p.grad = None
        return stashed

    def _reduce_grads(self, adapter_ids: Sequence[str], stashed: list[torch.Tensor | None]) -> None:
        """Sum this pass's gradients over the ranks (one bucket, with a has-gradient flag per
        parameter so a gradient no rank produced stays None) and add the earlier ones back."""
        params = self._params(adapter_ids)
        if not params:
            return
        device = params[0].device
        flags = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype)
        pieces = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
        ]
        flat = torch.cat([*pieces, flags.to(device)])
        dist.all_reduce(flat)
        sums = flat[: -len(params)].split([p.numel() for p in params])
        for p, total, flag, before in zip(params, sums, flat[-len(params) :], stashed, strict=True):
            if float(flag) == 0.0:
                p.grad = before
            else:
                p.grad = total.view_as(p) if before is None else before + total.view_as(p)

    def sample(self, inputs: list[SampleInput]) -> list[SampleOutput]:
        """The same batch with the same seeds on every rank (see the module docstring)."""
        if not inputs:
            return []
        drawn = [secrets.randbits(63) if item.params.seed is None else None for item in inputs]
        shared: list[Any] = [drawn]
        dist.broadcast_object_list(shared, src=0)
        seeded = [
            item
            if seed is None
            else dataclasses.replace(item, params=dataclasses.replace(item.params, seed=seed))
            for item, seed in zip(inputs, shared[0], strict=True)
        ]
        with self._unsharded():
            return super().sample(seeded)


def split_rows(
    rows: list[tuple[int, int]], rank: int, world_size: int
) -> list[tuple[int, list[int]]]:
    """Every `world_size`-th row from `rank` on, grouped by input: [(input index, datum
    indices)]."""
    grouped: dict[int, list[int]] = {}
    for i, j in rows[rank::world_size]:
        grouped.setdefault(i, []).append(j)
    return list(grouped.items())


def filler(inputs: list[ForwardBackwardInput], adapter_id: str | None) -> ForwardBackwardInput:
    """A one-token row whose loss has weight 0: it takes this rank through the pass (and the
    backward, for a training adapter) without changing any gradient."""
    token = inputs[0].data[0].tokens[0]
    ids = torch.tensor([token], dtype=torch.long)
    datum = Datum([token], {"target_tokens": ids, "weights": torch.zeros(1)})
    return ForwardBackwardInput(adapter_id, [datum], forward_only=adapter_id is None)


def merge_outputs(
    n_inputs: int, parts: list[list[tuple[int, list[int], ForwardBackwardOutput]]]
) -> list[ForwardBackwardOutput]:
    """Every rank's per-input outputs back into one output per input, datums in order."""
    datums: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(n_inputs)]
    metrics: list[list[tuple[dict[str, float], int]]] = [[] for _ in range(n_inputs)]
    for rank_part in parts:
        for i, js, out in rank_part:
            datums[i].update(zip(js, out.loss_fn_outputs, strict=True))
            metrics[i].append((out.metrics, len(js)))
    return [
        ForwardBackwardOutput(
            loss_fn_outputs=[by_index[j] for j in sorted(by_index)],
            metrics=reduce_metrics(pairs),
        )
        for by_index, pairs in zip(datums, metrics, strict=True)
    ]
