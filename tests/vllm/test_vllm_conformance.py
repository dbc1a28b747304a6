"""tinkerd's own sampler and the vLLM sampler pool give the same answers (docs/vllm.md).

The same `SampleInput`s go through `ModelWorker.sample` on the embedded SmolLM2-135M and
through a real vLLM runner (its own venv: `make vllm-venv`, or TINKERD_VLLM_PYTHON), with the
base model and with a tinkerd-trained adapter (attention, MLP and lm_head LoRA) that vLLM loads
from the PEFT directory tinkerd writes.

Tolerance: |vLLM - tinkerd| <= LOGPROB_TOL nats for every sampled-token and prompt logprob.
Two float32 engines with different kernels (30 layers, 49k-way log-softmax) differ by ~2e-5
(measured, shared/docs/scale-out.md §5.7); the mistakes this guards against are far larger:
raw instead of temperature-scaled logprobs (0.5-2 nats at T=0.7), a dropped lm_head LoRA
(up to 1.8 nats), the wrong adapter or a stale adapter version (whole tokens differ).
"""

import itertools
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from vllm_env import NEEDS_VLLM, VLLM_PYTHON

from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.engine.adapter_files import write_adapter
from tinkerd.engine.ops import Op, Sample
from tinkerd.engine.telemetry import BatchPart, Telemetry
from tinkerd.engine.vllm_sampler import IDENTITY, VllmConfig, VllmSamplerPool
from tinkerd.model.loading import BaseModel, load_base_model, resolve_model_path
from tinkerd.model.lora import LoraConfig, segments_for
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.training import body, unembed
from tinkerd.model.types import (
    Datum,
    ForwardBackwardInput,
    SampleInput,
    SampleOutput,
    SamplingParams,
)
from tinkerd.model.worker import ModelWorker

LOGPROB_TOL = 1e-3
ADAPTER = "tuned"
TRAINED = "What is tinkerd?"
REQUEST_IDS = itertools.count()
ANSWER = " tinkerd is a self-hosted server for the Tinker fine-tuning API."


pytestmark = NEEDS_VLLM


@pytest.fixture(scope="module")
def base(data_dir: Path) -> BaseModel:
    return load_base_model(EMBEDDED_MODEL, data_dir=data_dir)


@pytest.fixture(scope="module")
def worker(base: BaseModel) -> ModelWorker:
    """The embedded model with adapter ADAPTER trained (AdamW) to answer TRAINED."""
    torch.set_num_threads(1)
    w = ModelWorker(base)
    w.add_adapter(ADAPTER, LoraConfig(rank=16, alpha=32, seed=0))
    train(w, ADAPTER, steps=12)
    return w


def train(w: ModelWorker, adapter_id: str, steps: int) -> None:
    tok = w.base.tokenizer
    prompt, answer = tok.encode(TRAINED), tok.encode(ANSWER)
    tokens = prompt + answer
    weights = torch.tensor([0.0] * (len(prompt) - 1) + [1.0] * len(answer))
    datum = Datum(tokens[:-1], {"target_tokens": torch.tensor(tokens[1:]), "weights": weights})
    for _ in range(steps):
        w.forward_backward([ForwardBackwardInput(adapter_id, [datum])])
        w.optim_step(adapter_id, AdamParams(learning_rate=5e-3))


