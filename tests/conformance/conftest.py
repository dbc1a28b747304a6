"""Cookbook conformance: unmodified `tinker-cookbook` recipes run against a live `tinkerd serve`.

One server per session serves the embedded SmolLM2-135M-Instruct. Its data dir is fresh (its own
database and checkpoints) but its `models/` links to the shared test data dir (`data_dir` in
tests/conftest.py), so the GGUF conversion happens once and is reused across runs.

Recipes run as subprocesses (`python -m tinker_cookbook.recipes...`) with chz arguments, exactly
as a user would run them. They load the tokenizer by the model's hub name from an HF cache that
`tinkerd tokenizer-cache` seeds in a temp dir, with HF_HUB_OFFLINE=1 (no hub access needed).

SmolLM2's chat template is plain ChatML (`<|im_start|>role\\n...<|im_end|>\\n`, no think tags),
which the cookbook's `qwen3_instruct` renderer reproduces token for token (stop: `<|im_end|>`).
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# e2e_helpers (run_server: start, wait for /healthz, SIGTERM, check the clean exit).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook not installed (make install)")

from cookbook_helpers import MODEL, TINKERD, Recipes
from e2e_helpers import Server, run_server


@pytest.fixture(scope="session")
def hf_cache(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF hub cache holding only SmolLM2's tokenizer (converts the model first if needed)."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    launcher = [str(TINKERD)] if TINKERD.exists() else [sys.executable, "-m", "tinkerd.cli"]
    cmd = [*launcher, "tokenizer-cache", "--model", MODEL, "--data-dir", str(data_dir)]
    subprocess.run([*cmd, "--cache-dir", str(hub)], check=True, capture_output=True, timeout=900)
    return hub


@pytest.fixture(scope="session")
def smol_server(
    data_dir: Path, hf_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("cookbook-server")
    (workdir / "data").mkdir()
    # hf_cache has converted the embedded model into data_dir/models; share it.
    (workdir / "data" / "models").symlink_to((data_dir / "models").resolve())
    threads = str(min(2, os.cpu_count() or 1))
    with run_server(Path(MODEL), workdir, TINKERD_THREADS=threads) as server:
        yield server


@pytest.fixture(scope="session")
def recipes(smol_server: Server, hf_cache: Path) -> Recipes:
    return Recipes(smol_server, hf_cache)
