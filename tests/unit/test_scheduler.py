"""The scheduler on a real worker (tiny model): seq_id order, dedupe, batching, micro-batches."""

import threading
from pathlib import Path

import torch

from tinkerd.engine.ops import CreateAdapter, ForwardBackward, Op, OptimStep, Sample
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model.loading import BaseModel
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker


class Recorder:
    """Collects results and execution order of ops; waits for a number of them."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}
        self.order: list[str] = []
        self._cv = threading.Condition()

    def op(self, request_id: str, action: object, model_id: str | None = None, seq=None) -> Op:
        def done(result: object) -> None:
            with self._cv:
                self.results[request_id] = result
                self.order.append(request_id)
                self._cv.notify_all()

        def failed(exc: Exception) -> None:
            done(exc)

        return Op(request_id, action, done, failed, model_id=model_id, seq_id=seq)

    def wait(self, n: int, timeout: float = 60) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.results) >= n, timeout), self.results


def datum(tokens: list[int]) -> Datum:
    return Datum(
        tokens[:-1],
        {"target_tokens": torch.tensor(tokens[1:]), "weights": torch.ones(len(tokens) - 1)},
    )


def fb(adapter: str, data: list[Datum]) -> ForwardBackward:
    return ForwardBackward(ForwardBackwardInput(adapter, data))


def make(tiny_base: BaseModel, budget: int = 8192) -> tuple[ModelScheduler, ModelWorker]:
    worker = ModelWorker(tiny_base)
    scheduler = ModelScheduler(worker, token_budget=budget)
    scheduler.start()
    return scheduler, worker


def test_ops_run_in_seq_order_and_duplicates_are_ignored(tiny_base: BaseModel) -> None:
    scheduler, _ = make(tiny_base)
    rec = Recorder()
    data = [datum(list(range(10, 30)))]
    # seq 2 and 3 arrive before 1 (as the SDK sends chunks), then 1; 2 is sent twice.
    scheduler.submit(rec.op("create", CreateAdapter(LoraConfig(rank=4, seed=0)), "r", 0))
    scheduler.submit(rec.op("fb2", fb("r", data), "r", 2))
    scheduler.submit(rec.op("opt3", OptimStep(AdamParams(learning_rate=0.1)), "r", 3))
    scheduler.submit(rec.op("fb2-again", fb("r", data), "r", 2))
    rec.wait(1)
    assert rec.order == ["create"]  # 2 and 3 wait for 1
    scheduler.submit(rec.op("fb1", fb("r", data), "r", 1))
    rec.wait(4)
    scheduler.stop()
    assert rec.order == ["create", "fb1", "fb2", "opt3"]
    assert "fb2-again" not in rec.results
    # fb1 and fb2 saw the same weights (the step came after both): same loss.
    assert rec.results["fb1"].metrics == rec.results["fb2"].metrics


def test_runs_share_one_pass_and_budget_splits_big_requests(tiny_base: BaseModel) -> None:
    """Two runs' requests go through one forward_backward call; a request larger than the
    token budget is split into micro-batches with the same outputs as unsplit."""
    scheduler, worker = make(tiny_base, budget=40)
    calls: list[int] = []
    original = worker.forward_backward

    def counting(inputs: list[ForwardBackwardInput]) -> list:
        calls.append(sum(len(d.tokens) for i in inputs for d in i.data))
        return original(inputs)

    worker.forward_backward = counting  # type: ignore[method-assign]
    rec = Recorder()
    for run in ("a", "b"):
        scheduler.submit(rec.op(f"{run}0", CreateAdapter(LoraConfig(rank=4, seed=1)), run, 0))
    rec.wait(2)
    small = [datum(list(range(40, 55)))]  # 14 tokens
    big = [datum(list(range(i, i + 16))) for i in range(5)]  # 5 x 15 = 75 tokens
    scheduler.submit(rec.op("a1", fb("a", small), "a", 1))
    scheduler.submit(rec.op("b1", fb("b", big), "b", 1))
    rec.wait(4)
    scheduler.stop()
    assert all(c <= 40 for c in calls), calls
    assert sum(calls) == 14 + 75
    assert calls[0] > 14  # run a's rows shared the first pass with some of run b's
    # The split request equals the same request run in one piece.
    (whole,) = original([ForwardBackwardInput("b", big, forward_only=True)])
    out = rec.results["b1"]
    assert len(out.loss_fn_outputs) == 5
    torch.testing.assert_close(
        out.metrics["loss:sum"], whole.metrics["loss:sum"], rtol=1e-5, atol=1e-4
    )
    for got, want in zip(out.loss_fn_outputs, whole.loss_fn_outputs, strict=True):
        torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=1e-5, atol=1e-5)


def test_failures_stay_with_their_op(tiny_base: BaseModel, tmp_path: Path) -> None:
    """An unknown adapter fails its own op with a user error; other ops still complete."""
    scheduler, _ = make(tiny_base)
    rec = Recorder()
    scheduler.submit(rec.op("c", CreateAdapter(LoraConfig(rank=4, seed=0)), "ok", 0))
    rec.wait(1)
    scheduler.submit(rec.op("bad", fb("missing", [datum([1, 2, 3])]), "missing", 0))
    scheduler.submit(rec.op("good", fb("ok", [datum([1, 2, 3])]), "ok", 1))
    params = SamplingParams(max_tokens=3, temperature=0.0)
    scheduler.submit(rec.op("s-bad", Sample(SampleInput("nope", [1, 2], params))))
    scheduler.submit(rec.op("s-good", Sample(SampleInput("ok", [1, 2], params))))
    rec.wait(5)
    scheduler.stop()
    assert isinstance(rec.results["bad"], ValueError)
    assert isinstance(rec.results["s-bad"], ValueError)
    assert rec.results["good"].metrics["loss:sum"] > 0
    assert len(rec.results["s-good"].sequences[0].tokens) == 3


def test_micro_batches_are_bounded_by_padded_size(tiny_base: BaseModel) -> None:
    """Rows are padded to the longest row of their pass, so the budget bounds rows x longest:
    a short row and a long row that fit by token count (5 + 30 <= 40) still go apart."""
    scheduler, worker = make(tiny_base, budget=40)
    padded: list[int] = []
    original = worker.forward_backward

    def counting(inputs: list[ForwardBackwardInput]) -> list:
        rows = [len(d.tokens) for i in inputs for d in i.data]
        padded.append(len(rows) * max(rows))
        return original(inputs)

    worker.forward_backward = counting  # type: ignore[method-assign]
    rec = Recorder()
    scheduler.submit(rec.op("c", CreateAdapter(LoraConfig(rank=4, seed=0)), "r", 0))
    data = [datum(list(range(1, 7))), datum(list(range(1, 32))), datum(list(range(1, 12)))]
    scheduler.submit(rec.op("fb", fb("r", data), "r", 1))
    rec.wait(2)
    scheduler.stop()
    assert len(rec.results["fb"].loss_fn_outputs) == 3
    assert padded == [5, 30, 10], padded


def test_activation_probe_measures_per_token_memory(tiny_base: BaseModel) -> None:
    """The probe measures what backward keeps per token (weights excluded) and leaves no
    adapter behind."""
    worker = ModelWorker(tiny_base)
    per_token = worker.activation_bytes_per_token()
    config = tiny_base.model.config
    # At least the hidden state of every layer in float32, twice (activations + gradients).
    assert per_token >= 2 * config.num_hidden_layers * config.hidden_size * 4
    assert worker.lora.adapters == {}


def test_scheduler_thread_owns_the_intra_op_threads(tiny_base: BaseModel) -> None:
    """With `threads`, the scheduler thread runs torch on that many intra-op threads and the
    thread that started it (the server's main thread) goes single-threaded, so the process
    holds one OpenMP pool (engine/threads.py). Decode steps run the fused kernels
    (model/kernels), which must not reset the thread's count either."""
    before = torch.get_num_threads()
    seen: list[int] = []
    done = threading.Event()
    worker = ModelWorker(tiny_base)
    scheduler = ModelScheduler(worker, threads=2)
    try:
        scheduler.start()
        assert torch.get_num_threads() == 1
        item = SampleInput(
            None,
            [1, 2, 3],
            SamplingParams(max_tokens=4, seed=0, stop=()),
            on_token=lambda i, c: seen.append(torch.get_num_threads()),
        )
        scheduler.submit(Op("s", Sample(item), lambda _: done.set(), lambda _: done.set()))
        assert done.wait(60)
        assert len(seen) == 4 and set(seen) == {2}  # the hook runs on the scheduler thread
        assert worker.sampler._batch.decoder.fused  # type: ignore[union-attr]
    finally:
        scheduler.stop()
        torch.set_num_threads(before)
