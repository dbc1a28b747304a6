"""`tinkerd bench moe`: the cost of LoRA on MoE experts, against attention-only LoRA.

A tiny random-init Qwen3-MoE built in code (hidden 64, 2 layers, 4 experts top-2, MoE width
32; the shape of the unit tests, `--experts` and `--hidden-size` scale it), loaded as
`tinkerd serve` loads a model. Two adapters of one rank on the same worker, side by side in the
same run, the variants alternating repetition by repetition (best of `steps` kept):

- *experts*: `train_attn` + `train_mlp` (every routed expert's gate_up/down projections);
- *attention-only*: `train_attn` only (the baseline: what tinkerd adapted on MoE before).

Figures per variant: a training step (`forward_backward` cross_entropy + `optim_step`) of
`rows` x `seq` tokens, tokens/s; a mixed batch of `tenants` adapters (one row each, fwd+bwd),
tokens/s; the bytes autograd saves for backward in one training forward (deterministic: the
activation memory LoRA adds) and the peak memory during the step (CUDA: `max_memory_allocated`;
CPU: peak RSS above the step's start, sampled every millisecond). The last line printed is one
JSON object with every figure.
"""

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from tinkerd.bench.dtype import choose_dtype
from tinkerd.model.loading import load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.tiny import tiny_tokenizer
from tinkerd.model.types import Datum, ForwardBackwardInput
from tinkerd.model.worker import ModelWorker

VARIANTS = {"experts": True, "attention_only": False}  # name -> train_mlp


@dataclass(frozen=True)
class MoeBenchConfig:
    rows: int = 8
    seq: int = 128
    rank: int = 32
    tenants: int = 4
    steps: int = 3
    threads: int = 2
    device: str = "cpu"
    dtype: str | None = None
    experts: int = 4
    hidden_size: int = 64


def build_model(path: Path, cfg: MoeBenchConfig) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size,
        moe_intermediate_size=cfg.hidden_size // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=cfg.hidden_size // 4,
        vocab_size=300,
        num_experts=cfg.experts,
        num_experts_per_tok=2,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _rows(n: int, seq: int, seed: int) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Datum(
            torch.randint(0, 256, (seq,), generator=gen).tolist(),
            {
                "target_tokens": torch.randint(0, 256, (seq,), generator=gen),
                "weights": torch.ones(seq),
            },
        )
        for _ in range(n)
    ]


class _PeakMemory:
    """Peak memory above the start of the block: CUDA allocator, or sampled RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak_mb = 0.0

    def __enter__(self) -> "_PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.high = self.start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.is_set():
            self.high = max(self.high, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        self.stop.set()
        self.thread.join()
        self.high = max(self.high, self.proc.memory_info().rss)
        self.peak_mb = (self.high - self.start) / 2**20


def _saved_bytes(worker: ModelWorker, items: list[ForwardBackwardInput]) -> int:
    """Bytes of the tensors autograd saves for backward during one forward_backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        worker.forward_backward(items)
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(cfg: MoeBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    choice = choose_dtype(cfg.dtype, cfg.device)
    print(choice.header(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "tiny-qwen3-moe", cfg)
        base = load_base_model(str(path), data_dir=Path(tmp), dtype=choice.dtype, device=cfg.device)
    worker = ModelWorker(base, autocast_dtype=torch.bfloat16 if choice.autocast else None)
    train = _rows(cfg.rows, cfg.seq, seed=0)
    mixed_rows = _rows(cfg.tenants, cfg.seq, seed=1)
    items: dict[str, list[ForwardBackwardInput]] = {}
    mixed: dict[str, list[ForwardBackwardInput]] = {}
    params: dict[str, int] = {}
    for name, train_mlp in VARIANTS.items():
        lora = LoraConfig(rank=cfg.rank, seed=0, train_mlp=train_mlp, train_unembed=False)
        for t in range(cfg.tenants):
            worker.add_adapter(f"{name}-{t}", lora)
        params[name] = worker.lora.adapters[f"{name}-0"].num_params()
        items[name] = [ForwardBackwardInput(f"{name}-0", train)]
        mixed[name] = [
            ForwardBackwardInput(f"{name}-{t}", [row]) for t, row in enumerate(mixed_rows)
        ]
    adam = AdamParams(learning_rate=1e-4)
    best_train = {name: float("inf") for name in VARIANTS}
    best_mixed = {name: float("inf") for name in VARIANTS}
    peak = {name: 0.0 for name in VARIANTS}
    for name in VARIANTS:  # warm-up
        worker.forward_backward(items[name])
        worker.optim_step(f"{name}-0", adam)
        worker.forward_backward(mixed[name])
    for _ in range(cfg.steps):
        for name in VARIANTS:
            with _PeakMemory(cfg.device) as mem:
                _sync(cfg.device)
                t0 = time.perf_counter()
                worker.forward_backward(items[name])
                worker.optim_step(f"{name}-0", adam)
                _sync(cfg.device)
                best_train[name] = min(best_train[name], time.perf_counter() - t0)
            peak[name] = max(peak[name], mem.peak_mb)
            t0 = time.perf_counter()
            worker.forward_backward(mixed[name])
            _sync(cfg.device)
            best_mixed[name] = min(best_mixed[name], time.perf_counter() - t0)
            for t in range(cfg.tenants):
                worker.zero_grad(f"{name}-{t}")
    saved = {name: _saved_bytes(worker, items[name]) for name in VARIANTS}
    train_tokens = cfg.rows * cfg.seq
    mixed_tokens = cfg.tenants * cfg.seq
    results: dict = {
        "bench": "moe",
        "model": f"tiny Qwen3-MoE (hidden {cfg.hidden_size}, 2 layers, "
        f"{cfg.experts} experts top-2)",
        "dtype": choice.dtype,
        "dtype_reason": choice.reason,
        "device": cfg.device,
        "threads": cfg.threads,
        "rank": cfg.rank,
        "train_batch": f"{cfg.rows}x{cfg.seq}",
        "mixed_batch": f"{cfg.tenants} tenants x 1x{cfg.seq}",
    }
    for name in VARIANTS:
        results[name] = {
            "lora_params": params[name],
            "train_tokens_per_s": round(train_tokens / best_train[name], 1),
            "mixed_tokens_per_s": round(mixed_tokens / best_mixed[name], 1),
            "saved_for_backward_mb": round(saved[name] / 2**20, 2),
            "peak_memory_mb": round(peak[name], 2),
        }
    e, a = results["experts"], results["attention_only"]
    results["train_throughput_ratio"] = round(e["train_tokens_per_s"] / a["train_tokens_per_s"], 3)
    results["mixed_throughput_ratio"] = round(e["mixed_tokens_per_s"] / a["mixed_tokens_per_s"], 3)
    for name in VARIANTS:
        r = results[name]
        print(
            f"{name:>15}: {r['lora_params']} LoRA params, train {r['train_tokens_per_s']} tok/s, "
            f"mixed {r['mixed_tokens_per_s']} tok/s, saved-for-backward "
            f"{r['saved_for_backward_mb']} MiB, peak {r['peak_memory_mb']} MiB",
            flush=True,
        )
    return results
