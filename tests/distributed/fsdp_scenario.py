"""One scripted session of worker calls, run on an in-process `ModelWorker` (the reference)
and on each rank of a `ShardedWorker` gang, whose results the tests compare.

As a script it is one rank of the gang: `python -m torch.distributed.run --nproc-per-node 2
--master-addr 127.0.0.1 --master-port P fsdp_scenario.py OUT_DIR MODEL_DIR...` writes
`OUT_DIR/<model dir name>.rank<r>.pt` per model and rank.
"""

import os
import sys
from pathlib import Path
from typing import Any

import torch

from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

# Adam's eps bounds how far a gradient difference moves a weight: |dw| <= lr * |dg| / eps.
ADAM = AdamParams(learning_rate=1e-2, eps=1e-4, weight_decay=0.1)
ADAPTERS = ("alice", "bob", "dave")
ALL_ADAPTERS = ("alice", "bob", "carol", "dave")


def datum(n: int, seed: int, *, rl: bool = False) -> Datum:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n + 1,), generator=gen)
    inputs = {"target_tokens": tokens[1:].clone()}
    if rl:
        inputs["logprobs"] = -torch.rand(n, generator=gen) * 4
        inputs["advantages"] = torch.randn(n, generator=gen)
    else:
        inputs["weights"] = torch.rand(n, generator=gen)
    return Datum(tokens[:-1].tolist(), inputs)


def run(worker: ModelWorker) -> dict[str, Any]:
    """The session; returns what the tests compare (tensors on CPU)."""
    out: dict[str, Any] = {}
    worker.add_adapter("alice", LoraConfig(rank=8, seed=11))
    worker.add_adapter("bob", LoraConfig(rank=4, seed=12, train_attn=False))
    worker.add_adapter("carol", LoraConfig(rank=4))  # unseeded: a fresh draw
    worker.add_adapter("dave", LoraConfig(rank=2, seed=13, train_attn=False, train_mlp=False))
    # 7 rows of 4 requests and 3 adapters, uneven lengths; an odd count splits unevenly.
    first = [
        ForwardBackwardInput("alice", [datum(17, 1), datum(9, 2), datum(30, 3)]),
        ForwardBackwardInput(
            "bob", [datum(12, 4, rl=True), datum(25, 5, rl=True)], loss_fn="importance_sampling"
        ),
        ForwardBackwardInput(None, [datum(8, 6)], forward_only=True),
        ForwardBackwardInput("carol", [datum(5, 7)], forward_only=True),
    ]
    out["first"] = worker.forward_backward(first)
    out["grads_first"] = grads(worker)
    # Rank 0 gets dave's row (LoRA on the head only), rank 1 alice's: both must still run
    # every layer's backward, or their all-gathers would not pair up.
    out["head_only"] = worker.forward_backward(
        [
            ForwardBackwardInput("dave", [datum(9, 20)]),
            ForwardBackwardInput("alice", [datum(10, 21)]),
        ]
    )
    # One row: the other rank runs a zero-weight filler; gradients accumulate.
    out["second"] = worker.forward_backward([ForwardBackwardInput("alice", [datum(11, 8)])])
    out["grads"] = grads(worker)
    out["steps"] = {a: worker.optim_step(a, ADAM) for a in ADAPTERS}
    out["pending"] = {a: worker.has_pending_grads(a) for a in ADAPTERS}
    out["weights"] = weights(worker, ALL_ADAPTERS)
    out["forward_only"] = worker.forward_backward(
        [ForwardBackwardInput("alice", [datum(13, 9), datum(7, 10)], forward_only=True)]
    )
    worker.snapshot_adapter("alice", "alice@1")
    prompt = datum(6, 11).tokens
    out["samples"] = worker.sample(
        [
            SampleInput("alice@1", prompt, SamplingParams(max_tokens=6, seed=5), num_samples=2),
            SampleInput(None, prompt[:4], SamplingParams(max_tokens=5, temperature=0.0)),
        ]
    )
    out["unseeded"] = worker.sample([SampleInput("alice@1", prompt, SamplingParams(max_tokens=6))])
    return out


def grads(worker: ModelWorker) -> dict[str, torch.Tensor | None]:
    return {
        f"{a}/{name}": (None if p.grad is None else p.grad.detach().cpu().clone())
        for a in ALL_ADAPTERS
        for name, p in worker.lora.adapters[a].params.items()
    }


def weights(worker: ModelWorker, adapters: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        f"{a}/{name}": p.detach().cpu().clone()
        for a in adapters
        for name, p in worker.lora.adapters[a].params.items()
    }


def main(out_dir: Path, model_dirs: list[str]) -> None:
    from tinkerd.model.fsdp import ShardedWorker, init_gang
    from tinkerd.model.loading import load_base_model

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    place = init_gang(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    for model_dir in model_dirs:
        base = load_base_model(model_dir, data_dir=out_dir)
        worker = ShardedWorker(base, place)
        result = run(worker)
        result["base_bytes"] = sum(
            p.to_local().numel() * p.element_size() for p in base.model.parameters()
        )
        torch.save(result, out_dir / f"{Path(model_dir).name}.rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
