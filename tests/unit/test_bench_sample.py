"""`tinkerd bench sample` on the tiny model: it runs every in-process shape and reports every
figure (the numbers themselves are not judged here: no timing assertions in unit tests)."""

from pathlib import Path

from tinkerd.bench.sample import SampleBenchConfig, run

KEYS = [
    "tinkerd_8x1_tok_s",
    "hf_8x1_tok_s",
    "tinkerd_8x8_tok_s",
    "hf_8x8_tok_s",
    "tinkerd_8x1_ttft_s",
    "machine_limit_tok_s",
    "read_bandwidth_gb_s",
    "matmul_peak_gflop_s",
]


def test_sample_bench_reports_all_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    for engine in ("continuous", "eager", "transformers", "static"):
        cfg = SampleBenchConfig(
            model=str(tiny_model_dir),
            data_dir=tmp_path,
            threads=1,
            prompts=3,
            samples=2,
            tokens=4,
            engine=engine,
            server=False,
            dtype="float32",
        )
        results = run(cfg)
        for key in KEYS:
            assert results[key] > 0, (engine, key)
        assert results["engine"] == engine
        assert "tinkerd_concurrent_tok_s" not in results  # (c) off
