"""Sampling extras through the SDK's `sample(...)`: topk_sample_logprobs,
target_prompt_logprobs (dense and CSR), prompt_alt_tokens_k and prompt_logprobs_last_n,
checked against compute_logprobs and against each other; bad values get a 400 naming them."""

import numpy as np
import pytest
import tinker
import torch
from tinker import types

TEXT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def sampler(service_client, server) -> tinker.SamplingClient:
    return service_client.create_sampling_client(base_model=server.model).result()


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    tokens = tokenizer.encode(TEXT)
    assert len(tokens) >= 8
    return tokens


@pytest.fixture(scope="module")
def prompt_lp(sampler: tinker.SamplingClient, prompt: list[int]) -> list[float | None]:
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert lp[0] is None and all(v is not None for v in lp[1:])
    return lp


def _sample(sampler: tinker.SamplingClient, prompt: list[int], **kwargs) -> types.SampleResponse:
    params = kwargs.pop("params", types.SamplingParams(max_tokens=1, temperature=1.0, seed=0))
    return sampler.sample(types.ModelInput.from_ints(prompt), 1, params, **kwargs).result()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_target_prompt_logprobs_equal_compute_logprobs(
    sampler: tinker.SamplingClient, prompt: list[int], prompt_lp: list, sparse: bool
) -> None:
    """Column 0 names the actual next prompt token: its logprob is compute_logprobs'; -1 cells
    come back 0.0, in the request's shape and layout."""
    n, k = len(prompt), 8  # wide enough that the SDK keeps the CSR layout
    ids = torch.full((n - 1, k), -1, dtype=torch.int64)
    ids[1:, 0] = torch.tensor(prompt[2:])  # row 0 names nothing
    ids[-1, 2] = prompt[-1]
    td = (
        types.TensorData.from_torch_sparse(ids, pad_value=-1)
        if sparse
        else types.TensorData.from_torch(ids)
    )
    assert (td.sparse_crow_indices is not None) == sparse
    res = _sample(sampler, prompt, target_prompt_logprobs=td)
    out = res.target_prompt_logprobs
    assert out is not None and out.dtype == "float32" and out.shape == [n - 1, k]
    assert (out.sparse_crow_indices is not None) == sparse
    if sparse:
        assert out.sparse_crow_indices == td.sparse_crow_indices
        assert out.sparse_col_indices == td.sparse_col_indices
    got = out.to_torch()
    np.testing.assert_allclose(got[1:, 0].numpy(), prompt_lp[2:], atol=1e-4)
    assert got[-1, 2].item() == pytest.approx(prompt_lp[-1], abs=1e-4)
    assert (got[ids == -1] == 0).all()
    assert res.prompt_logprobs is None  # not asked for


def test_topk_sample_logprobs(sampler: tinker.SamplingClient, prompt: list[int]) -> None:
    """Each sampled token has K (id, logprob) pairs, sorted; the first >= the token's logprob;
    with K at least the vocabulary the token is among them with its own logprob."""
    params = types.SamplingParams(max_tokens=6, temperature=0.8, seed=3, stop=[])
    res = _sample(sampler, prompt, params=params, topk_sample_logprobs=4)
    seq = res.sequences[0]
    assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens) == 6
    for lp, entries in zip(seq.logprobs, seq.topk_logprobs, strict=True):
        assert entries is not None and len(entries) == 4
        lps = [v for _, v in entries]
        assert lps == sorted(lps, reverse=True)
        assert lps[0] >= lp - 1e-5

    big = _sample(sampler, prompt, params=params, topk_sample_logprobs=1000)
    seq_big = big.sequences[0]
    assert seq_big.tokens == seq.tokens  # same seed, same draws
    assert seq_big.topk_logprobs is not None
    for token, lp, entries in zip(
        seq_big.tokens, seq_big.logprobs, seq_big.topk_logprobs, strict=True
    ):
        assert entries is not None
        table = dict(entries)
        assert table[token] == pytest.approx(lp, abs=1e-5)
        assert entries[0][1] >= lp - 1e-5
        # Temperature-scaled and pre-truncation: a full distribution.
        assert sum(np.exp([v for _, v in entries])) == pytest.approx(1.0, abs=1e-3)
    plain = _sample(sampler, prompt, params=params)
    assert plain.sequences[0].topk_logprobs is None
    assert plain.sequences[0].tokens == seq.tokens


