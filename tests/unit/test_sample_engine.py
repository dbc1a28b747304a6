"""The continuous-batching sampler (model/sample_engine.py) and the prompt prefix cache, on the
tiny random-init Llama (fp32, real model code).

The reference for every output is the static batch (`sampling.sample`, each request alone):
the engine must give the same tokens (greedy and seeded) and the same logprobs and prompt
outputs (within float32 rounding) whoever shares the batch, whenever a request joins, and
whether its prompt KV came from the prefix cache or not.
"""

import threading
from collections.abc import Hashable, Iterator
from pathlib import Path

import pytest
import torch
from lineup.families import build, builder
from numerics import assert_close_scaled

from tinkerd.engine.ops import CreateAdapter, ForwardBackward, Op, OptimStep, Sample
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model import sampling
from tinkerd.model.loading import load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.prefix_cache import PrefixCache
from tinkerd.model.types import (
    Datum,
    ForwardBackwardInput,
    SampleInput,
    SampleOutput,
    SamplingParams,
)
from tinkerd.model.worker import ModelWorker

VOCAB_TERMS = 512  # the tiny model's vocabulary: the longest sum behind a logprob


def _randomize(worker: ModelWorker, adapter_id: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(p.shape, generator=gen) * 0.05
        if name.endswith("lora_B.weight")
        else p.detach().clone()
        for name, p in worker.lora.adapters[adapter_id].params.items()
    }
    worker.lora.load_weights(adapter_id, tensors)


@pytest.fixture(scope="module", params=["own", "transformers"])
def worker(
    request: pytest.FixtureRequest,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ModelWorker]:
    """The engine on both decode batches: tinkerd's own decode step (what a Llama gets) and
    transformers' forward over a padded cache (what the other continuous models get)."""
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("data"))
    w = ModelWorker(base, own_decoder=request.param == "own", prefill_chunk=16)
    assert w.sampler.own_decoder == (request.param == "own")
    w.add_adapter("a", LoraConfig(rank=4, seed=1))
    _randomize(w, "a", 11)
    w.add_adapter("b", LoraConfig(rank=8, seed=2))
    _randomize(w, "b", 12)
    yield w


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _static(worker: ModelWorker, item: SampleInput) -> SampleOutput:
    """The reference: the static path, this request alone, no prefix cache."""
    (out,) = sampling.sample(
        worker.lora,
        worker.base.tokenizer,
        [item],
        eos_ids=worker.info.eos_token_ids,
        pad_id=worker.info.pad_token_id,
        context_length=worker.info.context_length,
    )
    return out


def _same(got: SampleOutput, want: SampleOutput) -> None:
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
    assert [s.stop_reason for s in got.sequences] == [s.stop_reason for s in want.sequences]
    for g, w in zip(got.sequences, want.sequences, strict=True):
        assert_close_scaled(
            torch.tensor(g.logprobs), torch.tensor(w.logprobs), terms=VOCAB_TERMS, msg="logprobs"
        )


def _drain(worker: ModelWorker) -> dict[Hashable, SampleOutput]:
    done: dict[Hashable, SampleOutput] = {}
    while worker.sample_active():
        finished, _ = worker.sample_step(None)
        done.update(finished)
    return done


def _item(adapter: str | None, seed: int, *, n: int = 1, tokens: int = 12, **kw) -> SampleInput:
    params = SamplingParams(max_tokens=tokens, temperature=kw.pop("temperature", 1.0), seed=seed)
    return SampleInput(adapter, _prompt(5 + seed % 7, seed), params, num_samples=n, **kw)


def test_requests_join_running_batch_and_leave_when_done(worker: ModelWorker) -> None:
    """A request admitted mid-decode gets exactly what it gets alone; the short one comes
    back at the step it ends, while the long one is still decoding."""
    long = _item("a", 1, tokens=30, n=2)
    short = _item(None, 2, tokens=3)
    greedy = _item("b", 3, tokens=10, temperature=0.0)
    worker.sample_admit(["long"], [long])
    for _ in range(5):
        finished, deltas = worker.sample_step(0.0)  # one step each
        assert not finished and [i for i, _ in deltas["long"]] == [0, 1]
    worker.sample_admit(["short", "greedy"], [short, greedy])
    seen_short = None
    steps = 0
    results: dict[Hashable, SampleOutput] = {}
    while worker.sample_active():
        finished, _ = worker.sample_step(0.0)
        steps += 1
        results.update(finished)
        if "short" in finished:
            seen_short = steps
            assert "long" not in results  # left at once, not at the batch's end
    assert seen_short == 3
    _same(results["long"], _static(worker, long))
    _same(results["short"], _static(worker, short))
    _same(results["greedy"], _static(worker, greedy))


