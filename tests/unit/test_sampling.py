"""Sampling on the tiny random-init Llama (fp32, real model code, no mocks).

References are computed here from first principles: the HF model run on the whole sequence
(no KV cache, no padding, batch of one) and the training forward pass. Adapters get random
non-zero B matrices so that LoRA actually changes the logits.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tinkerd.model import sampling
from tinkerd.model.loading import load_base_model
from tinkerd.model.lora import LoraConfig, segments_for
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.sampling import choose_token
from tinkerd.model.types import (
    Datum,
    ForwardBackwardInput,
    SampledSequence,
    SampleInput,
    SampleOutput,
    SamplingParams,
)
from tinkerd.model.worker import ModelWorker

EOS_PROMPT = "Q: "
EOS_ANSWER = " hello world"
NEVER = ()  # stop=(): never stop before max_tokens, not even at EOS


def _randomize(worker: ModelWorker, adapter_id: str, seed: int, scale: float = 0.05) -> None:
    """Give an adapter random non-zero B (A keeps its seeded init)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: (
            torch.randn(p.shape, generator=gen) * scale
            if name.endswith("lora_B.weight")
            else p.detach().clone()
        )
        for name, p in worker.lora.adapters[adapter_id].params.items()
    }
    worker.lora.load_weights(adapter_id, tensors)


def _train_eos_adapter(worker: ModelWorker, adapter_id: str) -> None:
    """Fit an adapter so that greedy decoding after EOS_PROMPT says EOS_ANSWER then EOS."""
    tok = worker.base.tokenizer
    eos = worker.info.eos_token_ids[0]
    seq = [*tok.encode(EOS_PROMPT), *tok.encode(EOS_ANSWER), eos]
    datum = Datum(
        seq[:-1], {"target_tokens": torch.tensor(seq[1:]), "weights": torch.ones(len(seq) - 1)}
    )
    worker.add_adapter(adapter_id, LoraConfig(rank=8, seed=3))
    for _ in range(40):
        worker.forward_backward([ForwardBackwardInput(adapter_id, [datum])])
        worker.optim_step(adapter_id, AdamParams(learning_rate=1e-2))
        worker.zero_grad(adapter_id)


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelWorker]:
    """One fp32 tiny model with adapters "a", "b" (random) and "eos" (trained to stop)."""
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("data"))
    w = ModelWorker(base)
    w.add_adapter("a", LoraConfig(rank=4, seed=1))
    _randomize(w, "a", seed=11)
    w.add_adapter("b", LoraConfig(rank=8, seed=2))
    _randomize(w, "b", seed=12)
    _train_eos_adapter(w, "eos")
    yield w


def _prompt(n: int, seed: int) -> list[int]:
    """A prompt of n random byte tokens."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _full_logits(worker: ModelWorker, adapter_id: str | None, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) float32 logits: the HF model on the whole sequence, no cache."""
    ids = torch.tensor([tokens])
    with worker.lora.route(segments_for([adapter_id])):
        out = worker.lora.model(input_ids=ids, use_cache=False)
    return out.logits[0].float()


def _greedy_reference(
    worker: ModelWorker, adapter_id: str | None, prompt: list[int], n: int
) -> tuple[list[int], list[float]]:
    """Greedy decoding recomputing the whole sequence each step; temperature-1 logprobs."""
    tokens = list(prompt)
    out, lps = [], []
    for _ in range(n):
        logits = _full_logits(worker, adapter_id, tokens)[-1]
        token = int(torch.argmax(logits))
        out.append(token)
        lps.append(float(torch.log_softmax(logits, -1)[token]))
        tokens.append(token)
    return out, lps


def _forward_logprobs(
    worker: ModelWorker, adapter_id: str | None, prompt: list[int], completion: list[int]
) -> torch.Tensor:
    """Training forward pass target logprobs of prompt[1:] + completion (forward only)."""
    seq = [*prompt, *completion]
    datum = Datum(
        seq[:-1], {"target_tokens": torch.tensor(seq[1:]), "weights": torch.ones(len(seq) - 1)}
    )
    item = ForwardBackwardInput(adapter_id, [datum], "cross_entropy", forward_only=True)
    return worker.forward_backward([item])[0].loss_fn_outputs[0]["logprobs"]


def _one(worker: ModelWorker, item: SampleInput) -> SampledSequence:
    (out,) = worker.sample([item])
    assert len(out.sequences) == 1
    return out.sequences[0]


def _completion_logits(
    worker: ModelWorker, adapter_id: str | None, prompt: list[int], tokens: list[int]
) -> torch.Tensor:
    """(len(tokens), V) logits of the positions that predicted each completion token."""
    logits = _full_logits(worker, adapter_id, [*prompt, *tokens])
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


# ------------------------------------------------------------------------------------------
# Greedy with the KV cache == greedy recomputing everything


@pytest.mark.parametrize(
    "adapters",
    [
        [None, None, None, None],
        ["a", "a", "a", "a"],
        ["b", None, "a", "b", None, "a"],
    ],
    ids=["base", "one-adapter", "mixed"],
)
def test_greedy_kv_cache_matches_full_recompute(
    worker: ModelWorker, adapters: list[str | None]
) -> None:
    """Left-padded batched KV-cache decoding gives the same greedy tokens (and T=1 logprobs)
    as recomputing the whole sequence, per adapter, also when rows leave the batch early."""
    lengths = [3, 11, 1, 7, 5, 9]
    budgets = [10, 4, 8, 1, 10, 6]  # different max_tokens: rows leave at different steps
    inputs = [
        SampleInput(ad, _prompt(lengths[i], seed=i), SamplingParams(budgets[i], 0.0, stop=NEVER))
        for i, ad in enumerate(adapters)
    ]
    outputs = worker.sample(inputs)
    assert len(outputs) == len(inputs)
    for item, out in zip(inputs, outputs, strict=True):
        (seq,) = out.sequences
        ref_tokens, ref_lps = _greedy_reference(
            worker, item.adapter_id, item.prompt, item.params.max_tokens
        )
        assert seq.tokens == ref_tokens
        assert seq.stop_reason == "length"
        torch.testing.assert_close(
            torch.tensor(seq.logprobs), torch.tensor(ref_lps), atol=1e-4, rtol=0
        )


