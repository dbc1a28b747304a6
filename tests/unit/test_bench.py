"""The engine benchmark runs end to end (tiny sizes on the tiny model) and reports every figure.

This checks the benchmark's code paths, not speed: figures are only recorded from
`tinkerd bench engine` on the real model (BENCHMARKS.md)."""

from pathlib import Path

from tinkerd.bench.engine import EngineBenchConfig, run

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
