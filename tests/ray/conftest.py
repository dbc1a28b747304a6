"""Fixtures of the Ray replica tests: one loopback Ray cluster per test module (a local Ray
starts in ~10 s), ended by process id. Skipped without Ray (`pip install tinkerd[ray]`; the dev
install has it)."""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]
sys.path.insert(0, str(TESTS / "e2e"))  # e2e_helpers: servers, SDK data
sys.path.insert(0, str(TESTS / "unit"))  # numerics: float32 tolerances

if importlib.util.find_spec("ray") is None:
    collect_ignore_glob = ["test_*.py"]

from ray_helpers import RayNode, start_node  # noqa: E402


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNode]:
    """A one-node cluster on 127.0.0.2 with room for 2 replicas of one CPU each."""
    node = start_node("127.0.0.2", tmp_path_factory.mktemp("ray"), num_cpus=2)
    try:
        yield node
    finally:
        node.stop()
