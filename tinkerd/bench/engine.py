"""`tinkerd bench engine`: the engine against the libraries a user would otherwise use.

Three comparisons, each measured side by side in this one run on the same model and data:
  1. LoRA training step (fwd+bwd+AdamW), tinkerd's worker vs a plain `peft` + `torch.optim.AdamW`
     loop (`model(input_ids, labels=...)`, `loss.backward()`, `opt.step()`);
  2. multi-tenant: N adapters x 1 row as one mixed batch vs the same rows as N batches in turn
     (forward_backward; the per-adapter optim_steps, identical on both sides, reported apart);
  3. sampling with the KV cache vs `transformers` `generate`, greedy, same prompts.
The last line printed is one JSON object with every figure.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tinkerd.bench.dtype import choose_dtype
from tinkerd.bench.stats import best_of
from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.model.loading import DTYPES, load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker


@dataclass(frozen=True)
class EngineBenchConfig:
    model: str = EMBEDDED_MODEL
    data_dir: Path = Path(".")
    device: str = "cpu"
    threads: int = 2
    batch: int = 8
    seq_len: int = 256
    rank: int = 32
    steps: int = 3
    tenants: int = 8
    tenant_tokens: int = 128
    sample_prompts: int = 8
    sample_tokens: int = 64
    random_weights: bool = False
    # Storage dtype of the base weights, on both sides; None: what the machine runs fast
    # (bench/dtype.py: bfloat16 on CUDA and on CPUs with native bf16, else float32).
    dtype: str | None = None
    # bf16 autocast of the math on both sides; None: with bfloat16 weights only.
    autocast: bool | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Best-of-`repeats` wall time of `fn` after one warm-up call (seconds), on `device`."""
    return best_of(fn, repeats, sync=lambda: _sync(device))


@contextlib.contextmanager
def bf16_autocast(device: str, enabled: bool = True) -> Iterator[None]:
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled):
        yield


def random_batch(gen: torch.Generator, rows: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length + 1), generator=gen)


def lora_config(rank: int) -> LoraConfig:
    """LoRA on every attention and MLP linear (PEFT's "all-linear"), alpha 32."""
    return LoraConfig(rank=rank, alpha=32, seed=0, train_unembed=False)


def bench_training(cfg: EngineBenchConfig, worker: ModelWorker, seqs: torch.Tensor) -> dict:
    import peft

    adam = AdamParams(learning_rate=1e-5)
    worker.add_adapter("bench", lora_config(cfg.rank))
    item = ForwardBackwardInput(
        "bench",
        [
            Datum(
                s[:-1].tolist(),
                {"target_tokens": s[1:].clone(), "weights": torch.ones(cfg.seq_len)},
            )
            for s in seqs
        ],
    )

    def tinkerd_step() -> None:
        worker.forward_backward([item])
        worker.optim_step("bench", adam)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        worker.base.model.name_or_path, dtype=DTYPES[cfg.dtype]
    )
    hf.to(cfg.device)
    peft_model = peft.get_peft_model(
        hf,
        peft.LoraConfig(r=cfg.rank, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0),
    )
    opt = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95)
    )
    ids = seqs.to(cfg.device)

    def peft_step() -> None:
        with bf16_autocast(cfg.device, enabled=bool(cfg.autocast)):
            loss = peft_model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = cfg.batch * cfg.seq_len
    # Interleave the two so drift in machine load hits both alike.
    t_ours, t_peft = [], []
    for _ in range(max(1, cfg.steps)):
        t_peft.append(timed(peft_step, 1, cfg.device))
        t_ours.append(timed(tinkerd_step, 1, cfg.device))
    worker.remove_adapter("bench")
    ours, theirs = tokens / min(t_ours), tokens / min(t_peft)
    return {
        "tinkerd_tokens_per_s": round(ours, 1),
        "peft_tokens_per_s": round(theirs, 1),
        "ratio_vs_peft": round(ours / theirs, 3),
    }


def bench_multi_tenant(cfg: EngineBenchConfig, worker: ModelWorker) -> dict:
    gen = torch.Generator().manual_seed(1)
    seqs = random_batch(gen, cfg.tenants, cfg.tenant_tokens, worker.info.vocab_size)
    ids = [f"tenant-{i}" for i in range(cfg.tenants)]
    for a in ids:
        worker.add_adapter(a, lora_config(cfg.rank))
    items = [
        ForwardBackwardInput(
            a,
            [
                Datum(
                    s[:-1].tolist(),
                    {"target_tokens": s[1:].clone(), "weights": torch.ones(cfg.tenant_tokens)},
                )
            ],
        )
        for a, s in zip(ids, seqs, strict=True)
    ]
    adam = AdamParams(learning_rate=1e-5)

    def mixed() -> None:
        worker.forward_backward(items)

    def one_by_one() -> None:
        for item in items:
            worker.forward_backward([item])

    def optim_steps() -> None:
        for a in ids:
            worker.optim_step(a, adam)

    t_mixed = timed(mixed, cfg.steps, cfg.device)
    t_serial = timed(one_by_one, cfg.steps, cfg.device)
    # Optimizer steps need fresh gradients, so they are timed together with the passes.
    t_mixed_optim = timed(lambda: (mixed(), optim_steps()), cfg.steps, cfg.device)
    t_serial_optim = timed(lambda: (one_by_one(), optim_steps()), cfg.steps, cfg.device)
    for a in ids:
        worker.remove_adapter(a)
    tokens = cfg.tenants * cfg.tenant_tokens
    return {
        "mixed_batch_tokens_per_s": round(tokens / t_mixed, 1),
        "per_adapter_batches_tokens_per_s": round(tokens / t_serial, 1),
        "mixed_batch_speedup": round(t_serial / t_mixed, 3),
        # The same with every tenant's optim_step added to both sides (they do not batch).
        "mixed_batch_speedup_with_optim": round(t_serial_optim / t_mixed_optim, 3),
    }