def test_adapters_change_greedy_output(worker: ModelWorker) -> None:
    """Sanity for the tests above: the random adapters really change what is generated."""
    prompt = _prompt(6, seed=99)
    params = SamplingParams(12, 0.0, stop=NEVER)
    outs = worker.sample([SampleInput(ad, prompt, params) for ad in (None, "a", "b")])
    tokens = [o.sequences[0].tokens for o in outs]
    assert tokens[0] != tokens[1] and tokens[0] != tokens[2] and tokens[1] != tokens[2]


# ------------------------------------------------------------------------------------------
# Logprob semantics


def test_sampled_logprobs_match_training_forward(worker: ModelWorker) -> None:
    """At temperature 1 the sampled tokens' logprobs equal the training forward pass's target
    logprobs for the same tokens and adapter (mixed adapters in one sampling batch)."""
    adapters = [None, "a", "b", "a"]
    inputs = [
        SampleInput(ad, _prompt(4 + 3 * i, seed=20 + i), SamplingParams(12, 1.0, seed=i))
        for i, ad in enumerate(adapters)
    ]
    outputs = worker.sample(inputs)
    for item, out in zip(inputs, outputs, strict=True):
        (seq,) = out.sequences
        assert len(seq.tokens) == len(seq.logprobs) > 0
        lp = _forward_logprobs(worker, item.adapter_id, item.prompt, seq.tokens)
        sampled = lp[len(item.prompt) - 1 :]
        torch.testing.assert_close(torch.tensor(seq.logprobs), sampled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
@pytest.mark.parametrize("adapter_id", [None, "a"])
def test_logprobs_are_temperature_scaled(
    worker: ModelWorker, temperature: float, adapter_id: str | None
) -> None:
    """At temperature T != 1, each sampled logprob is log_softmax(logits / T)[token]."""
    prompt = _prompt(5, seed=31)
    params = SamplingParams(10, temperature, seed=7, stop=NEVER)
    (out,) = worker.sample([SampleInput(adapter_id, prompt, params, num_samples=3)])
    for seq in out.sequences:
        logits = _completion_logits(worker, adapter_id, prompt, seq.tokens)
        expected = torch.log_softmax(logits / temperature, -1)
        expected = expected.gather(1, torch.tensor(seq.tokens).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(10, 1.0, top_k=1, seed=1, stop=NEVER),
        SamplingParams(10, 1.0, top_p=1e-6, seed=2, stop=NEVER),
        SamplingParams(10, 1.3, top_k=1, top_p=0.9, seed=3, stop=NEVER),
    ],
    ids=["top_k=1", "top_p=tiny", "top_k=1,T=1.3"],
)
def test_degenerate_truncation_is_greedy(worker: ModelWorker, params: SamplingParams) -> None:
    """top_k=1 or a tiny top_p draws the greedy tokens, and the reported logprobs are the
    untruncated log_softmax(logits / T) values (not 0, as a truncated distribution would give)."""
    prompt = _prompt(6, seed=41)
    (out,) = worker.sample([SampleInput("a", prompt, params, num_samples=3)])
    greedy, _ = _greedy_reference(worker, "a", prompt, params.max_tokens)
    logits = _completion_logits(worker, "a", prompt, greedy)
    expected = torch.log_softmax(logits / params.temperature, -1)
    expected = expected.gather(1, torch.tensor(greedy).unsqueeze(1)).squeeze(1)
    assert (expected < -1e-3).all()  # so "untruncated" is distinguishable from 0
    for seq in out.sequences:
        assert seq.tokens == greedy
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=1e-4, rtol=0)


def test_top_k_restricts_draws_but_not_logprobs(worker: ModelWorker) -> None:
    """With top_k=3 every drawn token is among the 3 most likely, yet its reported logprob is
    from the full temperature-scaled distribution; without top_k, draws leave the top 3."""
    prompt = _prompt(4, seed=51)
    k, t = 3, 1.5
    restricted = SamplingParams(12, t, top_k=k, seed=5, stop=NEVER)
    free = SamplingParams(12, t, seed=5, stop=NEVER)
    out_k, out_free = worker.sample(
        [SampleInput(None, prompt, restricted, 8), SampleInput(None, prompt, free, 8)]
    )
    outside = 0
    for seq_k, seq_free in zip(out_k.sequences, out_free.sequences, strict=True):
        logits = _completion_logits(worker, None, prompt, seq_k.tokens)
        top = torch.topk(logits, k, dim=-1).indices
        tokens = torch.tensor(seq_k.tokens).unsqueeze(1)
        assert (top == tokens).any(dim=1).all()
        expected = torch.log_softmax(logits / t, -1).gather(1, tokens).squeeze(1)
        torch.testing.assert_close(torch.tensor(seq_k.logprobs), expected, atol=1e-4, rtol=0)
        free_logits = _completion_logits(worker, None, prompt, seq_free.tokens)
        free_top = torch.topk(free_logits, k, dim=-1).indices
        outside += int((~(free_top == torch.tensor(seq_free.tokens).unsqueeze(1)).any(1)).sum())
    assert outside > 0  # the flat random model draws outside the top 3 when unrestricted


