"""Run state on disk: written after creation and every `state_every` optim steps, and before
an idle run leaves memory; a run not in memory comes back from it exactly."""

import time
from pathlib import Path

import pytest
import torch
from test_scheduler import Recorder, datum, fb

from tinkerd.engine.ops import CreateAdapter, OptimStep, Sample, SnapshotAdapter
from tinkerd.engine.run_state import RunStates
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

DATA = [datum(list(range(10, 30))), datum(list(range(40, 52)))]
ADAM = AdamParams(learning_rate=0.05)


def steps(scheduler: ModelScheduler, rec: Recorder, run: str, first_seq: int, n: int) -> None:
    """n forward_backward + optim_step pairs from `first_seq` on; waits for them."""
    for i in range(n):
        seq = first_seq + 2 * i
        scheduler.submit(rec.op(f"{run}-fb{seq}", fb(run, DATA), run, seq))
        scheduler.submit(rec.op(f"{run}-opt{seq + 1}", OptimStep(ADAM), run, seq + 1))
    rec.wait(len(rec.results) + 2 * n)


def losses(rec: Recorder, run: str) -> list[float]:
    return [r.metrics["loss:sum"] for k, r in rec.results.items() if k.startswith(f"{run}-fb")]


def make(tiny_base: BaseModel, root: Path, **kw: int) -> ModelScheduler:
    scheduler = ModelScheduler(ModelWorker(tiny_base), run_states=RunStates(root), **kw)
    scheduler.start()
    return scheduler


def test_state_is_written_after_creation_and_every_n_steps(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    scheduler = make(tiny_base, tmp_path, state_every=2)
    rec = Recorder()
    scheduler.submit(rec.op("c", CreateAdapter(LoraConfig(rank=4, seed=1)), "r", 0))
    rec.wait(1)
    assert scheduler.state_seq_id("r") == 0  # written before the create completes
    steps(scheduler, rec, "r", 1, 3)  # optim steps at seq 2, 4, 6
    scheduler.stop()  # flushes the writer
    assert scheduler.state_seq_id("r") == 4  # after the 2nd optim step; the 3rd is in the log
    state = RunStates(tmp_path).read("r")
    assert state is not None and state.optimizer  # Adam moments are part of it


def test_released_run_comes_back_exactly(
    tiny_base: BaseModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Train 2 steps, release (state written, adapter dropped), train 2 more: the same losses
    and weights as a run that stayed in memory."""
    results = {}
    for name, base in (
        ("stayed", tiny_base),
        ("moved", load_base_model(str(tiny_model_dir), data_dir=tmp_path)),
    ):
        scheduler = make(base, tmp_path / name, state_every=100)
        rec = Recorder()
        scheduler.submit(rec.op("c", CreateAdapter(LoraConfig(rank=4, seed=1)), "r", 0))
        rec.wait(1)
        steps(scheduler, rec, "r", 1, 2)
        if name == "moved":
            scheduler.release(["r"])
            deadline = time.monotonic() + 30
            while scheduler.loaded_runs() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert scheduler.loaded_runs() == []
            assert scheduler.state_seq_id("r") == 4
        steps(scheduler, rec, "r", 5, 2)
        scheduler.stop()
        results[name] = (
            losses(rec, "r"),
            scheduler.worker.export_adapter("r", with_optimizer=True),
        )
    (want_losses, want), (got_losses, got) = results["stayed"], results["moved"]
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    for key, value in want.weights.items():
        torch.testing.assert_close(got.weights[key], value, rtol=0, atol=0)


def test_a_run_with_unapplied_gradients_stays(tiny_base: BaseModel, tmp_path: Path) -> None:
    """The state on disk holds no gradients: a run between forward_backward and optim_step
    is not released."""
    scheduler = make(tiny_base, tmp_path)
    rec = Recorder()
    scheduler.submit(rec.op("c", CreateAdapter(LoraConfig(rank=4, seed=1)), "r", 0))
    scheduler.submit(rec.op("fb", fb("r", DATA), "r", 1))
    rec.wait(2)
    scheduler.release(["r"])
    deadline = time.monotonic() + 10
    while scheduler._release and time.monotonic() < deadline:  # the request is handled
        time.sleep(0.02)
    assert scheduler.loaded_runs() == ["r"]
    scheduler.submit(rec.op("opt", OptimStep(ADAM), "r", 2))
    rec.wait(3)
    scheduler.release(["r"])  # now it can go
    deadline = time.monotonic() + 10
    while scheduler.loaded_runs() and time.monotonic() < deadline:
        time.sleep(0.02)
    scheduler.stop()
    assert scheduler.loaded_runs() == []


def test_sampler_snapshots_are_bounded_by_memory(tiny_base: BaseModel, tmp_path: Path) -> None:
    worker = ModelWorker(tiny_base)
    scheduler = ModelScheduler(worker, run_states=RunStates(tmp_path))
    scheduler.start()
    rec = Recorder()
    scheduler.submit(rec.op("c", CreateAdapter(LoraConfig(rank=4, seed=1)), "r", 0))
    rec.wait(1)
    scheduler.snapshot_memory_bytes = int(2.5 * worker.adapter_bytes("r"))
    for i in range(3):
        scheduler.submit(rec.op(f"s{i}", SnapshotAdapter(f"snap{i}"), "r", i + 1))
    rec.wait(4)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    for i in range(3):
        scheduler.submit(rec.op(f"sample{i}", Sample(SampleInput(f"snap{i}", [1, 2], params))))
    rec.wait(7)
    scheduler.stop()
    assert not worker.has_adapter("snap0")
    assert "no longer available" in str(rec.results["sample0"])
    assert not isinstance(rec.results["sample2"], Exception)
