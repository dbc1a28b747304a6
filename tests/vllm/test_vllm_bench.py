"""`tinkerd bench sample` with vLLM in the same run: every shape on both engines, (c)'s
arrivals included (tinkerd through a live server, vLLM through its runner), with every figure
and ratio reported. Needs the vLLM venv (`make vllm-venv` or TINKERD_VLLM_PYTHON); slow."""

from pathlib import Path

from vllm_env import NEEDS_VLLM, VLLM_PYTHON

from tinkerd.bench.sample import SampleBenchConfig, run
from tinkerd.constants import EMBEDDED_MODEL

pytestmark = NEEDS_VLLM


def test_bench_runs_every_shape_on_both_engines(data_dir: Path) -> None:
    cfg = SampleBenchConfig(
        model=EMBEDDED_MODEL,
        data_dir=data_dir,
        prompts=2,
        samples=2,
        tokens=4,
        concurrent=4,
        clients=2,
        arrival_s=0.2,
        dtype="float32",
        vllm_python=VLLM_PYTHON,
    )
    results = run(cfg)
    for name in ("8x1", "8x8", "concurrent"):
        assert results[f"tinkerd_{name}_tok_s"] > 0, name
        assert results[f"vllm_{name}_tok_s"] > 0, name
        assert results[f"ratio_{name}_vs_vllm"] > 0, name
    assert results["concurrent_latency_p50_s"] > 0
    assert results["share_concurrent_of_limit"] > 0