def test_top_p_restricts_draws_to_nucleus(worker: ModelWorker) -> None:
    """With top_p=0.3 each drawn token is in the nucleus: the probability mass of the tokens
    strictly more likely than it is below 0.3; its logprob is still the full distribution's."""
    prompt = _prompt(4, seed=61)
    top_p = 0.3
    params = SamplingParams(12, 1.0, top_p=top_p, seed=9, stop=NEVER)
    (out,) = worker.sample([SampleInput("b", prompt, params, num_samples=6)])
    for seq in out.sequences:
        logits = _completion_logits(worker, "b", prompt, seq.tokens)
        probs = torch.softmax(logits, -1)
        tokens = torch.tensor(seq.tokens).unsqueeze(1)
        p_tok = probs.gather(1, tokens)
        mass_before = (probs * (probs > p_tok)).sum(-1)
        assert (mass_before < top_p + 1e-5).all()
        expected = torch.log(p_tok).squeeze(1)
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=1e-4, rtol=0)


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> tuple[set[int], float]:
    """The set of tokens drawn in n draws from `logits`, and the logprob reported for token 0."""
    gen = torch.Generator().manual_seed(0)
    seen: set[int] = set()
    lp0 = float("nan")
    for _ in range(n):
        token, lp = choose_token(logits, params, gen)
        seen.add(token)
        if token == 0:
            lp0 = lp
    return seen, lp0


