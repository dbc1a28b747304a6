"""The replica router (engine/replicas.py) over in-process replicas: where runs and samples go.

Two `ModelScheduler`s, each with its own load of the tiny model, stand for two replicas; no Ray
is needed for placement and routing (worker loss is covered by tests/ray, on real Ray actors).
"""

import time
from pathlib import Path

import pytest
from test_run_state import ADAM, DATA, losses
from test_scheduler import Recorder, fb

from tinkerd.engine.ops import CreateAdapter, OptimStep, Sample, SnapshotAdapter
from tinkerd.engine.replicas import ReplicaRouter
from tinkerd.engine.run_state import RunStates
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model.loading import load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.types import SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker


def replica(model_dir: Path, root: Path) -> ModelScheduler:
    base = load_base_model(str(model_dir), data_dir=root)
    return ModelScheduler(ModelWorker(base), run_states=RunStates(root / "runs"), state_every=1)


@pytest.fixture
def router(tiny_model_dir: Path, tmp_path: Path):
    r = ReplicaRouter([replica(tiny_model_dir, tmp_path) for _ in range(2)], max_runs=1)
    r.start()
    yield r
    r.stop()


def train(router, rec: Recorder, run: str, first_seq: int, n: int) -> None:
    for i in range(n):
        seq = first_seq + 2 * i
        router.submit(rec.op(f"{run}-fb{seq}", fb(run, DATA), run, seq))
        router.submit(rec.op(f"{run}-opt{seq + 1}", OptimStep(ADAM), run, seq + 1))
    rec.wait(len(rec.results) + 2 * n)


def create(router, rec: Recorder, run: str) -> None:
    router.submit(rec.op(f"{run}-create", CreateAdapter(LoraConfig(rank=4, seed=7)), run, 0))
    rec.wait(len(rec.results) + 1)


def released(router: ReplicaRouter, run: str) -> None:
    router.release([run])
    deadline = time.monotonic() + 30
    while router.placement(run) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert router.placement(run) is None


def test_runs_fill_then_spread_and_a_released_run_moves_exactly(
    router: ReplicaRouter, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rec = Recorder()
    create(router, rec, "a")
    create(router, rec, "b")
    assert (router.placement("a"), router.placement("b")) == (0, 1)  # one run per replica
    train(router, rec, "a", 1, 2)
    released(router, "a")
    create(router, rec, "c")
    assert router.placement("c") == 0  # the room "a" left
    released(router, "b")
    train(router, rec, "a", 5, 2)  # "a" comes back from its stored state, on replica 1
    assert router.placement("a") == 1
    assert sorted(router.loaded_runs()) == ["a", "c"]
    assert [r["runs"] for r in router.listing()] == [1, 1]
    assert router.wait_applied("a", 8, 0)

    # The same steps on one scheduler where "a" never moved.
    alone = replica(tiny_model_dir, tmp_path / "alone")
    alone.start()
    ref = Recorder()
    alone.submit(ref.op("a-create", CreateAdapter(LoraConfig(rank=4, seed=7)), "a", 0))
    ref.wait(1)
    train(alone, ref, "a", 1, 4)
    alone.stop()
    assert losses(rec, "a") == pytest.approx(losses(ref, "a"), rel=1e-6)


def test_a_sample_goes_to_the_replica_holding_its_snapshot(router: ReplicaRouter) -> None:
    rec = Recorder()
    create(router, rec, "a")
    create(router, rec, "b")
    train(router, rec, "b", 1, 1)
    router.submit(rec.op("snap", SnapshotAdapter("b-snap"), "b", 3))
    rec.wait(len(rec.results) + 1)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    for i in range(4):  # an ephemeral snapshot exists only where it was taken
        router.submit(rec.op(f"sample{i}", Sample(SampleInput("b-snap", [1, 2, 3], params))))
    rec.wait(len(rec.results) + 4)
    outs = [rec.results[f"sample{i}"] for i in range(4)]
    assert not any(isinstance(o, Exception) for o in outs), outs
    assert len({tuple(o.sequences[0].tokens) for o in outs}) == 1  # greedy: all alike
    assert router.replicas[1].handle.has_adapter("b-snap")
    assert not router.replicas[0].handle.has_adapter("b-snap")
