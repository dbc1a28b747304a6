"""`tinkerd bench sample`: sampling throughput and time to first token, side by side with
`transformers` `generate` and against this machine's own limit, in one run.

Shapes (temperature 1, seeded, `stop=[]` so every sequence has exactly `tokens` new tokens):
  (a) `prompts` chat prompts x 1 sample (tinkerd `ModelWorker.sample` vs `generate`);
  (b) `prompts` prompts x `samples` samples, the GRPO shape (`num_samples` vs `generate`'s
      `num_return_sequences`);
  (c) `concurrent` requests of 1 sample from `clients` SDK clients arriving over time, through
      a real `tinkerd serve` process (no `generate` equivalent).
Time to first token: (a)/(b) the first `on_token` call after `sample` starts (the prefill and
first draw); (c) is not streamed by the Tinker SDK, so its per-request latency is reported.
The machine limit: a decode step must read every weight once (measured read bandwidth) and do
2 x params FLOPs per sequence (measured matmul peak in the model's dtype), so at batch B
tokens/s <= B / max(weight bytes / bandwidth, B x 2 x params / peak).
`--engine eager` runs (a)/(b) on tinkerd's decoder without its fused CPU kernels
(model/kernels), `--engine transformers` on the continuous engine with transformers' forward as
the decode step (what models without tinkerd's own decoder get), `--engine static` on the
previous static-batch sampler (one batch at a time, no prefix cache), for comparison.
Where a vLLM venv is given (`--vllm-python`, default `.vllm-venv` when `make vllm-venv` built
it), (a)/(b) also run on vLLM through tinkerd's runner (engine/vllm_sampler.py), same prompts,
seeds and dtype, in the same run, and so do (c)'s arrivals (requests sent straight to the
runner on the same schedule: no HTTP server in front of vLLM). The last line printed is one
JSON object with every figure.
"""

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tinkerd.bench.dtype import choose_dtype
from tinkerd.bench.engine import QUESTIONS
from tinkerd.bench.server import serve
from tinkerd.bench.stats import percentile
from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.model.loading import load_base_model
from tinkerd.model.types import SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker


@dataclass(frozen=True)
class SampleBenchConfig:
    model: str = EMBEDDED_MODEL
    data_dir: Path = Path(".")
    threads: int = 2
    prompts: int = 8
    samples: int = 8
    tokens: int = 64
    concurrent: int = 64
    clients: int = 8
    arrival_s: float = 2.0  # (c): requests arrive spread over this many seconds
    engine: str = "continuous"  # "eager", "transformers" or "static": others, for (a)/(b)
    server: bool = True  # run (c)
    dtype: str | None = None  # None: what the machine runs fast (bench/dtype.py)
    vllm_python: Path | None = None  # a vLLM venv's python: (a)/(b) on vLLM too


