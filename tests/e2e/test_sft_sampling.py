"""SFT through the SDK, then sampling from the trained weights (ephemeral and saved samplers),
compute_logprobs against forward logprobs, and base vs trained samplers."""

from dataclasses import dataclass

import numpy as np
import pytest
import tinker
from e2e_helpers import adam, output_logprobs, sft_datum
from tinker import types

TEXTS = ["hello world, tinkerd", "the quick brown fox", "pack my box with jugs"]
PROMPT_LEN = 4


@dataclass
class Trained:
    tc: tinker.TrainingClient
    seqs: list[list[int]]
    losses: list[float]


def greedy(sampler: tinker.SamplingClient, prompt: list[int], n: int) -> list[int]:
    params = types.SamplingParams(max_tokens=n, temperature=0.0, stop=[])
    res = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
    seq = res.sequences[0]
    assert len(seq.logprobs) == len(seq.tokens)
    return list(seq.tokens)


@pytest.fixture(scope="module")
def trained(service_client, server, tokenizer) -> Trained:
    tc = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=0)
    tc = tc.result()
    seqs = [tokenizer.encode(t) for t in TEXTS]
    data = [sft_datum(s) for s in seqs]
    losses = []
    for _ in range(25):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam(1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return Trained(tc, seqs, losses)


def test_sft_loss_falls_and_greedy_reproduces(trained: Trained) -> None:
    losses = trained.losses
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.05 * losses[0], losses
    sampler = trained.tc.save_weights_and_get_sampling_client().result()
    for seq in trained.seqs:
        out = greedy(sampler, seq[:PROMPT_LEN], len(seq) - PROMPT_LEN)
        assert out == seq[PROMPT_LEN:], (out, seq)


def test_compute_logprobs_matches_forward(service_client, server, trained: Trained) -> None:
    seq = trained.seqs[1]
    # Base model: a fresh LoRA client (B = 0) equals the base sampler.
    fresh = service_client.create_lora_training_client(base_model=server.model, rank=4).result()
    base_fwd = output_logprobs(fresh.forward([sft_datum(seq)], "cross_entropy").result())[0]
    base_sampler = service_client.create_sampling_client(base_model=server.model).result()
    base_lp = base_sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    assert base_lp[0] is None and len(base_lp) == len(seq)
    np.testing.assert_allclose(base_lp[1:], base_fwd, atol=1e-4)

    # Trained weights: the ephemeral sampler equals the training client's forward.
    fwd = trained.tc.forward([sft_datum(seq)], "cross_entropy").result()
    trained_fwd = output_logprobs(fwd)[0]
    sampler = trained.tc.save_weights_and_get_sampling_client().result()
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    np.testing.assert_allclose(lp[1:], trained_fwd, atol=1e-4)
    # ...and training moved them a lot (the text became likely).
    assert sum(trained_fwd) > sum(base_fwd) + 10
    assert fwd.metrics["loss:sum"] == pytest.approx(-sum(trained_fwd), rel=1e-4)


def test_saved_sampler_weights_sample_the_trained_model(
    service_client, clients, server, trained: Trained
) -> None:
    path = trained.tc.save_weights_for_sampler("sft-final").result().path
    assert path.startswith("tinker://") and "/sampler_weights/sft-final" in path
    saved = service_client.create_sampling_client(model_path=path).result()
    ephemeral = trained.tc.save_weights_and_get_sampling_client().result()
    base = service_client.create_sampling_client(base_model=server.model).result()
    assert saved.get_base_model() == server.model
    differs = 0
    for seq in trained.seqs:
        prompt, n = seq[:PROMPT_LEN], len(seq) - PROMPT_LEN
        from_saved = greedy(saved, prompt, n)
        assert from_saved == greedy(ephemeral, prompt, n) == seq[PROMPT_LEN:]
        differs += greedy(base, prompt, n) != from_saved
    assert differs == len(trained.seqs)

    # A saved sampler of the same path in a *new* session (another ServiceClient of the
    # same user) loads the weights from disk and samples the same.
    other = clients("tml-e2e").create_sampling_client(model_path=path).result()
    seq = trained.seqs[0]
    assert greedy(other, seq[:PROMPT_LEN], len(seq) - PROMPT_LEN) == seq[PROMPT_LEN:]
