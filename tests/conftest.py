"""Shared fixtures: a tiny random-init Llama built in code, and the embedded SmolLM2."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and thread spinning is slow on a busy 2-core
    host (10x slower tests were seen). Restored after each test, whatever it set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (untied embeddings) written once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied input/output embeddings, like SmolLM2."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-tied", tie=True, seed=1)


@pytest.fixture
def tiny_base(tiny_model_dir: Path, tmp_path: Path) -> BaseModel:
    """A fresh fp32 load of the tiny model (each test may wrap it with LoRA)."""
    return load_base_model(str(tiny_model_dir), data_dir=tmp_path)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Where the embedded model is converted once and reused (TINKERD_TEST_DATA_DIR or
    .test-data in the repo), so only the first run pays the conversion."""
    path = Path(os.environ.get("TINKERD_TEST_DATA_DIR", REPO / ".test-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path
