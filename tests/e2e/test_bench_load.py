"""`tinkerd bench load` end to end at smoke size: a real server, 4 SDK users for a few seconds.

Checks the benchmark's code paths and its pass/fail verdict, not speed: figures are only
recorded from the full-size command (BENCHMARKS.md, Load)."""

from tinkerd.bench.load import KINDS, LoadBenchConfig, run


def test_load_bench_smoke() -> None:
    results = run(LoadBenchConfig(clients=4, seconds=8, baseline_seconds=2, max_rss_growth_pct=100))
    assert results["failures"] == 0, results["problems"]
    assert results["ok"], results["problems"]
    assert results["server_exit_code"] == 0
    assert set(results["per_type"]) == set(KINDS)
    for kind, row in results["per_type"].items():
        assert row["count"] > 0 and row["failures"] == 0, kind
        assert 0 < row["p50_ms"] <= row["p99_ms"], kind
    for kind in ("forward_backward", "sample", "sample_base"):
        assert results["per_type"][kind]["tokens_per_s"] > 0, kind
    assert set(results["solo_baseline"]) == set(KINDS)
    for key in ("rss_after_warmup_mb", "rss_end_mb", "rss_peak_mb"):
        assert results[key] > 0, key
    assert isinstance(results["rss_slope_mb_per_min"], float)
    # 499: a client gone mid-request (an SDK poller cancelled at shutdown), not an error
    assert set(results["http_statuses"]) <= {"200", "499"}