@pytest.fixture(scope="module")
def adapter_dir(worker: ModelWorker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapters") / ADAPTER
    state = worker.export_adapter(ADAPTER, with_optimizer=False)
    assert "lm_head" in state.target_modules  # the unembedding LoRA reaches vLLM too
    write_adapter(directory, state, EMBEDDED_MODEL)
    return directory


class Recorder(Telemetry):
    """Keeps the pool's telemetry calls (the scheduler's metrics and traces read the same)."""

    def __init__(self) -> None:
        self.queued: list[str] = []
        self.started: list[str] = []
        self.parts: list[BatchPart] = []

    def op_queued(self, model: str, request_id: str, at: float) -> None:
        self.queued.append(request_id)

    def op_started(self, model: str, request_id: str, at: float) -> None:
        self.started.append(request_id)

    def sample_batch(self, model: str, start: float, end: float, parts: list[BatchPart]) -> None:
        assert model == EMBEDDED_MODEL and end >= start
        self.parts.extend(parts)


@pytest.fixture(scope="module")
def pool(
    base: BaseModel, worker: ModelWorker, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmSamplerPool]:
    """The pool as the server starts it: with the zero adapter base-model requests use on a
    CPU build (see VllmSampler)."""
    assert VLLM_PYTHON is not None
    work = tmp_path_factory.mktemp("vllm")
    worker.add_adapter(IDENTITY, LoraConfig(rank=1, seed=0))
    state = worker.export_adapter(IDENTITY, with_optimizer=False)
    write_adapter(work / IDENTITY, state, EMBEDDED_MODEL)
    worker.remove_adapter(IDENTITY)
    config = VllmConfig(
        python=VLLM_PYTHON,
        model_dir=Path(resolve_model_path(EMBEDDED_MODEL, data_dir)),
        max_lora_rank=16,
        max_loras=2,
        max_model_len=1024,
        log_path=work / "vllm.log",
    )
    started = VllmSamplerPool.start(
        config, base.info, work / "snapshots", Recorder(), identity_dir=work / IDENTITY
    )
    yield started
    started.close()
    assert started.sampler.process.proc.poll() is not None


def prompts(base: BaseModel) -> list[list[int]]:
    tok = base.tokenizer
    return [tok.encode(t) for t in (TRAINED, "The capital of France is", "def fibonacci(n):")]


def assert_logprobs_close(got: list[float | None], want: list[float | None], what: str) -> None:
    assert len(got) == len(want), what
    assert [g is None for g in got] == [w is None for w in want], what
    diffs = [abs(g - w) for g, w in zip(got, want, strict=True) if g is not None and w is not None]
    assert max(diffs, default=0.0) <= LOGPROB_TOL, f"{what}: max diff {max(diffs)}: {got} {want}"


def assert_same(vllm: list[SampleOutput], ours: list[SampleOutput]) -> None:
    for i, (v, o) in enumerate(zip(vllm, ours, strict=True)):
        assert len(v.sequences) == len(o.sequences)
        for j, (sv, so) in enumerate(zip(v.sequences, o.sequences, strict=True)):
            assert sv.tokens == so.tokens, f"input {i} sample {j}"
            assert sv.stop_reason == so.stop_reason, f"input {i} sample {j}"
            assert_logprobs_close(sv.logprobs, so.logprobs, f"input {i} sample {j} logprobs")
        if o.prompt_logprobs is None:
            assert v.prompt_logprobs is None
        else:
            assert v.prompt_logprobs is not None
            assert_logprobs_close(v.prompt_logprobs, o.prompt_logprobs, f"input {i} prompt")


@pytest.mark.parametrize("adapter_id", [None, ADAPTER])
def test_greedy_tokens_and_logprobs_match(
    base: BaseModel,
    worker: ModelWorker,
    pool: VllmSamplerPool,
    adapter_dir: Path,
    adapter_id: str | None,
) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.0)
    inputs = [SampleInput(adapter_id, p, params, prompt_logprobs=True) for p in prompts(base)]
    ours = worker.sample(inputs)
    vllm = pool.sampler.sample(inputs, {ADAPTER: adapter_dir})
    assert_same(vllm, ours)
    answer = base.tokenizer.decode(vllm[0].sequences[0].tokens)
    # The adapter is really applied (and really trained): only it gives the trained answer.
    assert (ANSWER.strip() in answer) == (adapter_id == ADAPTER), answer


def test_stops_and_last_n_match(
    base: BaseModel, worker: ModelWorker, pool: VllmSamplerPool, adapter_dir: Path
) -> None:
    """Stop strings, stop ids, EOS, `stop=[]` and prompt_logprobs_last_n as tinkerd does them."""
    tok = base.tokenizer
    list_prompt = tok.encode("Count: one, two, three,")
    comma = tok.encode(",")[-1]
    cases = [
        SamplingParams(max_tokens=24, temperature=0.0, stop=(",",)),
        SamplingParams(max_tokens=24, temperature=0.0, stop=(comma,)),
        SamplingParams(max_tokens=24, temperature=0.0, stop=(" four", "five")),
        SamplingParams(max_tokens=24, temperature=0.0, stop=()),
        SamplingParams(max_tokens=40, temperature=0.0),  # EOS (the adapter's answer ends)
    ]
    inputs = [
        SampleInput(aid, p, params, prompt_logprobs=True, prompt_logprobs_last_n=2)
        for params in cases
        for aid, p in ((None, list_prompt), (ADAPTER, tok.encode(TRAINED)))
    ]
    ours = worker.sample(inputs)
    vllm = pool.sampler.sample(inputs, {ADAPTER: adapter_dir})
    assert_same(vllm, ours)
    reasons = {s.stop_reason for out in vllm for s in out.sequences}
    assert reasons == {"stop", "length"}


