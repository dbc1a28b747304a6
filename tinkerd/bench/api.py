"""`tinkerd bench api`: what the HTTP path costs, measured against the engine in-process.

1. Throughput: the same SFT step (forward_backward + optim_step, 8 x 256 tokens, LoRA r32)
   through the official SDK and a `tinkerd serve` process, vs `ModelWorker` called directly.
2. Latency: round trips of a one-datum forward_backward + optim_step on a tiny model
   (p50/p99), where compute is negligible and the protocol is what is measured.
Both sides run in the dtype this machine runs fast (bench/dtype.py) unless `--dtype` says.
The last line printed is one JSON object with every figure.
"""

import dataclasses
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinkerd.bench.dtype import choose_dtype
from tinkerd.bench.server import serve
from tinkerd.bench.stats import best_of, percentile
from tinkerd.constants import EMBEDDED_MODEL


@dataclass(frozen=True)
class ApiBenchConfig:
    model: str = EMBEDDED_MODEL
    data_dir: Path = Path(".")
    threads: int = 2
    batch: int = 8
    seq_len: int = 256
    rank: int = 32
    steps: int = 3
    latency_rounds: int = 200
    dtype: str | None = None  # None: bfloat16 with native bf16, else float32 (bench/dtype.py)


def sft_data(vocab: int, batch: int, seq_len: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len + 1), generator=gen).tolist()


def bench_inprocess(cfg: ApiBenchConfig, seqs: list[list[int]]) -> float:
    """Seconds per step of the worker called directly (best of `steps`)."""
    from tinkerd.model.loading import load_base_model
    from tinkerd.model.lora import LoraConfig
    from tinkerd.model.optimizer import AdamParams
    from tinkerd.model.types import Datum, ForwardBackwardInput
    from tinkerd.model.worker import ModelWorker

    dtype = cfg.dtype or "bfloat16"
    base = load_base_model(cfg.model, data_dir=cfg.data_dir, dtype=dtype)
    worker = ModelWorker(base, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    worker.add_adapter("bench", LoraConfig(rank=cfg.rank, seed=0))
    data = [
        Datum(s[:-1], {"target_tokens": torch.tensor(s[1:]), "weights": torch.ones(cfg.seq_len)})
        for s in seqs
    ]
    item = ForwardBackwardInput("bench", data)

    def step() -> None:
        worker.forward_backward([item])
        worker.optim_step("bench", AdamParams(learning_rate=1e-5))

    return best_of(step, cfg.steps)


def bench_sdk(cfg: ApiBenchConfig, url: str, seqs: list[list[int]]) -> float:
    """Seconds per step of the same loop through the SDK and the server (best of `steps`)."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    client = service.create_lora_training_client(base_model=cfg.model, rank=cfg.rank).result()
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * cfg.seq_len},
        )
        for s in seqs
    ]

    def step() -> None:
        fwd_bwd = client.forward_backward(data, loss_fn="cross_entropy")
        optim = client.optim_step(types.AdamParams(learning_rate=1e-5))
        fwd_bwd.result()
        optim.result()

    return best_of(step, cfg.steps)


def bench_latency(cfg: ApiBenchConfig, url: str, model: str) -> list[float]:
    """Milliseconds per one-datum forward_backward + optim_step round trip."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    client = service.create_lora_training_client(base_model=model, rank=8).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(1, 17))),
        loss_fn_inputs={"target_tokens": list(range(2, 18)), "weights": [1.0] * 16},
    )
    rounds = []
    for i in range(cfg.latency_rounds + 10):
        t0 = time.perf_counter()
        fwd_bwd = client.forward_backward([datum], loss_fn="cross_entropy")
        optim = client.optim_step(types.AdamParams(learning_rate=1e-4))
        fwd_bwd.result()
        optim.result()
        if i >= 10:  # warm-up
            rounds.append((time.perf_counter() - t0) * 1000)
    return rounds


def run(cfg: ApiBenchConfig) -> dict:
    from tinkerd.model.loading import load_base_model
    from tinkerd.model.tiny import build_tiny_model

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    torch.set_num_threads(cfg.threads)
    choice = choose_dtype(cfg.dtype)
    cfg = dataclasses.replace(cfg, dtype=choice.dtype)
    print(choice.header(), flush=True)
    vocab = load_base_model(cfg.model, data_dir=cfg.data_dir).info.vocab_size
    seqs = sft_data(vocab, cfg.batch, cfg.seq_len)
    tokens = cfg.batch * cfg.seq_len
    print(f"in-process: {cfg.batch}x{cfg.seq_len}, LoRA r{cfg.rank}", flush=True)
    t_local = bench_inprocess(cfg, seqs)
    print("through the SDK and `tinkerd serve`", flush=True)
    with serve(
        cfg.model, cfg.data_dir, threads=cfg.threads, dtype=choice.dtype, env=choice.serve_env()
    ) as srv:
        t_sdk = bench_sdk(cfg, srv.url, seqs)
    print(f"latency: {cfg.latency_rounds} one-datum round trips on a tiny model", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(build_tiny_model(Path(tmp) / "tiny"))
        with serve(tiny, Path(tmp) / "data", threads=1, dtype="float32") as srv:
            rounds = bench_latency(cfg, srv.url, tiny)
    return {
        "model": cfg.model,
        "threads": cfg.threads,
        "batch": f"{cfg.batch}x{cfg.seq_len}",
        "dtype": choice.dtype,
        "dtype_reason": choice.reason,
        "sdk_tokens_per_s": round(tokens / t_sdk, 1),
        "inprocess_tokens_per_s": round(tokens / t_local, 1),
        "ratio_vs_inprocess": round(t_local / t_sdk, 3),
        "roundtrip_p50_ms": round(statistics.median(rounds), 2),
        "roundtrip_p99_ms": round(percentile(rounds, 0.99), 2),
        "roundtrip_rounds": len(rounds),
    }
