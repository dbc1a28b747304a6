"""`tinkerd bench scale`: the multi-tenant load against one in-process worker and against Ray
replicas of the same model, side by side in one run.

Each configuration gets its own `tinkerd serve` subprocess (fresh data dir, the same tiny
random-init model unless `--model` names one) and the same load as `tinkerd bench load`: N SDK
clients, each a distinct user, mostly train-heavy (forward_backward + optim_step, snapshots and
samples now and then). Before the load, one client alone runs each request type: the
difference of those solo p50 latencies between a Ray configuration and the in-process one is
the cost of the Ray hop per request (the scheduler's calls to the worker cross a process link;
tensors travel as numpy).

Baseline: the in-process worker (`make serve`'s default). On a machine with fewer cores than
replicas need, Ray replicas cannot be faster (they share the same cores, and each replica holds
its own copy of the base weights): the figures to watch are the overhead and that nothing fails.
The last line printed is one JSON object with every figure.
"""

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tinkerd.bench.dtype import choose_dtype
from tinkerd.bench.load import LoadBenchConfig, Outcome, run_phase, summarize
from tinkerd.bench.server import serve

# Ray's own settings for a local, single-node cluster started by tinkerd (scale-out.md §4).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
}
HOP_KINDS = ("forward_backward", "optim_step", "save_weights_for_sampler", "sample")


@dataclass(frozen=True)
class ScaleBenchConfig:
    model: str | None = None  # None: a tiny random-init Llama built in code
    seconds: float = 60.0
    clients: int = 16
    train_fraction: float = 0.75  # training-heavy, as the load
    replicas: tuple[int, ...] = (2,)  # Ray configurations to run after the in-process one
    threads: int = 1  # torch threads per worker
    dtype: str | None = None
    solo_seconds: float = 10.0  # one client alone before the load (per-request latency)
    seed: int = 0


def _load_config(cfg: ScaleBenchConfig) -> LoadBenchConfig:
    return LoadBenchConfig(
        model=cfg.model,
        seconds=cfg.seconds,
        clients=cfg.clients,
        train_fraction=cfg.train_fraction,
        threads=cfg.threads,
        dtype=cfg.dtype,
        seed=cfg.seed,
    )


def _configuration(
    cfg: ScaleBenchConfig, model: str, work: Path, replicas: int, dtype: str, env: dict[str, str]
) -> dict:
    """One server configuration: solo latencies, then the load; its figures."""
    load = _load_config(cfg)
    extra = [] if replicas == 0 else ["--replicas", f"{model}={replicas}"]
    name = "in-process" if replicas == 0 else f"ray x{replicas}"
    log_path = work / f"server-{replicas}.log"
    started = time.monotonic()
    with serve(
        model,
        work / f"data-{replicas}",
        threads=cfg.threads,
        dtype=dtype,
        log_path=log_path,
        env={**env, **(RAY_ENV if replicas else {})},
        extra_args=extra,
    ) as srv:
        startup_s = time.monotonic() - started
        print(f"{name}: server up in {startup_s:.1f} s", flush=True)
        solo: list[Outcome] = []
        solo_wall = 0.0
        if cfg.solo_seconds > 0:
            rec, solo_wall = run_phase(srv.url, model, load, [True], cfg.solo_seconds)
            solo = rec.outcomes
        rec, wall = run_phase(srv.url, model, load, _roles(cfg), cfg.seconds)
    table = summarize(rec.outcomes, wall)
    solo_table = summarize(solo, solo_wall) if solo else {}
    trained = table.get("forward_backward", {}).get("tokens_per_s") or 0.0
    requests = sum(row["count"] - row["failures"] for row in table.values())
    return {
        "name": name,
        "replicas": replicas,
        "startup_s": round(startup_s, 1),
        "wall_s": round(wall, 1),
        "requests_per_s": round(requests / wall, 2),
        "trained_tokens_per_s": trained,
        "failures": sum(row["failures"] for row in table.values()),
        "per_type": table,
        "solo_p50_ms": {k: row["p50_ms"] for k, row in solo_table.items()},
    }


def _roles(cfg: ScaleBenchConfig) -> list[bool]:
    n_train = round(cfg.clients * cfg.train_fraction)
    return [i < n_train for i in range(cfg.clients)]


def _print_row(r: dict) -> None:
    per = r["per_type"]

    def p(kind: str, key: str) -> str:
        value = per.get(kind, {}).get(key)
        return "-" if value is None else f"{value:g}"

    print(
        f"{r['name']:>12} | {r['requests_per_s']:>7g} req/s | "
        f"{r['trained_tokens_per_s']:>8g} trained tok/s | "
        f"fwd_bwd p50/p99 {p('forward_backward', 'p50_ms')}/{p('forward_backward', 'p99_ms')} ms"
        f" | optim p50/p99 {p('optim_step', 'p50_ms')}/{p('optim_step', 'p99_ms')} ms"
        f" | sample p50/p99 {p('sample', 'p50_ms')}/{p('sample', 'p99_ms')} ms"
        f" | failures {r['failures']}",
        flush=True,
    )


def hop_overhead(baseline: dict, other: dict) -> dict[str, float]:
    """Solo p50 latency added per request type by the configuration (ms)."""
    out = {}
    for kind in HOP_KINDS:
        a, b = baseline["solo_p50_ms"].get(kind), other["solo_p50_ms"].get(kind)
        if a is not None and b is not None:
            out[kind] = round(b - a, 1)
    return out


def run(cfg: ScaleBenchConfig) -> dict:
    from tinkerd.model.tiny import build_tiny_model

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    choice = choose_dtype(cfg.dtype)
    print(choice.header(), flush=True)
    print(
        f"load: {cfg.clients} clients ({sum(_roles(cfg))} train-heavy) for {cfg.seconds:g} s "
        f"per configuration; baseline: the in-process worker",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tinkerd-scale-") as tmp:
        work = Path(tmp)
        model = cfg.model or str(build_tiny_model(work / "tiny-model"))
        rows = [
            _configuration(cfg, model, work, n, choice.dtype, choice.serve_env())
            for n in (0, *cfg.replicas)
        ]
    for r in rows:
        _print_row(r)
    baseline = rows[0]
    for r in rows[1:]:
        r["hop_overhead_ms"] = hop_overhead(baseline, r)
        r["throughput_vs_in_process"] = (
            round(r["requests_per_s"] / baseline["requests_per_s"], 2)
            if baseline["requests_per_s"]
            else None
        )
        print(
            f"{r['name']}: {r['throughput_vs_in_process']}x the in-process throughput; "
            f"Ray hop, solo p50 added per request (ms): {r['hop_overhead_ms']}",
            flush=True,
        )
    return {
        "model": cfg.model or "tiny random-init Llama (built in code)",
        "dtype": choice.dtype,
        "clients": cfg.clients,
        "seconds": cfg.seconds,
        "threads_per_worker": cfg.threads,
        "configurations": rows,
        "ok": all(r["failures"] == 0 for r in rows),
    }