def scored(
    worker: ModelWorker, adapter_id: str | None, prompt: list[int], tokens: list[int], t: float
) -> list[float]:
    """tinkerd's definition of a sampled token's logprob: log_softmax(z / T), untruncated."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad(), worker.lora.route(segments_for([adapter_id])):
        hidden = body(worker.lora.model)(input_ids=ids).last_hidden_state[0]
        logits = unembed(worker.lora, hidden[len(prompt) - 1 : -1]).float()
    logp = torch.log_softmax(logits / t, -1)
    return logp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()


@pytest.mark.parametrize("adapter_id", [None, ADAPTER])
def test_sampled_logprobs_are_temperature_scaled(
    base: BaseModel,
    worker: ModelWorker,
    pool: VllmSamplerPool,
    adapter_dir: Path,
    adapter_id: str | None,
) -> None:
    """Seeds are not comparable across engines, so vLLM's sampled tokens are rescored by
    tinkerd's model: their logprobs must be log_softmax(z / T) (Tinker's), and a seeded
    request repeats itself while its samples differ from each other."""
    t = 0.7
    params = SamplingParams(max_tokens=12, temperature=t, seed=1234)
    inputs = [SampleInput(adapter_id, p, params, num_samples=3) for p in prompts(base)]
    first = pool.sampler.sample(inputs, {ADAPTER: adapter_dir})
    again = pool.sampler.sample(inputs, {ADAPTER: adapter_dir})
    distinct = []
    for item, out, out2 in zip(inputs, first, again, strict=True):
        tokens = [s.tokens for s in out.sequences]
        assert tokens == [s.tokens for s in out2.sequences]
        distinct.append(len({tuple(x) for x in tokens}))
        for seq in out.sequences:
            want = scored(worker, adapter_id, item.prompt, seq.tokens, t)
            assert_logprobs_close(seq.logprobs, want, "sampled logprobs at T=0.7")
    # Each sample has its own seed (the trained prompt may still give one answer every time).
    assert max(distinct) > 1, distinct


def run_op(pool: VllmSamplerPool, item: SampleInput, snapshot_dir: Path | None = None) -> object:
    """Submit a real Sample op; wait for its callback (None: the pool did not take it)."""
    done = threading.Event()
    result: list[object] = []

    def finish(value: object) -> None:
        result.append(value)
        done.set()

    op = Op(f"req-{next(REQUEST_IDS)}", Sample(item, snapshot_dir), finish, finish)
    if not pool.try_submit(op):
        assert not op.finished
        return None
    assert done.wait(300), "the pool never completed the op"
    recorder = pool.telemetry
    assert isinstance(recorder, Recorder)
    assert op.request_id in recorder.queued and op.request_id in recorder.started
    if isinstance(result[0], SampleOutput):
        part = next(p for p in recorder.parts if p.request_id == op.request_id)
        assert (part.rows, part.tokens) == (item.num_samples, len(item.prompt))
        assert part.sampled == sum(len(s.tokens) for s in result[0].sequences)
    return result[0]


def test_pool_routes_and_serves_snapshot_versions(
    base: BaseModel, worker: ModelWorker, pool: VllmSamplerPool, adapter_dir: Path
) -> None:
    tok = base.tokenizer
    prompt = tok.encode(TRAINED)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)

    # A saved snapshot: its directory comes with the op.
    saved = run_op(pool, SampleInput(ADAPTER, prompt, greedy), adapter_dir)
    assert isinstance(saved, SampleOutput)
    ours = worker.sample([SampleInput(ADAPTER, prompt, greedy)])[0]
    assert saved.sequences[0].tokens == ours.sequences[0].tokens
    # Requests vLLM cannot serve faithfully are left to tinkerd's sampler, untouched.
    routed_back = [
        SampleInput(None, prompt, SamplingParams(max_tokens=4, temperature=1.0, top_k=20)),
        SampleInput(None, prompt, SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9)),
        SampleInput(None, prompt, greedy, topk_sample_logprobs=2),
        SampleInput(None, prompt, greedy, prompt_logprobs=True, topk_prompt_logprobs=3),
        SampleInput(None, prompt, greedy, prompt_alt_tokens_k=2),
        SampleInput(
            None, prompt, greedy, target_prompt_logprobs=torch.zeros((len(prompt) - 1, 1)).long()
        ),
        SampleInput(None, prompt, greedy, record_stability=True),
        SampleInput(ADAPTER, prompt, greedy),  # an in-memory snapshot without files
    ]
    for item in routed_back:
        assert run_op(pool, item) is None

    # An in-memory snapshot registered under an id, then re-taken under the same id after
    # more training: the second version must be served (a fresh LoRA id), not the cached one.
    snap = "run-1:inflight"
    worker.add_adapter("run-1", LoraConfig(rank=8, alpha=16, seed=3))
    outputs = []
    for _ in range(2):
        train(worker, "run-1", steps=6)
        worker.snapshot_adapter("run-1", snap)
        directory = pool.new_snapshot_dir()
        write_adapter(directory, worker.export_adapter(snap, with_optimizer=False), EMBEDDED_MODEL)
        steps = worker.optim_steps("run-1")
        pool.register_snapshot(snap, directory, weights_step=steps)
        item = SampleInput(snap, prompt, greedy, prompt_logprobs=True)
        got = run_op(pool, item)
        assert isinstance(got, SampleOutput), got
        assert_same([got], worker.sample([item]))
        assert got.weights_step == steps
        outputs.append(got.prompt_logprobs)
    assert outputs[0] != outputs[1]
    pool.forget(snap)
    assert run_op(pool, SampleInput(snap, prompt, greedy)) is None


def test_pool_batches_continuously(
    base: BaseModel, worker: ModelWorker, pool: VllmSamplerPool
) -> None:
    """A request sent while a long one decodes joins the runner's running batch and comes
    back first; a prompt-logprobs request (run alone, see vllm_runner.py) waits for an empty
    engine and still agrees with tinkerd's sampler."""
    prompt = base.tokenizer.encode("Write a long story about a dragon.")
    order: list[str] = []
    results: dict[str, object] = {}
    done = threading.Event()

    def submit(name: str, item: SampleInput) -> None:
        def finish(value: object) -> None:
            results[name] = value
            order.append(name)
            if len(order) == 3:
                done.set()

        assert pool.try_submit(Op(f"req-{next(REQUEST_IDS)}", Sample(item), finish, finish))

    long = SampleInput(None, prompt, SamplingParams(max_tokens=600, temperature=1.0, stop=()))
    short = SampleInput(None, prompt, SamplingParams(max_tokens=4, temperature=0.0, stop=()))
    scored_prompt = SampleInput(
        None, prompt, SamplingParams(max_tokens=3, temperature=0.0), prompt_logprobs=True
    )
    submit("long", long)
    recorder = pool.telemetry
    assert isinstance(recorder, Recorder)
    started = len(recorder.started)
    while len(recorder.started) == started:  # the long one is in the runner
        threading.Event().wait(0.05)
    submit("short", short)
    submit("scored", scored_prompt)
    assert done.wait(600)
    assert order.index("short") < order.index("long"), order
    assert len(results["long"].sequences[0].tokens) == 600  # type: ignore[attr-defined]
    assert_same([results["short"], results["scored"]], worker.sample([short, scored_prompt]))  # type: ignore[list-item]


def test_dead_runner_hands_ops_back(base: BaseModel, pool: VllmSamplerPool) -> None:
    """Last in this module (it ends the shared runner): an op taken before the runner dies
    goes to the fallback (tinkerd's sampler in the server), and later ops are not taken."""
    handed_back: list[Op] = []
    back = threading.Event()
    pool.fallback = lambda op: (handed_back.append(op), back.set())
    prompt = base.tokenizer.encode("Write a long story about a dragon.")
    item = SampleInput(None, prompt, SamplingParams(max_tokens=400, temperature=1.0, stop=()))
    op = Op("long", Sample(item), lambda _: None, lambda _: None)
    assert pool.try_submit(op)
    os.killpg(pool.sampler.process.proc.pid, signal.SIGKILL)  # the runner this test started
    assert back.wait(120), "the op was neither completed nor handed back"
    assert handed_back == [op] and not op.finished
    assert not pool.sampler.process.alive
    assert not pool.try_submit(Op("later", Sample(item), lambda _: None, lambda _: None))