def test_prompt_alt_tokens(sampler: tinker.SamplingClient, prompt: list[int]) -> None:
    """[len(prompt) - 1, k] draws, reproducible with the seed; at temperature 1 their
    logprobs equal target_prompt_logprobs of the same ids."""
    n, k = len(prompt), 5
    res = _sample(sampler, prompt, prompt_alt_tokens_k=k)
    alt = res.prompt_alt_tokens
    assert alt is not None
    assert alt.tokens.dtype == "int64" and alt.tokens.shape == [n - 1, k]
    assert alt.logprobs.dtype == "float32" and alt.logprobs.shape == [n - 1, k]
    tokens, lps = alt.tokens.to_torch(), alt.logprobs.to_torch()
    assert (lps <= 0).all() and torch.isfinite(lps).all()
    again = _sample(sampler, prompt, prompt_alt_tokens_k=k)
    assert again.prompt_alt_tokens is not None
    assert torch.equal(again.prompt_alt_tokens.tokens.to_torch(), tokens)
    scored = _sample(sampler, prompt, target_prompt_logprobs=types.TensorData.from_torch(tokens))
    assert scored.target_prompt_logprobs is not None
    np.testing.assert_allclose(scored.target_prompt_logprobs.to_torch(), lps, atol=1e-4)
    other = _sample(
        sampler,
        prompt,
        params=types.SamplingParams(max_tokens=1, temperature=1.0, seed=1),
        prompt_alt_tokens_k=k,
    )
    assert other.prompt_alt_tokens is not None
    assert not torch.equal(other.prompt_alt_tokens.tokens.to_torch(), tokens)


@pytest.mark.parametrize("last_n", [1, 3])
def test_prompt_logprobs_last_n(
    sampler: tinker.SamplingClient, prompt: list[int], prompt_lp: list, last_n: int
) -> None:
    """Only the last N prompt positions are scored, for prompt and top-k prompt logprobs;
    compute_logprobs(prompt_logprobs_last_n=N) likewise (the SDK checks this too)."""
    n = len(prompt)
    res = _sample(
        sampler,
        prompt,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
        prompt_logprobs_last_n=last_n,
    )
    assert res.prompt_logprobs is not None and res.topk_prompt_logprobs is not None
    assert res.prompt_logprobs[: n - last_n] == [None] * (n - last_n)
    assert res.topk_prompt_logprobs[: n - last_n] == [None] * (n - last_n)
    np.testing.assert_allclose(
        res.prompt_logprobs[n - last_n :], prompt_lp[n - last_n :], atol=1e-4
    )
    assert all(row is not None and len(row) == 2 for row in res.topk_prompt_logprobs[n - last_n :])
    lp = sampler.compute_logprobs(
        types.ModelInput.from_ints(prompt), prompt_logprobs_last_n=last_n
    ).result()
    assert lp[: n - last_n] == [None] * (n - last_n)
    np.testing.assert_allclose(lp[n - last_n :], prompt_lp[n - last_n :], atol=1e-4)


def test_all_extras_together(sampler: tinker.SamplingClient, prompt: list[int]) -> None:
    n = len(prompt)
    ids = torch.full((n - 1, 1), -1, dtype=torch.int64)
    ids[-1, 0] = prompt[-1]
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=7, stop=[])
    res = sampler.sample(
        types.ModelInput.from_ints(prompt),
        2,
        params,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        topk_sample_logprobs=2,
        target_prompt_logprobs=types.TensorData.from_torch_sparse(ids, pad_value=-1),
        prompt_alt_tokens_k=2,
        prompt_logprobs_last_n=2,
    ).result()
    assert len(res.sequences) == 2
    assert all(s.topk_logprobs is not None and len(s.topk_logprobs) == 3 for s in res.sequences)
    assert res.prompt_logprobs is not None
    assert res.target_prompt_logprobs is not None
    assert res.target_prompt_logprobs.to_torch()[-1, 0].item() == pytest.approx(
        res.prompt_logprobs[-1], abs=1e-5
    )
    assert res.prompt_alt_tokens is not None
    assert res.prompt_alt_tokens.tokens.shape == [n - 1, 2]


def _bad_target(rows: int, value: int = 5) -> types.TensorData:
    ids = torch.full((rows, 1), -1, dtype=torch.int64)
    ids[0, 0] = value
    return types.TensorData.from_torch(ids)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"include_prompt_logprobs": True, "prompt_logprobs_last_n": 99}, "prompt_logprobs_last_n"),
        ({"target_prompt_logprobs": "rows"}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": "id"}, "target_prompt_logprobs"),
        ({"target_prompt_logprobs": "empty"}, "target_prompt_logprobs"),
        ({"prompt_alt_tokens_k": 1 << 21}, "prompt_alt_tokens_k"),
        ({"topk_sample_logprobs": 1 << 23}, "topk_sample_logprobs"),
    ],
)
def test_bad_extras_are_rejected(
    sampler: tinker.SamplingClient, prompt: list[int], kwargs: dict, field: str
) -> None:
    n = len(prompt)
    bad = kwargs.get("target_prompt_logprobs")
    if bad == "rows":
        kwargs["target_prompt_logprobs"] = _bad_target(n)
    elif bad == "id":
        kwargs["target_prompt_logprobs"] = _bad_target(n - 1, value=10**9)
    elif bad == "empty":
        kwargs["target_prompt_logprobs"] = types.TensorData.from_torch(
            torch.full((n - 1, 2), -1, dtype=torch.int64)
        )
    with pytest.raises(tinker.BadRequestError, match=field):
        _sample(sampler, prompt, **kwargs)
    # The sampler keeps serving.
    assert _sample(sampler, prompt).sequences[0].tokens
