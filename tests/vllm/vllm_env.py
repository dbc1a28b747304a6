"""Where the vLLM tests find the vLLM venv (`make vllm-venv`, or TINKERD_VLLM_PYTHON), and the
marks every one of them carries: slow (the engine starts in about a minute), the embedded
model, and a skip where no venv is found."""

import os
from pathlib import Path

import pytest

from tinkerd.engine.vllm_sampler import default_python

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("TINKERD_VLLM_PYTHON") or default_python(REPO) or "")

NEEDS_VLLM = [
    pytest.mark.slow,
    pytest.mark.embedded,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(),
        reason="no vLLM venv: run `make vllm-venv` or set TINKERD_VLLM_PYTHON",
    ),
]