# The chat prompts of the sampling benches (bench/sample.py too): they share a system prompt.
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Give me a tip for learning Python.",
    "What is 12 times 7?",
    "Describe a cat to someone who has never seen one.",
]


def bench_sampling(cfg: EngineBenchConfig, worker: ModelWorker) -> dict:
    tok = worker.base.tokenizer
    questions = QUESTIONS
    prompts = []
    for i in range(cfg.sample_prompts):
        msgs = [{"role": "user", "content": questions[i % len(questions)]}]
        text = (
            tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if tok.chat_template
            else msgs[0]["content"]
        )
        prompts.append(tok.encode(text, add_special_tokens=False))
    params = SamplingParams(max_tokens=cfg.sample_tokens, temperature=0.0, stop=())
    inputs = [SampleInput(None, p, params) for p in prompts]

    def ours() -> None:
        out = worker.sample(inputs)
        assert all(len(o.sequences[0].tokens) == cfg.sample_tokens for o in out)

    model = worker.base.model
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), worker.info.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(cfg.device), mask.to(cfg.device)

    def theirs() -> None:
        with torch.no_grad(), worker._autocast():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg.sample_tokens,
                min_new_tokens=cfg.sample_tokens,
                do_sample=False,
                pad_token_id=worker.info.pad_token_id,
            )
        assert out.shape[1] == width + cfg.sample_tokens

    new_tokens = cfg.sample_prompts * cfg.sample_tokens
    t_hf = timed(theirs, 1, cfg.device)
    t_ours = timed(ours, 1, cfg.device)
    return {
        "sample_tokens_per_s": round(new_tokens / t_ours, 1),
        "hf_generate_tokens_per_s": round(new_tokens / t_hf, 1),
        "sample_ratio_vs_hf": round(t_hf / t_ours, 3),
    }


def random_weights_copy(model_dir: Path, target: Path) -> Path:
    """The same architecture with random weights: for machines the real weights can't reach.
    Throughput does not depend on weight values (sampling runs a fixed number of tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


def run(cfg: EngineBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    choice = choose_dtype(cfg.dtype, cfg.device)
    autocast = choice.autocast if cfg.autocast is None else cfg.autocast
    cfg = dataclasses.replace(cfg, dtype=choice.dtype, autocast=autocast)
    print(choice.header(), flush=True)
    model = cfg.model
    if cfg.random_weights:
        model = str(random_weights_copy(Path(cfg.model), cfg.data_dir / "random-weights-model"))
    base = load_base_model(model, data_dir=cfg.data_dir, device=cfg.device, dtype=cfg.dtype)
    worker = ModelWorker(base, autocast_dtype=torch.bfloat16 if autocast else None)
    gen = torch.Generator().manual_seed(0)
    seqs = random_batch(gen, cfg.batch, cfg.seq_len, base.info.vocab_size)
    results: dict = {
        "model": cfg.model,
        "device": cfg.device
        if cfg.device == "cpu"
        else torch.cuda.get_device_name(torch.device(cfg.device)),
        "threads": cfg.threads,
        "dtype": f"{cfg.dtype} weights, {'bf16 autocast' if autocast else 'no autocast'}",
        "dtype_reason": choice.reason,
        "batch": f"{cfg.batch}x{cfg.seq_len}",
        "lora_rank": cfg.rank,
        "weights": "random init (same architecture)" if cfg.random_weights else "real",
    }
    print(f"training step: {cfg.batch}x{cfg.seq_len} tokens, LoRA r{cfg.rank}", flush=True)
    results.update(bench_training(cfg, worker, seqs))
    print(f"  {results}", flush=True)
    print(f"multi-tenant: {cfg.tenants} adapters x 1 x {cfg.tenant_tokens}", flush=True)
    results.update(bench_multi_tenant(cfg, worker))
    print(f"sampling: {cfg.sample_prompts} prompts x {cfg.sample_tokens} tokens", flush=True)
    results.update(bench_sampling(cfg, worker))
    return results
