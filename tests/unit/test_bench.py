"""The engine benchmark runs end to end (tiny sizes on the tiny model) and reports every figure;
the statistics the benchmarks share compute what they say.

This checks the benchmark's code paths, not speed: figures are only recorded from
`tinkerd bench engine` on the real model (BENCHMARKS.md)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tinkerd.bench.engine import EngineBenchConfig, run
from tinkerd.bench.load import http_statuses, rss_figures
from tinkerd.bench.stats import percentile, slope
from tinkerd.model.cpu_features import TEST_SLOWDOWN_ENV, bf16_support

KEYS = (
    "tinkerd_tokens_per_s",
    "peft_tokens_per_s",
    "ratio_vs_peft",
    "mixed_batch_speedup",
    "mixed_batch_speedup_with_optim",
    "sample_tokens_per_s",
    "hf_generate_tokens_per_s",
)


def tiny_config(model_dir: Path, data_dir: Path, dtype: str | None = None) -> EngineBenchConfig:
    return EngineBenchConfig(
        model=str(model_dir),
        data_dir=data_dir,
        batch=2,
        seq_len=16,
        rank=4,
        steps=1,
        tenants=3,
        tenant_tokens=8,
        sample_prompts=2,
        sample_tokens=4,
        dtype=dtype,
    )


@pytest.fixture
def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CPU reported without native bf16 (the documented test hook), on any machine."""
    monkeypatch.setenv(TEST_SLOWDOWN_ENV, "450")
    bf16_support.cache_clear()
    yield
    bf16_support.cache_clear()


def test_engine_bench_reports_all_figures(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run(tiny_config(tiny_model_dir, tmp_path))
    for key in KEYS:
        assert results[key] > 0, key
    # The dtype is this machine's fast one, said first in the output and in the figures.
    expected = "bfloat16" if bf16_support().native else "float32"
    assert results["dtype"].startswith(f"{expected} weights")
    assert capsys.readouterr().out.startswith(f"dtype: {expected} (")
    assert results["dtype_reason"]


def test_engine_bench_picks_float32_without_native_bf16(
    tiny_model_dir: Path,
    tmp_path: Path,
    no_native_bf16: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = run(tiny_config(tiny_model_dir, tmp_path))
    assert results["dtype"] == "float32 weights, no autocast"
    assert "no native bf16" in results["dtype_reason"]
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("dtype: float32 (no native bf16 on this CPU: ")
    assert "450.0x" in first


def test_engine_bench_dtype_override(
    tiny_model_dir: Path, tmp_path: Path, no_native_bf16: None
) -> None:
    """An explicit dtype wins over the machine's choice, with a warning in the figures."""
    results = run(tiny_config(tiny_model_dir, tmp_path, dtype="bfloat16"))
    assert results["dtype"] == "bfloat16 weights, bf16 autocast"
    assert results["dtype_reason"].startswith("--dtype given; WARNING: no native bf16")
    assert results["tinkerd_tokens_per_s"] > 0


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