def test_top_p_nucleus_on_known_distribution() -> None:
    """top_p keeps the smallest set of most likely tokens whose mass reaches top_p."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    seen, lp0 = _draws(torch.log(probs), SamplingParams(1, 1.0, top_p=0.75))
    assert seen == {0, 1}
    assert lp0 == pytest.approx(float(torch.log(probs[0])), abs=1e-6)


def test_top_p_applies_to_top_k_renormalized() -> None:
    """With both top_k and top_p, the nucleus is taken over the top-k tokens' renormalized
    distribution (as HF and vLLM do): top_k=2 of (0.3, 0.2, ...) is (0.6, 0.4), so top_p=0.55
    keeps only the first token. The reported logprob stays the untruncated log(0.3)."""
    probs = torch.tensor([0.3, 0.2, *([0.05] * 10)])
    seen, lp0 = _draws(torch.log(probs), SamplingParams(1, 1.0, top_k=2, top_p=0.55))
    assert seen == {0}
    assert lp0 == pytest.approx(float(torch.log(probs[0])), abs=1e-6)
    seen, _ = _draws(torch.log(probs), SamplingParams(1, 1.0, top_k=2, top_p=0.65))
    assert seen == {0, 1}


# ------------------------------------------------------------------------------------------
# The batched inverse-CDF draw (`sampling.choose_tokens`)


def _truncated(probs: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """`probs` restricted to the ids `keep` and renormalized."""
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


def test_batched_draw_follows_each_rows_distribution() -> None:
    """One `choose_tokens` call over rows of four kinds (plain, temperature 0.5, top_k=3,
    top_p=0.75), each row with its own seeded generator: every kind's empirical frequencies
    match its (truncated, renormalized) distribution within 5 standard errors, and ids of
    zero probability (first, middle, last: -inf logits) are never drawn. 600 ids: the draw
    crosses blocks of `DRAW_BLOCK` and pads the last one."""
    vocab, n = 600, 4000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
    logits[:20] += 4.0  # a few likely ids, a long tail spread over every block
    logits[[0, 255, 256, 599]] = float("-inf")
    logits = logits.float()
    p1 = torch.softmax(logits.double(), -1)
    p_half = torch.softmax(logits.double() / 0.5, -1)
    top3 = torch.topk(p1, 3).indices.tolist()
    order = torch.argsort(p1, descending=True)
    before = torch.cumsum(p1[order], 0) - p1[order]  # mass of the more likely ids
    nucleus = order[before < 0.75].tolist()
    kinds = [
        (SamplingParams(1, 1.0), p1),
        (SamplingParams(1, 0.5), p_half),
        (SamplingParams(1, 1.0, top_k=3), _truncated(p1, top3)),
        (SamplingParams(1, 1.0, top_p=0.75), _truncated(p1, nucleus)),
    ]
    draws = [
        sampling.Draw(kinds[i % 4][0], torch.Generator().manual_seed(1000 + i))
        for i in range(4 * n)
    ]
    tokens = torch.tensor(
        [c.token for c in sampling.choose_tokens(logits.expand(4 * n, vocab).clone(), draws)]
    )
    assert 1 < len(nucleus) < vocab // 2
    for k, (_, expected) in enumerate(kinds):
        freq = torch.bincount(tokens[k::4], minlength=vocab).double() / n
        assert (freq[expected == 0] == 0).all(), k
        bound = 5 * torch.sqrt(expected * (1 - expected) / n) + 1 / n
        assert ((freq - expected).abs() <= bound).all(), (k, float((freq - expected).abs().max()))


def test_inverse_cdf_edges_pick_ids_of_nonzero_weight() -> None:
    """u at 0 and just below 1 (where u x total can round onto the total), with zero-weight
    ids leading, trailing and between blocks, and unnormalized weights: the draw is the first
    or last id of nonzero weight, never a zero-weight id or one past the vocabulary."""
    vocab = 2 * sampling.DRAW_BLOCK + 7
    weights = torch.zeros(3, vocab)
    weights[0, [3, 300, vocab - 9]] = torch.tensor([0.2, 1e-30, 5.0])
    weights[1, sampling.DRAW_BLOCK - 1] = 1.0  # a single id, the last of its block
    weights[2, :] = 1.0 / vocab
    weights[2, :5] = 0.0
    last = float(1 - 2**-53)
    for u, want in [(0.0, [3, sampling.DRAW_BLOCK - 1, 5]), (last, [vocab - 9, 255, vocab - 1])]:
        ids, total = sampling._inverse_cdf(weights, torch.full((3,), u, dtype=torch.float64))
        assert ids.tolist() == want
        torch.testing.assert_close(total, weights.double().sum(-1))
    # A target just past a block's end lands in the next block's first nonzero id.
    u = torch.tensor([0.2 / (5.2 + 1e-30)], dtype=torch.float64)
    ids, _ = sampling._inverse_cdf(weights[:1], u)
    assert weights[0, int(ids[0])] > 0


def test_a_rows_draws_depend_on_its_seed_only() -> None:
    """A seeded row gives the same tokens and logprobs over 20 steps alone and among batch
    mates of other params (greedy, top-k/top-p, another temperature, top-K logprobs)."""
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(5, 300, generator=gen) for _ in range(20)]
    params = SamplingParams(1, 0.9, top_k=40)
    mates = [
        SamplingParams(1, 0.0),
        SamplingParams(1, 1.3, top_p=0.8),
        SamplingParams(1, 1.0),
        SamplingParams(1, 0.7, top_k=5, top_p=0.5),
    ]
    alone = torch.Generator().manual_seed(77)
    batched = torch.Generator().manual_seed(77)
    others = [torch.Generator().manual_seed(i) for i in range(4)]
    for logits in steps:
        [a] = sampling.choose_tokens(logits[2:3], [sampling.Draw(params, alone)])
        draws = [sampling.Draw(p, g, 3) for p, g in zip(mates, others, strict=True)]
        draws.insert(2, sampling.Draw(params, batched))
        b = sampling.choose_tokens(logits, draws)[2]
        assert b.token == a.token
        assert b.logprob == pytest.approx(a.logprob, abs=1e-6)
        assert b.behaviour_logprob == pytest.approx(a.behaviour_logprob, abs=1e-6)
        assert b.base_logprob == pytest.approx(a.base_logprob, abs=1e-6)


# ------------------------------------------------------------------------------------------
# Seeds and num_samples


def test_seed_reproducible_alone_and_batched(worker: ModelWorker) -> None:
    """Same request + seed gives the same tokens whether sampled alone or batched with other
    requests (other lengths, adapters, params); another seed gives different tokens."""
    prompt = _prompt(5, seed=71)
    item = SampleInput("a", prompt, SamplingParams(16, 1.0, seed=1234, stop=NEVER))
    alone = _one(worker, item)
    others = [
        SampleInput(None, _prompt(9, seed=72), SamplingParams(5, 0.8, seed=1, stop=NEVER)),
        SampleInput("b", _prompt(2, seed=73), SamplingParams(20, 1.0, stop=NEVER), 2),
    ]
    batched = worker.sample([others[0], item, others[1]])[1].sequences[0]
    again = _one(worker, item)
    assert batched.tokens == alone.tokens == again.tokens
    torch.testing.assert_close(
        torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0
    )
    other_seed = SampleInput("a", prompt, SamplingParams(16, 1.0, seed=4321, stop=NEVER))
    assert _one(worker, other_seed).tokens != alone.tokens


def test_large_seed_accepted(worker: ModelWorker) -> None:
    """Any 64-bit seed value works and is reproducible (the protocol allows up to 2**64-1)."""
    params = SamplingParams(8, 1.0, seed=2**64 - 1, stop=NEVER)
    item = SampleInput(None, _prompt(3, seed=74), params)
    assert _one(worker, item).tokens == _one(worker, item).tokens


def test_no_seed_is_random(worker: ModelWorker) -> None:
    """Without a seed two identical requests (almost surely) sample different tokens."""
    item = SampleInput(None, _prompt(3, seed=75), SamplingParams(16, 1.0, stop=NEVER))
    assert _one(worker, item).tokens != _one(worker, item).tokens


def test_num_samples_gives_distinct_sequences(worker: ModelWorker) -> None:
    """num_samples=N returns N sequences, which differ from each other, and the same N again
    with the same seed."""
    item = SampleInput("b", _prompt(6, seed=76), SamplingParams(12, 1.0, seed=3, stop=NEVER), 5)
    (out,) = worker.sample([item])
    assert len(out.sequences) == 5
    tokens = [tuple(s.tokens) for s in out.sequences]
    assert len(set(tokens)) == 5
    assert all(
        len(t) == 12 and s.stop_reason == "length"
        for t, s in zip(tokens, out.sequences, strict=True)
    )
    (again,) = worker.sample([item])
    assert [tuple(s.tokens) for s in again.sequences] == tokens


# ------------------------------------------------------------------------------------------
# Stopping


def _eos_prompt(worker: ModelWorker) -> list[int]:
    return worker.base.tokenizer.encode(EOS_PROMPT)


def test_trained_adapter_answers_then_eos(worker: ModelWorker) -> None:
    """stop=None stops at EOS: the tokens end with EOS and stop_reason is "stop"."""
    tok = worker.base.tokenizer
    eos = worker.info.eos_token_ids[0]
    seq = _one(worker, SampleInput("eos", _eos_prompt(worker), SamplingParams(30, 0.0)))
    assert seq.tokens == [*tok.encode(EOS_ANSWER), eos]
    assert seq.stop_reason == "stop"
    assert len(seq.logprobs) == len(seq.tokens)


def test_empty_stop_ignores_eos(worker: ModelWorker) -> None:
    """stop=() never stops early: generation runs through EOS to max_tokens ("length")."""
    tok = worker.base.tokenizer
    eos = worker.info.eos_token_ids[0]
    answer = tok.encode(EOS_ANSWER)
    n = len(answer) + 6
    seq = _one(worker, SampleInput("eos", _eos_prompt(worker), SamplingParams(n, 0.0, stop=())))
    assert len(seq.tokens) == len(seq.logprobs) == n
    assert seq.tokens[: len(answer) + 1] == [*answer, eos]
    assert seq.stop_reason == "length"


def test_eos_sampled_at_temperature_one(worker: ModelWorker) -> None:
    """EOS also stops random sampling (stop=None); its logprob is reported like any token."""
    eos = worker.info.eos_token_ids[0]
    params = SamplingParams(60, 1.0, seed=0)
    (out,) = worker.sample([SampleInput("eos", _eos_prompt(worker), params, num_samples=4)])
    stopped = [s for s in out.sequences if s.stop_reason == "stop"]
    assert stopped, "the trained adapter should reach EOS"
    for s in stopped:
        assert s.tokens[-1] == eos and eos not in s.tokens[:-1]
    for s in out.sequences:
        if s.stop_reason == "length":
            assert len(s.tokens) == 60 and eos not in s.tokens


def test_stop_token_ids(worker: ModelWorker) -> None:
    """A stop token id ends generation right after its first occurrence, inclusive."""
    prompt = _prompt(5, seed=81)
    greedy = _one(worker, SampleInput(None, prompt, SamplingParams(16, 0.0, stop=NEVER))).tokens
    stop_tok = greedy[5]
    cut = greedy.index(stop_tok) + 1
    never = next(t for t in range(256) if t not in greedy)
    seq = _one(worker, SampleInput(None, prompt, SamplingParams(16, 0.0, stop=(never, stop_tok))))
    assert seq.tokens == greedy[:cut]
    assert seq.stop_reason == "stop"
    seq = _one(worker, SampleInput(None, prompt, SamplingParams(16, 0.0, stop=(never,))))
    assert seq.tokens == greedy
    assert seq.stop_reason == "length"


@pytest.mark.parametrize(
    ("stop", "expected_text"),
    [
        (("lo w",), " hello w"),  # spans several tokens
        (("zzz", "wor", "l"), " hel"),  # first string to appear wins
        (("world",), " hello world"),
    ],
)
def test_stop_strings(worker: ModelWorker, stop: tuple[str, ...], expected_text: str) -> None:
    """A stop string ends generation as soon as the decoded output contains it; the tokens
    include it, so the decoded text ends with it."""
    tok = worker.base.tokenizer
    seq = _one(worker, SampleInput("eos", _eos_prompt(worker), SamplingParams(30, 0.0, stop=stop)))
    text = tok.decode(seq.tokens)
    assert text == expected_text
    assert any(text.endswith(s) for s in stop)
    assert seq.stop_reason == "stop"
    assert len(seq.logprobs) == len(seq.tokens)


def test_stop_string_absent_runs_to_length(worker: ModelWorker) -> None:
    """A stop string that never appears lets generation run to max_tokens."""
    prompt = _prompt(4, seed=82)
    seq = _one(worker, SampleInput(None, prompt, SamplingParams(9, 0.0, stop=("\x00\x01\x02",))))
    assert len(seq.tokens) == 9
    assert seq.stop_reason == "length"


def test_max_tokens_respected(worker: ModelWorker) -> None:
    """Each request gets at most its own max_tokens, in one batch; max_tokens=0 gives an
    empty "length" sequence."""
    budgets = [0, 1, 2, 7]
    inputs = [
        SampleInput("a", _prompt(3 + i, seed=90 + i), SamplingParams(n, 1.0, seed=i, stop=NEVER))
        for i, n in enumerate(budgets)
    ]
    outputs = worker.sample(inputs)
    for n, out in zip(budgets, outputs, strict=True):
        (seq,) = out.sequences
        assert len(seq.tokens) == len(seq.logprobs) == n
        assert seq.stop_reason == "length"


def test_num_samples_zero(worker: ModelWorker) -> None:
    """num_samples=0 gives no sequences (alone, and next to a normal request)."""
    params = SamplingParams(3, 0.0, stop=NEVER)
    (alone,) = worker.sample([SampleInput(None, [1, 2], params, num_samples=0)])
    assert alone.sequences == []
    empty, full = worker.sample(
        [SampleInput("a", [1, 2], params, num_samples=0), SampleInput(None, [3, 4, 5], params)]
    )
    assert empty.sequences == []
    assert len(full.sequences[0].tokens) == 3


def test_context_length_caps_generation(worker: ModelWorker) -> None:
    """A prompt near the context length generates only up to the context ("length")."""
    ctx = worker.info.context_length
    prompt = _prompt(ctx - 3, seed=95)
    seq = _one(worker, SampleInput(None, prompt, SamplingParams(10, 0.0, stop=NEVER)))
    assert len(seq.tokens) == 3
    assert seq.stop_reason == "length"


# ------------------------------------------------------------------------------------------
# Prompt logprobs


def test_prompt_logprobs_and_topk(worker: ModelWorker) -> None:
    """prompt_logprobs has len(prompt) entries, None first, equal to the training forward
    pass's target logprobs; topk_prompt_logprobs has K (id, logprob) entries per position,
    sorted descending, matching the full distribution's top K, None first."""
    k = 5
    adapters = ["b", None, "a"]
    inputs = [
        SampleInput(
            ad,
            _prompt(4 + 5 * i, seed=100 + i),
            SamplingParams(3, 1.0, seed=i),
            prompt_logprobs=True,
            topk_prompt_logprobs=k,
        )
        for i, ad in enumerate(adapters)
    ]
    outputs: list[SampleOutput] = worker.sample(inputs)
    for item, out in zip(inputs, outputs, strict=True):
        n = len(item.prompt)
        assert out.prompt_logprobs is not None and out.topk_prompt_logprobs is not None
        assert len(out.prompt_logprobs) == len(out.topk_prompt_logprobs) == n
        assert out.prompt_logprobs[0] is None and out.topk_prompt_logprobs[0] is None
        expected = _forward_logprobs(worker, item.adapter_id, item.prompt[:-1], item.prompt[-1:])
        got = torch.tensor(out.prompt_logprobs[1:])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        full = torch.log_softmax(_full_logits(worker, item.adapter_id, item.prompt), -1)
        for pos in range(1, n):
            entries = out.topk_prompt_logprobs[pos]
            assert entries is not None and len(entries) == k
            ids = [t for t, _ in entries]
            lps = [lp for _, lp in entries]
            assert lps == sorted(lps, reverse=True)
            assert lps[0] >= out.prompt_logprobs[pos] - 1e-6
            ref = torch.topk(full[pos - 1], k)
            assert ids == ref.indices.tolist()
            torch.testing.assert_close(torch.tensor(lps), ref.values, atol=1e-4, rtol=0)
            actual = item.prompt[pos]
            if actual in ids:
                assert lps[ids.index(actual)] == pytest.approx(out.prompt_logprobs[pos], abs=1e-5)


