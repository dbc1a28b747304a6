"""The engine benchmark runs end to end (tiny sizes on the tiny model) and reports every figure;
the statistics the benchmarks share compute what they say.

This checks the benchmark's code paths, not speed: figures are only recorded from
`tinkerd bench engine` on the real model (BENCHMARKS.md)."""

from pathlib import Path

from tinkerd.bench.engine import EngineBenchConfig, run
from tinkerd.bench.load import http_statuses, rss_figures
from tinkerd.bench.stats import percentile, slope

KEYS = (
    "tinkerd_tokens_per_s",
    "peft_tokens_per_s",
    "ratio_vs_peft",
    "mixed_batch_speedup",
    "mixed_batch_speedup_with_optim",
    "sample_tokens_per_s",
    "hf_generate_tokens_per_s",
)


def test_engine_bench_reports_all_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = EngineBenchConfig(
        model=str(tiny_model_dir),
        data_dir=tmp_path,
        batch=2,
        seq_len=16,
        rank=4,
        steps=1,
        tenants=3,
        tenant_tokens=8,
        sample_prompts=2,
        sample_tokens=4,
    )
    results = run(cfg)
    for key in KEYS:
        assert results[key] > 0, key


def test_percentile_and_slope() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == 2.0
    assert slope([(1.0, 4.0)]) == 0.0


def test_load_rss_figures_judge_after_warmup() -> None:
    # Growth during warm-up (t < 10) is not counted; after it, 2 MB per 60 s.
    samples = [(float(t), 100.0 + (t if t < 10 else 10 + (t - 10) / 30)) for t in range(70)]
    rss = rss_figures(samples, warmup_s=10)
    assert rss["rss_after_warmup_mb"] == 110.1
    assert rss["rss_end_mb"] == 111.9
    assert rss["rss_slope_mb_per_min"] == 2.0
    assert rss["rss_peak_mb"] == 112.0
    assert rss["rss_mb_every_10s"] == [100.0, 110.0, 110.3, 110.7, 111.0, 111.3, 111.7]


def test_load_http_statuses_from_access_log() -> None:
    log = (
        'INFO:     127.0.0.1:5000 - "POST /api/v1/forward_backward HTTP/1.1" 200 OK\n'
        "2026-01-01 INFO tinkerd: something else 500\n"
        'INFO:     127.0.0.1:5001 - "POST /api/v1/retrieve_future HTTP/1.1" 408 Request Timeout\n'
        'INFO:     127.0.0.1:5001 - "GET /api/v1/healthz HTTP/1.1" 200 OK\n'
    )
    assert http_statuses(log) == {"200": 2, "408": 1}