def chat_prompts(tokenizer: object, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            msgs, add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
    return prompts


def machine_limit(worker: ModelWorker, batches: tuple[int, ...]) -> dict:
    """Measured weight-read bandwidth and matmul peak, and the decode tokens/s they allow."""
    model = worker.base.model
    seen: set[int] = set()
    weight_bytes = params = 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() in seen:
            continue  # tied embeddings count once
        seen.add(p.untyped_storage().data_ptr())
        weight_bytes += p.numel() * p.element_size()
        params += p.numel()
    embed = model.get_input_embeddings().weight
    # Per token: every matmul weight once (the input embedding is a lookup, not a matmul,
    # unless tied to the unembedding, which is a matmul).
    tied = embed.untyped_storage().data_ptr() == (
        model.get_output_embeddings().weight.untyped_storage().data_ptr()
    )
    matmul_params = params if tied else params - embed.numel()
    flops_per_token = 2 * matmul_params
    big = torch.empty(max(weight_bytes // 4, 64 << 20), dtype=torch.float32).fill_(1.0)
    read = _best(lambda: big.sum(), 5)
    bandwidth = big.numel() * 4 / read
    dtype = embed.dtype
    a = torch.randn(1024, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    peak = 2 * 1024 * 2048 * 2048 / _best(lambda: a @ b, 5)
    step_read = weight_bytes / bandwidth
    limits = {
        f"machine_limit_b{n}_tok_s": round(n / max(step_read, n * flops_per_token / peak), 1)
        for n in batches
    }
    return {
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "matmul_peak_gflop_s": round(peak / 1e9, 1),
        "gflop_per_token": round(flops_per_token / 1e9, 3),
        **limits,
    }


def _best(fn: object, repeats: int) -> float:
    fn()  # type: ignore[operator]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def run_tinkerd(worker: ModelWorker, prompts: list[list[int]], samples: int, tokens: int) -> dict:
    """One timed `ModelWorker.sample` (after a warm-up): tokens/s and time to first token."""
    params = SamplingParams(max_tokens=tokens, temperature=1.0, stop=(), seed=0)
    first: list[float] = []

    def mark(_sample: int, _choice: object) -> None:
        if not first:
            first.append(time.perf_counter())

    inputs = [SampleInput(None, p, params, num_samples=samples, on_token=mark) for p in prompts]
    worker.sample(inputs[:2])
    first.clear()
    t0 = time.perf_counter()
    outs = worker.sample(inputs)
    elapsed = time.perf_counter() - t0
    made = sum(len(s.tokens) for o in outs for s in o.sequences)
    assert made == len(prompts) * samples * tokens
    return {"tok_s": round(made / elapsed, 1), "ttft_s": round(first[0] - t0, 3)}


def run_generate(worker: ModelWorker, prompts: list[list[int]], samples: int, tokens: int) -> dict:
    """The same with `transformers` `generate` on a left-padded batch."""
    model = worker.base.model
    width = max(len(p) for p in prompts)
    pad = worker.info.pad_token_id
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def generate(n: int) -> torch.Tensor:
        with torch.no_grad(), worker._autocast():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                pad_token_id=pad,
            )

    generate(2)
    t0 = time.perf_counter()
    generate(1)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(tokens)
    elapsed = time.perf_counter() - t0
    assert out.shape == (len(prompts) * samples, width + tokens)
    return {"tok_s": round(len(prompts) * samples * tokens / elapsed, 1), "ttft_s": round(ttft, 3)}


def run_vllm(
    cfg: SampleBenchConfig, model_dir: Path, dtype: str, prompts: list[list[int]], info: object
) -> dict:
    """(a), (b) and (c)'s arrivals on vLLM (its own process, tinkerd's runner): tokens/s of one
    timed call per shape after a warm-up, and of the `concurrent` requests sent one by one on
    (c)'s schedule straight to the runner (no HTTP server in front, unlike tinkerd's (c)).
    vLLM returns whole results only, so no time to first token."""
    from tinkerd.engine.vllm_sampler import VllmConfig, VllmSampler

    assert cfg.vllm_python is not None
    sampler = VllmSampler(VllmConfig(cfg.vllm_python, model_dir, dtype=dtype), info)  # type: ignore[arg-type]
    results: dict = {"vllm_version": sampler.process.version}
    try:
        params = SamplingParams(max_tokens=cfg.tokens, temperature=1.0, stop=(), seed=0)
        for name, samples in (("8x1", 1), ("8x8", cfg.samples)):
            inputs = [SampleInput(None, p, params, num_samples=samples) for p in prompts]
            sampler.sample(inputs[:2], {})
            t0 = time.perf_counter()
            outs = sampler.sample(inputs, {})
            elapsed = time.perf_counter() - t0
            made = sum(len(s.tokens) for o in outs for s in o.sequences)
            assert made == len(prompts) * samples * cfg.tokens
            results[f"vllm_{name}_tok_s"] = round(made / elapsed, 1)
            print(f"  vllm ({name}) {results[f'vllm_{name}_tok_s']} tok/s", flush=True)
        if cfg.server:

            def send(_client: int, prompt: list[int]) -> Callable[[], int]:
                answered = threading.Event()
                out: list[object] = []

                def done(result: object) -> None:
                    out.append(result)
                    answered.set()

                sampler.submit(SampleInput(None, prompt, params), {}, done)

                def tokens() -> int:
                    answered.wait()
                    if isinstance(out[0], Exception):
                        raise out[0]
                    return len(out[0].sequences[0].tokens)  # type: ignore[attr-defined]

                return tokens

            elapsed, _ = arrive(cfg, prompts, send)
            results["vllm_concurrent_tok_s"] = round(cfg.concurrent * cfg.tokens / elapsed, 1)
            print(f"  vllm (c) {results['vllm_concurrent_tok_s']} tok/s", flush=True)
    finally:
        sampler.close()
    return results


def arrive(
    cfg: SampleBenchConfig,
    prompts: list[list[int]],
    send: Callable[[int, list[int]], Callable[[], int]],
) -> tuple[float, list[float]]:
    """(c)'s arrivals: `clients` threads each send `concurrent // clients` requests spread
    over `arrival_s`; `send(client, prompt)` starts one and returns a call that waits for it
    and gives its token count. Returns the seconds from the first send to the last answer and
    each request's latency."""
    per_client = cfg.concurrent // cfg.clients
    gap = cfg.arrival_s / max(1, per_client)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        waits = []
        for i in range(per_client):
            sent = time.perf_counter()
            waits.append((sent, send(c, prompts[(c + i) % len(prompts)])))
            time.sleep(gap)
        for sent, wait in waits:
            assert wait() == cfg.tokens
            with lock:
                latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(cfg.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(latencies) == per_client * cfg.clients, "a client thread failed"
    return time.perf_counter() - t0, latencies


def run_concurrent(
    cfg: SampleBenchConfig, prompts: list[list[int]], dtype: str, env: dict[str, str]
) -> dict:
    """(c): `clients` SDK clients, each with its own sampling client, send `concurrent`
    requests between them, spread over `arrival_s`, to one `tinkerd serve`."""
    import tinker
    from tinker import types

    with serve(cfg.model, cfg.data_dir, threads=cfg.threads, dtype=dtype, env=env) as srv:
        services = [
            tinker.ServiceClient(base_url=srv.url, api_key="tml-bench") for _ in range(cfg.clients)
        ]
        samplers = [s.create_sampling_client(base_model=cfg.model).result() for s in services]
        params = types.SamplingParams(max_tokens=cfg.tokens, temperature=1.0, stop=[], seed=1)
        warm = samplers[0].sample(types.ModelInput.from_ints(prompts[0]), 1, params)
        warm.result()

        def send(client: int, prompt: list[int]) -> Callable[[], int]:
            future = samplers[client].sample(types.ModelInput.from_ints(prompt), 1, params)
            return lambda: len(future.result().sequences[0].tokens)

        elapsed, latencies = arrive(cfg, prompts, send)
    made = len(latencies) * cfg.tokens
    return {
        "tinkerd_concurrent_tok_s": round(made / elapsed, 1),
        "concurrent_latency_p50_s": round(statistics.median(latencies), 2),
        "concurrent_latency_p99_s": round(percentile(latencies, 0.99), 2),
    }


def run(cfg: SampleBenchConfig) -> dict:
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    choice = choose_dtype(cfg.dtype)
    cfg = dataclasses.replace(cfg, dtype=choice.dtype)
    print(choice.header(), flush=True)
    base = load_base_model(cfg.model, data_dir=cfg.data_dir, dtype=choice.dtype)
    static = cfg.engine == "static"
    worker = ModelWorker(
        base,
        autocast_dtype=torch.bfloat16 if choice.dtype == "bfloat16" else None,
        prefix_cache_bytes=0 if static else 512 << 20,
        continuous_sampling=not static,
        own_decoder=cfg.engine in ("continuous", "eager"),
        decode_kernels=cfg.engine == "continuous",
    )
    prompts = chat_prompts(base.tokenizer, cfg.prompts)
    results: dict = {
        "model": cfg.model,
        "threads": cfg.threads,
        "dtype": choice.dtype,
        "engine": cfg.engine,
        "tokens": cfg.tokens,
    }
    limit = machine_limit(worker, (cfg.prompts, cfg.prompts * cfg.samples, cfg.concurrent))
    results.update(limit)
    results["machine_limit_tok_s"] = limit[f"machine_limit_b{cfg.prompts * cfg.samples}_tok_s"]
    print(f"  machine: {limit}", flush=True)
    for name, samples in (("8x1", 1), ("8x8", cfg.samples)):
        print(f"({name}) {cfg.prompts} prompts x {samples} samples x {cfg.tokens}", flush=True)
        ours = run_tinkerd(worker, prompts, samples, cfg.tokens)
        theirs = run_generate(worker, prompts, samples, cfg.tokens)
        results[f"tinkerd_{name}_tok_s"] = ours["tok_s"]
        results[f"tinkerd_{name}_ttft_s"] = ours["ttft_s"]
        results[f"hf_{name}_tok_s"] = theirs["tok_s"]
        results[f"hf_{name}_ttft_s"] = theirs["ttft_s"]
        print(f"  tinkerd {ours}  generate {theirs}", flush=True)
    results["ratio_8x1_vs_hf"] = round(results["tinkerd_8x1_tok_s"] / results["hf_8x1_tok_s"], 3)
    results["share_8x8_of_limit"] = round(
        results["tinkerd_8x8_tok_s"] / results["machine_limit_tok_s"], 3
    )
    if cfg.vllm_python is not None:
        shapes = "(a), (b) and (c)'s arrivals" if cfg.server else "(a) and (b)"
        print(f"vLLM ({cfg.vllm_python}): {shapes}", flush=True)
        model_dir = Path(base.model.name_or_path)
        results.update(run_vllm(cfg, model_dir, choice.dtype, prompts, base.info))
    if cfg.server:
        print(f"(c) {cfg.concurrent} requests from {cfg.clients} SDK clients", flush=True)
        env = choice.serve_env()
        if cfg.engine == "eager":  # (c) without the kernels too
            env["TINKERD_DECODE_KERNELS"] = "false"
        results.update(run_concurrent(cfg, prompts, choice.dtype, env))
        limit_c = results[f"machine_limit_b{cfg.concurrent}_tok_s"]
        results["share_concurrent_of_limit"] = round(
            results["tinkerd_concurrent_tok_s"] / limit_c, 3
        )
    for name in ("8x1", "8x8", "concurrent"):
        if f"vllm_{name}_tok_s" in results and f"tinkerd_{name}_tok_s" in results:
            results[f"ratio_{name}_vs_vllm"] = round(
                results[f"tinkerd_{name}_tok_s"] / results[f"vllm_{name}_tok_s"], 3
            )
    return results