def test_prompt_logprobs_off_and_single_token(worker: ModelWorker) -> None:
    """Prompt logprobs are absent unless asked for; a one-token prompt gives [None]."""
    (off,) = worker.sample([SampleInput(None, _prompt(4, seed=110), SamplingParams(2, 0.0))])
    assert off.prompt_logprobs is None and off.topk_prompt_logprobs is None
    item = SampleInput(
        "a", [65], SamplingParams(2, 0.0), prompt_logprobs=True, topk_prompt_logprobs=3
    )
    (one,) = worker.sample([item])
    assert one.prompt_logprobs == [None]
    assert one.topk_prompt_logprobs == [None]


def test_eos_stops_even_with_stop_strings(worker: ModelWorker) -> None:
    """Stop strings or ids add to EOS (the cookbook's role_colon parser expects an
    EOS-terminated response when its "\\n\\nUser:" stop string never appears)."""
    eos = worker.info.eos_token_ids[0]
    for stop in (("never appears",), (5,)):
        seq = _one(
            worker, SampleInput("eos", _eos_prompt(worker), SamplingParams(30, 0.0, stop=stop))
        )
        assert seq.tokens[-1] == eos
        assert seq.stop_reason == "stop"
        assert worker.base.tokenizer.decode(seq.tokens[:-1]) == EOS_ANSWER


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [1, 100_000]}, "outside [0, 320)"),
        ({"prompt": [1] * 600}, "context is 512"),
        ({"num_samples": 0}, "num_samples"),
        ({"params": SamplingParams(max_tokens=-1)}, "max_tokens"),
        ({"params": SamplingParams(temperature=-0.5)}, "temperature"),
        ({"params": SamplingParams(temperature=float("nan"))}, "temperature"),
        ({"params": SamplingParams(top_p=0.0)}, "top_p"),
        ({"params": SamplingParams(top_p=1.5)}, "top_p"),
        ({"params": SamplingParams(top_k=0)}, "top_k"),
        ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs"),
    ],
)
def test_invalid_sample_inputs_are_rejected(
    worker: ModelWorker, change: dict, message: str
) -> None:
    """validate_sample names the field and the problem before anything runs."""
    fields = {"adapter_id": None, "prompt": [1, 2, 3], "params": SamplingParams(), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        worker.validate_sample(SampleInput(**fields))


def test_unknown_adapter_is_rejected(worker: ModelWorker) -> None:
    with pytest.raises(KeyError):
        worker.validate_sample(SampleInput("no-such-adapter", [1, 2], SamplingParams()))


# --------------------------------------------------------------------------------------------
# Extras: topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens, prompt_logprobs_last_n


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_topk_sample_logprobs_match_full_forward(worker: ModelWorker, temperature: float) -> None:
    """Per sampled token: the top K of the distribution its logprob comes from
    (softmax(logits / T), pre-truncation; T = 0 reports T = 1), from a full recompute."""
    k = 6
    prompt = _prompt(7, seed=300)
    params = SamplingParams(5, temperature, top_k=3, stop=NEVER, seed=4)
    seq = _one(worker, SampleInput("a", prompt, params, topk_sample_logprobs=k))
    assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens) == 5
    logits = _completion_logits(worker, "a", prompt, seq.tokens)
    scaled = logits / temperature if temperature > 0 else logits
    full = torch.log_softmax(scaled, -1)
    for pos, (token, lp, entries) in enumerate(
        zip(seq.tokens, seq.logprobs, seq.topk_logprobs, strict=True)
    ):
        ids = [t for t, _ in entries]
        lps = [v for _, v in entries]
        ref = torch.topk(full[pos], k)
        assert ids == ref.indices.tolist()
        torch.testing.assert_close(torch.tensor(lps), ref.values, atol=1e-4, rtol=0)
        assert lps[0] >= lp - 1e-6
        assert token in ids  # top_k=3 < K: the drawn token is always among them
        assert lps[ids.index(token)] == pytest.approx(lp, abs=1e-5)


