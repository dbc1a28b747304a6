"""End-to-end fixtures: a real `tinkerd serve` process driven by the official `tinker` SDK.

Each server is a subprocess on a free loopback port with its own data dir, serving the tiny
model built once per session (`tiny_model_dir` from tests/conftest.py). Teardown sends SIGTERM
and requires a clean exit within 20 s (see `e2e_helpers.run_server`): clean shutdown is part
of the contract.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ["TINKER_TELEMETRY"] = "0"

import tinker  # imported after TINKER_TELEMETRY is set
from e2e_helpers import Server, run_server


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared default server (no chunking override)."""
    with run_server(tiny_model_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def clients(server: Server) -> Iterator[Callable[[str], tinker.ServiceClient]]:
    """`clients(api_key)` → a ServiceClient of that user; all are closed at the end."""
    made: list[tinker.ServiceClient] = []

    def make(api_key: str = "tml-e2e") -> tinker.ServiceClient:
        sc = server.client(api_key)
        made.append(sc)
        return sc

    yield make
    for sc in made:
        # A client that never opened a session has nothing to finish.
        with contextlib.suppress(Exception):
            sc.close("success").result(timeout=10)


@pytest.fixture(scope="session")
def service_client(clients: Callable[[str], tinker.ServiceClient]) -> tinker.ServiceClient:
    return clients("tml-e2e")


@pytest.fixture(scope="session")
def tokenizer(service_client: tinker.ServiceClient, server: Server):
    tc = service_client.create_lora_training_client(base_model=server.model, rank=4).result()
    return tc.get_tokenizer()