def test_seeds_independent_of_batch_mates(worker: ModelWorker) -> None:
    target = _item("a", 7, tokens=16, n=3)
    alone = worker.sample([target])[0]
    mates = [_item(a, 20 + i, tokens=8 + i) for i, a in enumerate([None, "b", "a", None])]
    worker.sample_admit(["m0", "m1"], mates[:2])
    worker.sample_step(0.0)
    worker.sample_admit(["t"], [target])
    worker.sample_step(0.0)
    worker.sample_admit(["m2", "m3"], mates[2:])
    results = _drain(worker)
    _same(results["t"], alone)
    _same(results["t"], _static(worker, target))


def test_every_option_matches_the_static_path(worker: ModelWorker) -> None:
    prompt = _prompt(40, 5)
    target = torch.full((39, 2), -1, dtype=torch.int64)
    target[10:, 0] = 3
    target[20:, 1] = 7
    items = [
        SampleInput(
            "a",
            prompt,
            SamplingParams(max_tokens=9, temperature=0.7, top_k=20, top_p=0.9, seed=4),
            num_samples=2,
            prompt_logprobs=True,
            topk_prompt_logprobs=3,
            topk_sample_logprobs=4,
            record_stability=True,
        ),
        SampleInput(
            "b",
            prompt,
            SamplingParams(max_tokens=6, temperature=1.3, seed=5),
            target_prompt_logprobs=target,
            prompt_alt_tokens_k=2,
        ),
        SampleInput(
            None,
            prompt,
            SamplingParams(max_tokens=7, seed=6),
            prompt_logprobs=True,
            prompt_logprobs_last_n=5,
        ),
        SampleInput(None, _prompt(6, 9), SamplingParams(max_tokens=20, seed=8, stop=["a", 5])),
    ]
    for _ in range(2):  # the second time the prompt's prefix comes from the prefix cache
        got = worker.sample(items)
        for g, item in zip(got, items, strict=True):
            want = _static(worker, item)
            _same(g, want)
            for a, b in zip(g.sequences, want.sequences, strict=True):
                assert (a.topk_logprobs is None) == (b.topk_logprobs is None)
                if a.topk_logprobs is not None and b.topk_logprobs is not None:
                    assert [[i for i, _ in t] for t in a.topk_logprobs] == [
                        [i for i, _ in t] for t in b.topk_logprobs
                    ]
                assert (a.behaviour_logprobs is None) == (b.behaviour_logprobs is None)
                if a.base_logprobs is not None and b.base_logprobs is not None:
                    assert_close_scaled(
                        torch.tensor(a.base_logprobs),
                        torch.tensor(b.base_logprobs),
                        terms=VOCAB_TERMS,
                    )
            for field in ("prompt_logprobs",):
                x, y = getattr(g, field), getattr(want, field)
                assert (x is None) == (y is None)
                if x is not None:
                    assert [v is None for v in x] == [v is None for v in y]
                    assert_close_scaled(
                        torch.tensor([v for v in x if v is not None]),
                        torch.tensor([v for v in y if v is not None]),
                        terms=VOCAB_TERMS,
                    )
            if want.topk_prompt_logprobs is not None:
                assert g.topk_prompt_logprobs is not None
                assert [t and [i for i, _ in t] for t in g.topk_prompt_logprobs] == [
                    t and [i for i, _ in t] for t in want.topk_prompt_logprobs
                ]
            for field in ("target_prompt_logprobs", "prompt_alt_logprobs"):
                x, y = getattr(g, field), getattr(want, field)
                assert (x is None) == (y is None)
                if x is not None:
                    assert_close_scaled(x, y, terms=VOCAB_TERMS)
            if want.prompt_alt_tokens is not None:
                assert torch.equal(g.prompt_alt_tokens, want.prompt_alt_tokens)


def test_prefix_cache_shares_prompts_and_prefixes(worker: ModelWorker) -> None:
    cache = worker.prefix_cache
    assert cache is not None
    history = _prompt(50, 30)  # three whole blocks of 16 before the last token
    first = SampleInput("a", history, SamplingParams(max_tokens=8, seed=1), num_samples=4)
    lookups, hits = cache.stats.lookups, cache.stats.hits
    worker.sample([first])
    assert (cache.stats.lookups, cache.stats.hits) == (lookups + 1, hits)
    # The same prompt (a GRPO group's next request) and a longer turn of the conversation.
    turn = SampleInput("a", [*history, *_prompt(9, 31)], SamplingParams(max_tokens=8, seed=2))
    got = worker.sample([first, turn])
    assert cache.stats.hits == hits + 2
    assert cache.stats.hit_tokens >= 48 + 48
    _same(got[0], _static(worker, first))
    _same(got[1], _static(worker, turn))
    # Other weights never share: the base model and adapter "b" miss on the same prompt.
    before = cache.stats.hits
    worker.sample([SampleInput(None, history, SamplingParams(max_tokens=2, seed=3))])
    worker.sample([SampleInput("b", history, SamplingParams(max_tokens=2, seed=3))])
    assert cache.stats.hits == before