def test_topk_sample_logprobs_off_and_clamped(worker: ModelWorker) -> None:
    """Absent unless asked for; K above the vocabulary gives the whole (sorted) vocabulary."""
    prompt = _prompt(4, seed=301)
    off = _one(worker, SampleInput(None, prompt, SamplingParams(2, 1.0, seed=1)))
    assert off.topk_logprobs is None
    vocab = worker.info.vocab_size
    seq = _one(
        worker,
        SampleInput(None, prompt, SamplingParams(2, 1.0, seed=1), topk_sample_logprobs=vocab + 5),
    )
    assert seq.tokens == off.tokens  # asking for top-k does not change the draws
    assert seq.topk_logprobs is not None
    for entries in seq.topk_logprobs:
        assert len(entries) == vocab
        assert sum(torch.tensor([v for _, v in entries]).exp().tolist()) == pytest.approx(1, 1e-4)


def test_target_prompt_logprobs_match_full_forward(worker: ModelWorker) -> None:
    """Cell [i, j] is the temperature-1 logprob of id target[i, j] at prompt position i + 1;
    -1 cells are 0.0; batched with other requests and adapters."""
    vocab = worker.info.vocab_size
    items = []
    for i, ad in enumerate(["b", None, "a"]):
        prompt = _prompt(5 + 4 * i, seed=310 + i)
        gen = torch.Generator().manual_seed(i)
        target = torch.randint(0, vocab, (len(prompt) - 1, 3), generator=gen)
        target[:, 0] = torch.tensor(prompt[1:])  # the actual tokens: equals prompt logprobs
        target[0, :] = -1  # an unrequested first row
        target[-1, 1] = -1
        params = SamplingParams(2, 0.9, seed=i)
        items.append(SampleInput(ad, prompt, params, prompt_logprobs=True))
        items[-1].target_prompt_logprobs = target
    outputs = worker.sample(items)
    for item, out in zip(items, outputs, strict=True):
        target = item.target_prompt_logprobs
        assert target is not None and out.target_prompt_logprobs is not None
        got = out.target_prompt_logprobs
        assert got.shape == target.shape and got.dtype == torch.float32
        full = torch.log_softmax(_full_logits(worker, item.adapter_id, item.prompt), -1)[:-1]
        ref = full.gather(1, target.clamp(min=0))
        ref = torch.where(target >= 0, ref, torch.zeros_like(ref))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert (got[target == -1] == 0).all()
        assert out.prompt_logprobs is not None
        torch.testing.assert_close(
            got[1:, 0], torch.tensor(out.prompt_logprobs[2:]), atol=1e-5, rtol=0
        )


