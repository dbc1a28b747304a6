"""An RL loop through the SDK: sample → rewards → importance_sampling / ppo → optim_step.

The reward is the fraction of sampled tokens that fall in a fixed half of the vocabulary
(ids below `SPLIT`): the untrained tiny model hits it about half the time, so every group has
signal and a few steps move it clearly.
"""

import numpy as np
import pytest
from e2e_helpers import adam
from tinker import types

SPLIT = 128
PROMPT = [104, 101, 108, 108, 111]  # "hello"
NUM_SAMPLES = 16
MAX_TOKENS = 4
STEPS = 12


def reward(tokens: list[int]) -> float:
    return sum(t < SPLIT for t in tokens) / len(tokens)


def rl_datum(prompt: list[int], seq: types.SampledSequence, advantage: float) -> types.Datum:
    tokens = prompt + list(seq.tokens)
    n_prompt = len(prompt) - 1  # input positions that predict prompt tokens
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(seq.logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(seq.tokens),
        },
    )


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("importance_sampling", None),
        ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ],
)
def test_rl_reward_rises(service_client, server, loss_fn: str, config) -> None:
    tc = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=1)
    tc = tc.result()
    rewards, first_data = [], []
    for step in range(STEPS):
        sampler = tc.save_weights_and_get_sampling_client().result()
        params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=step, stop=[])
        res = sampler.sample(types.ModelInput.from_ints(PROMPT), NUM_SAMPLES, params).result()
        seqs = res.sequences
        assert len(seqs) == NUM_SAMPLES
        for s in seqs:
            assert len(s.tokens) == MAX_TOKENS and len(s.logprobs) == MAX_TOKENS
        r = np.array([reward(list(s.tokens)) for s in seqs])
        rewards.append(r.mean())
        adv = r - r.mean()
        data = [rl_datum(PROMPT, s, float(a)) for s, a in zip(seqs, adv, strict=True)]
        first_data = first_data or data
        fb = tc.forward_backward(data, loss_fn, loss_fn_config=config)
        opt = tc.optim_step(adam(2e-2))
        out = fb.result()
        opt.result()

        loss = out.metrics["loss:sum"]
        assert np.isfinite(loss)
        # The weights that sampled are the weights that train this step: the training pass's
        # logprobs of the sampled tokens equal the sampler's (importance ratio 1).
        n_prompt = len(PROMPT) - 1
        for s, o in zip(seqs, out.loss_fn_outputs, strict=True):
            lp = o["logprobs"].tolist()
            assert len(lp) == n_prompt + MAX_TOKENS
            np.testing.assert_allclose(lp[n_prompt:], s.logprobs, atol=1e-3)
        # With ratio 1 both losses reduce to -sum(A) over the sampled tokens, which is 0 for
        # group-centered advantages.
        assert loss == pytest.approx(-MAX_TOKENS * adv.sum(), abs=1e-3)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards

    # The first batch is now stale (many updates later): ratios are far from 1 (PPO clips),
    # and the loss of a forward pass follows the loss's formula with the returned logprobs.
    out = tc.forward(first_data, loss_fn, loss_fn_config=config).result()
    expected, max_dev = 0.0, 0.0
    for d, o in zip(first_data, out.loss_fn_outputs, strict=True):
        lp = o["logprobs"].to_numpy().astype(np.float64)
        q = d.loss_fn_inputs["logprobs"].to_numpy().astype(np.float64)
        a = d.loss_fn_inputs["advantages"].to_numpy().astype(np.float64)
        ratio = np.exp(lp - q)[a != 0]
        a = a[a != 0]
        if ratio.size:
            max_dev = max(max_dev, float(np.abs(ratio - 1).max()))
        if loss_fn == "ppo":
            clipped = np.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
            expected += float(-np.minimum(ratio * a, clipped * a).sum())
        else:
            expected += float(-(ratio * a).sum())
    assert max_dev > 0.2
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
