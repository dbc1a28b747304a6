"""A request line that outlives `request_timeout` is aborted in the real vLLM runner: its
caller gets the timeout error, the runner takes its request out of the engine (and logs so),
and later lines are still answered. Needs the vLLM venv; slow (the engine starts in about a
minute)."""

import time
from pathlib import Path

import pytest
from vllm_env import NEEDS_VLLM, VLLM_PYTHON

from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.engine.vllm_sampler import VllmConfig, VllmError, VllmProcess
from tinkerd.model.loading import resolve_model_path

pytestmark = NEEDS_VLLM


def request(max_tokens: int) -> dict[str, object]:
    return {
        "prompt": [1, 2, 3, 4],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": 0,
        "stop_token_ids": [],
        "stop": [],
        "prompt_logprobs": False,
        "lora": None,
    }


def test_timed_out_line_is_aborted(data_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    config = VllmConfig(
        python=VLLM_PYTHON,
        model_dir=Path(resolve_model_path(EMBEDDED_MODEL, data_dir)),
        max_model_len=4096,
        request_timeout=3.0,
        log_path=log,
    )
    process = VllmProcess(config)
    try:
        # 3000 tokens take far longer than 3 s on any device for one sequence of this model
        # (tens of seconds on a CPU, ~15 s on a GPU at ~5 ms a step).
        with pytest.raises(VllmError, match="request timeout"):
            process.generate([request(3000)])
        deadline = time.monotonic() + 30
        while "aborted request line 1 (1 requests)" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the runner did not abort the timed-out line"
            time.sleep(0.1)
        (out,) = process.generate([request(4)])  # well within 3 s once the engine is free
        assert len(out["tokens"]) == 4
    finally:
        process.close(timeout=30)
    assert process.proc.poll() is not None