def _alt_item(prompt: list[int], temperature: float, seed: int | None, k: int = 4) -> SampleInput:
    return SampleInput(
        "a", prompt, SamplingParams(1, temperature, seed=seed), prompt_alt_tokens_k=k
    )


def test_prompt_alt_tokens_logprobs_and_seed(worker: ModelWorker) -> None:
    """[len(prompt) - 1, K] draws; each logprob is the draw's logprob under
    softmax(logits / T) at that position; the same seed gives the same draws (alone or
    batched), another seed or none other draws."""
    prompt = _prompt(9, seed=320)
    k, temperature = 4, 0.8
    (out,) = worker.sample([_alt_item(prompt, temperature, seed=5, k=k)])
    tokens, lps = out.prompt_alt_tokens, out.prompt_alt_logprobs
    assert tokens is not None and lps is not None
    assert tokens.shape == lps.shape == (len(prompt) - 1, k)
    assert tokens.dtype == torch.int64 and lps.dtype == torch.float32
    full = torch.log_softmax(_full_logits(worker, "a", prompt)[:-1] / temperature, -1)
    torch.testing.assert_close(lps, full.gather(1, tokens), atol=1e-4, rtol=0)
    assert len(set(tokens.flatten().tolist())) > k  # real draws, not one token repeated

    other = SampleInput(None, _prompt(20, seed=321), SamplingParams(3, 1.0, seed=1))
    _, again = worker.sample([other, _alt_item(prompt, temperature, seed=5, k=k)])
    assert again.prompt_alt_tokens is not None
    assert torch.equal(again.prompt_alt_tokens, tokens)
    (reseeded,) = worker.sample([_alt_item(prompt, temperature, seed=6, k=k)])
    assert not torch.equal(reseeded.prompt_alt_tokens, tokens)
    (unseeded,) = worker.sample([_alt_item(prompt, temperature, seed=None, k=k)])
    assert not torch.equal(unseeded.prompt_alt_tokens, tokens)


def test_prompt_alt_tokens_follow_the_distribution(worker: ModelWorker) -> None:
    """Many draws at one position: empirical frequencies approach softmax(logits / T)."""
    prompt = _prompt(3, seed=322)
    temperature, k = 1.5, 4000
    (out,) = worker.sample([_alt_item(prompt, temperature, seed=9, k=k)])
    assert out.prompt_alt_tokens is not None
    probs = torch.softmax(_full_logits(worker, "a", prompt)[1] / temperature, -1)
    counts = torch.bincount(out.prompt_alt_tokens[1], minlength=probs.shape[0]).float() / k
    assert (counts - probs).abs().max() < 0.03  # ~5 sigma for p ~ 0.1 at n = 4000
    assert 0.5 * (counts - probs).abs().sum() < 0.15


def test_prompt_alt_tokens_greedy_and_short_prompt(worker: ModelWorker) -> None:
    """Temperature 0: the argmax K times with its temperature-1 logprob; a one-token
    prompt gives empty [0, K] tensors."""
    prompt = _prompt(6, seed=323)
    (out,) = worker.sample([_alt_item(prompt, 0.0, seed=None, k=3)])
    full = torch.log_softmax(_full_logits(worker, "a", prompt)[:-1], -1)
    best = full.argmax(-1, keepdim=True).expand(-1, 3)
    assert out.prompt_alt_tokens is not None and out.prompt_alt_logprobs is not None
    assert torch.equal(out.prompt_alt_tokens, best)
    torch.testing.assert_close(out.prompt_alt_logprobs, full.gather(1, best), atol=1e-4, rtol=0)
    (one,) = worker.sample([_alt_item([65], 1.0, seed=1, k=3)])
    assert one.prompt_alt_tokens is not None and one.prompt_alt_tokens.shape == (0, 3)


@pytest.mark.parametrize("last_n", [1, 3, 7])
def test_prompt_logprobs_last_n(worker: ModelWorker, last_n: int) -> None:
    """Only the last N prompt positions are scored (earlier None), for prompt_logprobs and
    topk_prompt_logprobs; the scored ones equal the full run's."""
    prompt = _prompt(8, seed=330)
    params = SamplingParams(2, 1.0, seed=3)
    full, part = worker.sample(
        [
            SampleInput("b", prompt, params, prompt_logprobs=True, topk_prompt_logprobs=3),
            SampleInput(
                "b",
                prompt,
                params,
                prompt_logprobs=True,
                topk_prompt_logprobs=3,
                prompt_logprobs_last_n=last_n,
            ),
        ]
    )
    assert part.prompt_logprobs is not None and part.topk_prompt_logprobs is not None
    assert full.prompt_logprobs is not None and full.topk_prompt_logprobs is not None
    n = len(prompt)
    assert len(part.prompt_logprobs) == len(part.topk_prompt_logprobs) == n
    assert part.prompt_logprobs[: n - last_n] == [None] * (n - last_n)
    assert part.topk_prompt_logprobs[: n - last_n] == [None] * (n - last_n)
    assert part.prompt_logprobs[n - last_n :] == pytest.approx(full.prompt_logprobs[n - last_n :])
    tail = n - last_n
    for got, ref in zip(
        part.topk_prompt_logprobs[tail:], full.topk_prompt_logprobs[tail:], strict=True
    ):
        assert got is not None and ref is not None
        assert [t for t, _ in got] == [t for t, _ in ref]
    assert part.sequences[0].tokens == full.sequences[0].tokens