def test_shared_system_prompt_prefills_together(worker: ModelWorker) -> None:
    """Prompts that share a cached prefix (a chat template's system prompt) and differ after
    it continue it in one pass, each with its own length; prompt extras still match."""
    cache = worker.prefix_cache
    assert cache is not None
    system = _prompt(34, 80)
    worker.sample([SampleInput(None, system, SamplingParams(max_tokens=1, seed=0))])
    items = [
        SampleInput(
            None,
            [*system, *_prompt(3 + 5 * i, 81 + i)],
            SamplingParams(max_tokens=7, seed=i),
            prompt_logprobs=i == 1,
            prompt_logprobs_last_n=4 if i == 1 else None,
        )
        for i in range(4)
    ]
    hits = cache.stats.hits
    got = worker.sample(items)
    assert cache.stats.hits == hits + 4
    for g, item in zip(got, items, strict=True):
        want = _static(worker, item)
        _same(g, want)
        if want.prompt_logprobs is not None:
            assert g.prompt_logprobs is not None
            assert g.prompt_logprobs[:-4] == want.prompt_logprobs[:-4]  # None: not scored
            assert_close_scaled(
                torch.tensor(g.prompt_logprobs[-4:]),
                torch.tensor(want.prompt_logprobs[-4:]),
                terms=VOCAB_TERMS,
            )


def test_prefix_cache_follows_weight_changes(worker: ModelWorker) -> None:
    """A snapshot re-taken under the same id, or an adapter changed in place, never gets the
    KV computed with its old weights."""
    worker.add_adapter("train", LoraConfig(rank=4, seed=5))
    _randomize(worker, "train", 40)
    worker.snapshot_adapter("train", "snap")
    item = SampleInput("snap", _prompt(40, 41), SamplingParams(max_tokens=6, temperature=0.0))
    worker.sample([item])
    _randomize(worker, "train", 42)
    worker.snapshot_adapter("train", "snap")  # same id, new weights
    _same(worker.sample([item])[0], _static(worker, item))
    _randomize(worker, "snap", 43)  # in place
    _same(worker.sample([item])[0], _static(worker, item))


def test_rows_keep_their_weights_when_a_snapshot_is_replaced(worker: ModelWorker) -> None:
    worker.add_adapter("t2", LoraConfig(rank=4, seed=6))
    _randomize(worker, "t2", 50)
    worker.snapshot_adapter("t2", "s2")
    item = SampleInput("s2", _prompt(9, 51), SamplingParams(max_tokens=24, seed=9))
    before = _static(worker, item)
    worker.sample_admit(["x"], [item])
    worker.sample_step(0.0)
    _randomize(worker, "t2", 52)
    worker.snapshot_adapter("t2", "s2")  # an inflight target moves on mid-sequence
    worker.remove_adapter("s2")  # and is even evicted
    results = _drain(worker)
    _same(results["x"], before)
    assert not [a for a in worker.lora.adapters if a.startswith("s2\x00")]  # pin released


def test_prefix_cache_eviction_stays_correct(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path)
    small = ModelWorker(base, prefix_cache_bytes=1)  # set below: room for ~2 prompts
    one_block = small.sampler.prefix_cache
    assert one_block is not None
    prompts = [_prompt(33, 60 + i) for i in range(6)]
    items = [SampleInput(None, p, SamplingParams(max_tokens=5, temperature=0.0)) for p in prompts]
    one_block.budget_bytes = 1 << 30
    small.sample(items[:1])
    entry = one_block.stats.bytes
    one_block.budget_bytes = 2 * entry
    for _ in range(2):
        for item in items:
            _same(small.sample([item])[0], _static(small, item))
        assert one_block.stats.bytes <= 2 * entry and one_block.stats.entries <= 2
    # Interleaved with hits on the two most recent: still the static path's answers.
    _same(small.sample([items[-1]])[0], _static(small, items[-1]))
    assert one_block.stats.hits >= 1


