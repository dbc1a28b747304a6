"""A gang replica on Ray (tinkerd/engine/gang.py): 2 CPU ranks with gloo behave as the
in-process worker, and a killed rank loses the whole gang, which comes back and answers.

One local Ray per module, on 127.0.0.2 (a loopback address Ray keeps as is), ended with
`ray.shutdown()`, which ends the processes it started by their ids.
"""

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsdp_scenario
import psutil
import pytest
from unit.numerics import assert_close_scaled

from tinkerd.engine.adapter_files import read_adapter
from tinkerd.engine.local_worker import LocalWorker
from tinkerd.engine.ray_worker import ReplicaSpec
from tinkerd.engine.worker_handle import ReplicaLost, WorkerHandle
from tinkerd.model.loading import load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import (
    ForwardBackwardInput,
    ForwardBackwardOutput,
    SampleInput,
    SamplingParams,
)
from tinkerd.model.worker import ModelWorker

ray = pytest.importorskip("ray")

TERMS = 512  # see test_fsdp_gloo.py
RESTART_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def gang(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tinkerd.engine.gang import GangWorker

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.2",
        include_dashboard=False,
        object_store_memory=200 << 20,
        log_to_driver=False,
    )
    worker = None
    try:
        spec = ReplicaSpec("tiny", str(tiny_model_dir), tmp_path_factory.mktemp("gang-data"))
        worker = GangWorker.create(spec, ranks=2, num_cpus=0.5)
        yield worker
    finally:
        if worker is not None:
            worker.kill()
        ray.shutdown()


def batch(adapter: str) -> list[ForwardBackwardInput]:
    return [
        ForwardBackwardInput(adapter, [fsdp_scenario.datum(n, n) for n in (12, 7, 20)]),
        ForwardBackwardInput(None, [fsdp_scenario.datum(5, 99)], forward_only=True),
    ]


def session(worker: WorkerHandle, save_dir: Path) -> dict[str, Any]:
    worker.add_adapter("a", LoraConfig(rank=4, seed=3))
    first = worker.forward_backward(batch("a"))
    step = worker.optim_step("a", AdamParams(learning_rate=1e-2, eps=1e-4))
    second = worker.forward_backward(batch("a"))
    pending = worker.has_pending_grads("a")
    size = worker.save_adapter("a", save_dir, "tiny", with_optimizer=True)
    worker.snapshot_adapter("a", "a@1")
    prompt = fsdp_scenario.datum(6, 11).tokens
    sampled = worker.sample([SampleInput("a@1", prompt, SamplingParams(max_tokens=5, seed=4))])
    return {
        "outputs": first + second,
        "step": step,
        "pending": pending,
        "bytes": size,
        "tokens": sampled[0].sequences[0].tokens,
    }


def assert_outputs_close(
    actual: list[ForwardBackwardOutput], expected: list[ForwardBackwardOutput]
) -> None:
    for a, e in zip(actual, expected, strict=True):
        for x, y in zip(a.loss_fn_outputs, e.loss_fn_outputs, strict=True):
            assert_close_scaled(x["logprobs"], y["logprobs"], terms=TERMS, msg="logprobs")
        assert a.metrics["loss:sum"] == pytest.approx(e.metrics["loss:sum"], rel=1e-5)


def test_gang_equals_in_process_worker(gang: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    reference = LocalWorker(ModelWorker(load_base_model(str(tiny_model_dir), data_dir=tmp_path)))
    expected = session(reference, tmp_path / "local")
    got = session(gang, tmp_path / "gang")
    assert_outputs_close(got["outputs"], expected["outputs"])
    assert got["step"].step == 1
    assert got["step"].grad_norm == pytest.approx(expected["step"].grad_norm, rel=1e-5)
    assert got["pending"] is expected["pending"] is True
    assert got["bytes"] == expected["bytes"]
    assert got["tokens"] == expected["tokens"]
    # Written by rank 0 into the shared directory: the same adapter and Adam moments.
    saved, want = (read_adapter(tmp_path / d, with_optimizer=True) for d in ("gang", "local"))
    assert saved.weights.keys() == want.weights.keys()
    for name, tensor in want.weights.items():
        # Within a tenth of the one step's size (lr 1e-2): a missed or different step is not.
        assert float((saved.weights[name] - tensor).abs().max()) <= 1e-3, name
    assert saved.optimizer is not None and want.optimizer is not None
    assert saved.optimizer.keys() == want.optimizer.keys()

    # A request's error (raised alike on every rank) is the request's, not a lost gang.
    pids = gang.describe()["pids"]
    with pytest.raises(KeyError, match="missing"):
        gang.forward_backward(batch("missing"))
    assert gang.describe()["pids"] == pids


def test_killed_rank_loses_the_gang_and_a_new_one_answers(gang: Any, tmp_path: Path) -> None:
    described = gang.describe()
    assert described is not None and described["devices"] == "cpu:1"
    assert described["pid"] == described["pids"][0] and len(described["pids"]) == 2
    gang.add_adapter("b", LoraConfig(rank=4, seed=5))
    gang.forward_backward(batch("b"))
    gang.optim_step("b", AdamParams(learning_rate=1e-2))
    gang.write_state("b", tmp_path, "tiny", 2, wait=False)
    before = gang.forward_backward(batch("b"))
    gang.optim_step("b", AdamParams(learning_rate=1e-2))

    os.kill(described["pids"][1], signal.SIGKILL)
    with pytest.raises(ReplicaLost):
        gang.forward_backward(batch("b"))
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while not gang.alive(timeout=5.0):
        assert time.monotonic() < deadline, "the gang did not come back"
    again = gang.describe()
    assert again is not None and not set(again["pids"]) & set(described["pids"])
    for pid in described["pids"]:
        assert _ends(pid, 30.0), f"rank process {pid} outlived its gang"

    # A new gang starts empty; the run comes back from its stored state, as the scheduler
    # restores a lost replica's runs, and the next pass equals the one before the kill.
    assert not gang.has_adapter("b")
    assert gang.read_state("b", tmp_path)
    assert_outputs_close(gang.forward_backward(batch("b")), before)


def _ends(pid: int, timeout: float) -> bool:
    """Whether process `pid` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False