def test_extras_do_not_change_sampling(worker: ModelWorker) -> None:
    """Asking for every extra leaves the seeded sampled tokens and logprobs as they were."""
    prompt = _prompt(6, seed=340)
    params = SamplingParams(6, 1.0, stop=NEVER, seed=8)
    plain = _one(worker, SampleInput("a", prompt, params, num_samples=1))
    target = torch.full((len(prompt) - 1, 2), -1)
    target[-1, 0] = 3
    extra = SampleInput(
        "a",
        prompt,
        params,
        prompt_logprobs=True,
        topk_prompt_logprobs=2,
        topk_sample_logprobs=2,
        target_prompt_logprobs=target,
        prompt_alt_tokens_k=2,
        prompt_logprobs_last_n=2,
    )
    seq = _one(worker, extra)
    assert seq.tokens == plain.tokens
    assert seq.logprobs == pytest.approx(plain.logprobs, abs=1e-6)


def _target(rows: int, k: int = 2) -> torch.Tensor:
    t = torch.full((rows, k), -1, dtype=torch.int64)
    t[0, 0] = 5
    return t


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs must be >= 0"),
        ({"topk_sample_logprobs": 1 << 20, "num_samples": 8}, "topk_sample_logprobs=1048576"),
        ({"prompt_alt_tokens_k": -2}, "prompt_alt_tokens_k must be >= 0"),
        ({"prompt_alt_tokens_k": 1 << 21}, "prompt_alt_tokens_k=2097152"),
        ({"topk_prompt_logprobs": 1 << 21}, "topk_prompt_logprobs=2097152"),
        ({"prompt_logprobs_last_n": 1}, "prompt_logprobs_last_n requires prompt_logprobs"),
        (
            {"prompt_logprobs": True, "prompt_logprobs_last_n": 0},
            "prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = 2, got 0",
        ),
        (
            {"prompt_logprobs": True, "prompt_logprobs_last_n": 3},
            "prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = 2, got 3",
        ),
        (
            {"prompt": [1], "prompt_logprobs": True, "prompt_logprobs_last_n": 1},
            "prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = 0",
        ),
        (
            {"target_prompt_logprobs": _target(2).float()},
            "target_prompt_logprobs must be an int64",
        ),
        ({"target_prompt_logprobs": _target(3)}, "target_prompt_logprobs must have shape"),
        (
            {"target_prompt_logprobs": torch.full((2, 0), -1)},
            "target_prompt_logprobs must have shape",
        ),
        (
            {"target_prompt_logprobs": torch.tensor([5, 6])},
            "target_prompt_logprobs must have shape",
        ),
        (
            {"target_prompt_logprobs": torch.full((2, 2), -1)},
            "target_prompt_logprobs names no token id",
        ),
        (
            {"target_prompt_logprobs": torch.tensor([[5, 320], [-1, -1]])},
            "target_prompt_logprobs has ids outside [0, 320)",
        ),
        (
            {"target_prompt_logprobs": torch.tensor([[5, -2], [-1, -1]])},
            "target_prompt_logprobs has ids outside",
        ),
    ],
)
def test_invalid_sample_extras_are_rejected(
    worker: ModelWorker, change: dict, message: str
) -> None:
    fields = {"adapter_id": None, "prompt": [1, 2, 3], "params": SamplingParams(), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        worker.validate_sample(SampleInput(**fields))


def test_target_prompt_logprobs_cost_is_bounded(
    worker: ModelWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """len(prompt) x distinct ids is bounded like a top-k width."""
    monkeypatch.setattr(sampling, "MAX_OUTPUT_CELLS", 8)
    item = SampleInput(None, [1, 2, 3], SamplingParams(), target_prompt_logprobs=_target(2))
    worker.validate_sample(item)  # 1 distinct id x 3 tokens
    item.target_prompt_logprobs = torch.tensor([[5, 6], [7, -1]])
    with pytest.raises(ValueError, match=re.escape("3 distinct ids x 3 prompt tokens exceeds 8")):
        worker.validate_sample(item)


def test_extras_across_prompt_chunks(worker: ModelWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny unembedding chunks (3 positions), last_n, target and alt-token outputs line
    up with the full forward across chunk boundaries."""
    monkeypatch.setattr(sampling, "PROMPT_CHUNK", 3)
    prompt = _prompt(12, seed=350)
    target = torch.full((len(prompt) - 1, 2), -1)
    target[4:, 0] = torch.tensor(prompt[5:])
    target[7, 1] = 9
    item = SampleInput(
        "b",
        prompt,
        SamplingParams(1, 0.9, seed=2),
        prompt_logprobs=True,
        topk_prompt_logprobs=2,
        target_prompt_logprobs=target,
        prompt_alt_tokens_k=3,
        prompt_logprobs_last_n=5,
    )
    (out,) = worker.sample([item])
    logits = _full_logits(worker, "b", prompt)[:-1]
    full = torch.log_softmax(logits, -1)
    assert out.prompt_logprobs is not None and out.topk_prompt_logprobs is not None
    assert out.prompt_logprobs[:7] == [None] * 7
    ref = full.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[7:]), ref[6:], atol=1e-4, rtol=0)
    assert [row[0][0] for row in out.topk_prompt_logprobs[7:]] == full[6:].argmax(-1).tolist()
    want = torch.where(target >= 0, full.gather(1, target.clamp(min=0)), torch.zeros(()))
    assert out.target_prompt_logprobs is not None
    torch.testing.assert_close(out.target_prompt_logprobs, want, atol=1e-4, rtol=0)
    assert out.prompt_alt_tokens is not None and out.prompt_alt_logprobs is not None
    scaled = torch.log_softmax(logits / 0.9, -1)
    torch.testing.assert_close(
        out.prompt_alt_logprobs, scaled.gather(1, out.prompt_alt_tokens), atol=1e-4, rtol=0
    )