def test_prefix_cache_unit() -> None:
    cache = PrefixCache(budget_bytes=10_000, block=4)
    kv = [(torch.arange(12.0).view(1, 1, 12, 1), -torch.arange(12.0).view(1, 1, 12, 1))]
    tokens = list(range(12))
    cache.insert("w", tokens, kv)
    length, got = cache.lookup("w", [*range(9), 99, 98], limit=10)
    assert length == 8 and got is not None and got[0][0].flatten().tolist() == list(range(8))
    assert cache.lookup("other", tokens, limit=12) == (0, None)
    assert cache.lookup("w", [5, *tokens], limit=12) == (0, None)
    length, _ = cache.lookup("w", tokens, limit=6)
    assert length == 4  # never past the limit (the positions a request needs computed)


def test_long_prompt_prefills_in_chunks_while_others_decode(worker: ModelWorker) -> None:
    """A 70-token prompt (chunks of 16) takes five chunks to prefill; the request already
    decoding gets a token at every one of them; both equal their static results."""
    assert worker.sampler.prefill_chunk == 16
    running = _item("b", 40, tokens=20)
    long = SampleInput(
        "a",
        _prompt(70, 41),
        SamplingParams(max_tokens=6, seed=41),
        num_samples=2,
        prompt_logprobs=True,
        topk_prompt_logprobs=2,
    )
    worker.sample_admit(["running"], [running])
    worker.sample_step(0.0)
    worker.sample_admit(["long"], [long])  # its first chunk
    waited = 0
    results: dict[Hashable, SampleOutput] = {}
    while "long" not in results:
        finished, deltas = worker.sample_step(0.0)
        results.update(finished)
        if "running" not in results:
            assert len(deltas["running"]) == 1  # never stalled by the long prefill
        if "long" not in deltas and "long" not in finished:
            waited += 1
    # Admission ran chunk 1 (16 tokens); steps ran chunks 2-4 without a token for it; the
    # step of chunk 5 (the last 6 tokens) joined its rows and drew their first tokens.
    assert waited == 3
    results.update(_drain(worker))
    _same(results["running"], _static(worker, running))
    want = _static(worker, long)
    _same(results["long"], want)
    got_prompt = results["long"].prompt_logprobs
    assert got_prompt is not None and want.prompt_logprobs is not None
    assert_close_scaled(
        torch.tensor(got_prompt[1:]), torch.tensor(want.prompt_logprobs[1:]), terms=VOCAB_TERMS
    )
    assert results["long"].topk_prompt_logprobs is not None
    assert want.topk_prompt_logprobs is not None
    assert [t and [i for i, _ in t] for t in results["long"].topk_prompt_logprobs] == [
        t and [i for i, _ in t] for t in want.topk_prompt_logprobs
    ]


def test_cancel_while_prefilling_releases_the_request(worker: ModelWorker) -> None:
    slow = SampleInput("a", _prompt(60, 50), SamplingParams(max_tokens=5, seed=50))
    worker.sample_admit(["slow"], [slow])  # the first of four chunks
    assert worker.sample_active() == 1
    worker.sample_cancel(["slow"])
    assert worker.sample_active() == 0
    assert not [a for a in worker.lora.adapters if "\x00" in a]  # its pin released
    assert _drain(worker) == {}


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "gpt_oss"])
def test_sliding_window_models_decode_continuously(family: str, tmp_path: Path) -> None:
    """Sliding-window models (window 8 here) join the continuous batch: Mistral on tinkerd's
    decode step, the others on transformers' forward. Prompts longer than the window,
    chunked prefill, and a request joining mid-decode give the static path's results."""
    path = build(builder(family), tmp_path / "model")
    local = ModelWorker(load_base_model(str(path), data_dir=tmp_path / "data"), prefill_chunk=8)
    assert local.sampler.continuous
    assert local.sampler.own_decoder == (family == "mistral")
    first = SampleInput(None, _prompt(20, 1), SamplingParams(max_tokens=12, seed=1), num_samples=2)
    later = SampleInput(None, _prompt(11, 2), SamplingParams(max_tokens=9, temperature=0.0))
    local.sample_admit(["first"], [first])
    for _ in range(4):
        local.sample_step(0.0)
    local.sample_admit(["later"], [later])
    results = _drain(local)
    _same(results["first"], _static(local, first))
    _same(results["later"], _static(local, later))


def test_static_fallback_gives_the_same_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path)
    static = ModelWorker(base, continuous_sampling=False)
    assert not static.sampler.continuous
    items = [_item(None, 70, n=2), _item(None, 71, temperature=0.0)]
    got = static.sample(items)
    for g, item in zip(got, items, strict=True):
        _same(g, _static(static, item))


# ------------------------------------------------------------------------------------------
# Fairness between training and sampling (scheduler), by ordering only


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.cv = threading.Condition()

    def add(self, event: str) -> None:
        with self.cv:
            self.events.append(event)
            self.cv.notify_all()

    def wait(self, event: str, timeout: float = 120) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: event in self.events, timeout), self.events

    def op(self, rid: str, action: object, model_id: str | None = None, seq=None) -> Op:
        return Op(
            rid,
            action,  # type: ignore[arg-type]
            lambda _: self.add(f"{rid}:done"),
            lambda e: self.add(f"{rid}:failed:{e}"),
            model_id=model_id,
            seq_id=seq,
        )


def _fb(run: str) -> ForwardBackward:
    tokens = _prompt(40, 3)
    datum = Datum(
        tokens[:-1], {"target_tokens": torch.tensor(tokens[1:]), "weights": torch.ones(39)}
    )
    return ForwardBackward(ForwardBackwardInput(run, [datum]))


def test_training_runs_while_a_long_sample_decodes(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path)
    scheduler = ModelScheduler(ModelWorker(base), sample_slice_seconds=0.01)
    scheduler.start()
    log = _Log()
    try:
        started = threading.Event()
        item = SampleInput(
            None,
            _prompt(8, 1),
            SamplingParams(max_tokens=400, seed=1, stop=[]),
            on_token=lambda i, c: started.set(),
        )
        scheduler.submit(log.op("sample", Sample(item)))
        assert started.wait(120)
        scheduler.submit(log.op("create", CreateAdapter(LoraConfig(rank=4, seed=0)), "r", 0))
        scheduler.submit(log.op("fb", _fb("r"), "r", 1))
        log.wait("sample:done")
        assert log.events.index("fb:done") < log.events.index("sample:done"), log.events
    finally:
        scheduler.stop()


def test_sample_starts_while_training_is_queued(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path)
    scheduler = ModelScheduler(ModelWorker(base), sample_slice_seconds=0.01)
    scheduler.start()
    log = _Log()
    try:
        scheduler.submit(log.op("create", CreateAdapter(LoraConfig(rank=4, seed=0)), "r", 0))
        log.wait("create:done")
        steps = 40
        # One run's chain: forward_backward, optim_step, ...: a loop iteration takes one
        # of them (a run contributes its leading forward_backwards or one other op).
        for i in range(steps):
            scheduler.submit(log.op(f"fb{i}", _fb("r"), "r", 1 + 2 * i))
            scheduler.submit(log.op(f"opt{i}", OptimStep(AdamParams(1e-3)), "r", 2 + 2 * i))
        item = SampleInput(
            None,
            _prompt(8, 2),
            SamplingParams(max_tokens=4, seed=2),
            on_token=lambda i, c: log.add("sample:token"),
        )
        scheduler.submit(log.op("sample", Sample(item)))
        log.wait("sample:done")
        log.wait(f"fb{steps - 1}:done", timeout=300)
        assert log.events.index("sample:token") < log.events.index(f"fb{steps - 1}:done")
    finally:
        scheduler.stop()


def test_cancel_drops_rows_and_keeps_the_others(worker: ModelWorker) -> None:
    stay = _item("a", 90, tokens=10, n=2)
    worker.sample_admit(["stay", "go"], [stay, _item("b", 91, tokens=40, n=3)])
    worker.sample_step(0.0)
    worker.sample_cancel(["go"])
    assert worker.sample_active() == 1
    results = _drain(worker)
    assert list(results) == ["stay"]
    _same(results["stay"], _static(worker, stay))
    assert not [a for a in worker.lora.adapters if "\x00" in a]  # every pin released


def test_cancel_takes_a_decoding_sample_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path)
    local = ModelWorker(base)
    scheduler = ModelScheduler(local, sample_slice_seconds=0.01)
    scheduler.start()
    log = _Log()
    try:
        started = threading.Event()
        item = SampleInput(
            None,
            _prompt(8, 1),
            SamplingParams(max_tokens=480, seed=1, stop=[]),
            num_samples=8,
            on_token=lambda i, c: started.set(),
        )
        scheduler.submit(log.op("long", Sample(item)))
        assert started.wait(120)
        op = scheduler.cancel_sample("long")
        assert op is not None and op.request_id == "long"
        op.fail(RuntimeError("cancelled"))
        after = SampleInput(None, _prompt(6, 2), SamplingParams(max_tokens=3, seed=2))
        scheduler.submit(log.op("after", Sample(after)))
        log.wait("after:done")
        assert "long:done" not in log.events and scheduler.cancel_sample("long") is None
        assert local.sample_active() == 0
    finally:
        scheduler.stop()
