"""`forward_backward_custom`: the SDK runs a forward pass, differentiates the user's loss on the
client and sends a cross-entropy pass with weights = -dLoss/dlogprobs (protocol §5)."""

import math

import numpy as np
import pytest
import torch
from e2e_helpers import adam, output_logprobs, sft_datum

PROMPT = [81, 58, 32]  # "Q: "
CHOSEN = [121, 101, 115, 33]  # "yes!"
REJECTED = [110, 111, 112, 101]  # "nope"
BETA = 0.5


def completion_datum(completion: list[int]):
    seq = PROMPT + completion
    n = len(seq) - 1
    weights = [0.0] * (len(PROMPT) - 1) + [1.0] * len(completion)
    assert len(weights) == n
    return sft_datum(seq, weights)


def masked_sums(logprobs: list[list[float]], data) -> list[float]:
    return [
        float(np.dot(lp, d.loss_fn_inputs["weights"].tolist()))
        for lp, d in zip(logprobs, data, strict=True)
    ]


def test_dpo_custom_loss_value_and_update(service_client, server) -> None:
    tc = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=3)
    tc = tc.result()
    data = [completion_datum(CHOSEN), completion_datum(REJECTED)]
    ref_c, ref_r = masked_sums(output_logprobs(tc.forward(data, "cross_entropy").result()), data)

    seen: list[list[float]] = []

    def dpo(batch, logprobs):
        seen.extend(lp.detach().tolist() for lp in logprobs)
        w = [torch.tensor(d.loss_fn_inputs["weights"].tolist()) for d in batch]
        chosen = (logprobs[0] * w[0]).sum() - ref_c
        rejected = (logprobs[1] * w[1]).sum() - ref_r
        margin = BETA * (chosen - rejected)
        return -torch.nn.functional.logsigmoid(margin), {"margin:mean": margin.detach().item()}

    losses, margins = [], []
    for _ in range(5):
        seen.clear()
        fb = tc.forward_backward_custom(data, dpo)
        opt = tc.optim_step(adam(1e-2))
        out = fb.result()
        opt.result()
        # The loss the SDK reports is our loss on the logprobs the server returned, and
        # those logprobs are exactly what a plain forward pass gives (no update in between).
        c, r = masked_sums(seen, data)
        expected = -math.log(1 / (1 + math.exp(-BETA * ((c - ref_c) - (r - ref_r)))))
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert "surrogate_loss:sum" in out.metrics
        losses.append(out.metrics["loss:sum"])
        margins.append(out.metrics["margin:mean"])
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at first

    # After the updates, a forward pass shows the preference moved the right way.
    c, r = masked_sums(output_logprobs(tc.forward(data, "cross_entropy").result()), data)
    assert (c - ref_c) - (r - ref_r) > 2.0
    assert c > ref_c and r < ref_r
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert margins[-1] > margins[0]


def test_linear_custom_loss_equals_cross_entropy(service_client, server) -> None:
    """-sum(logprobs * w) as a custom loss must train exactly like cross_entropy with w."""
    data = [
        sft_datum([104, 105, 32, 116, 104, 101, 114, 101], [1.0, 0.5, 2.0, 1.0, -0.5, 1.0, 1.0]),
        sft_datum([98, 121, 101, 33, 33], [0.0, 1.0, 1.0, 3.0]),
    ]
    custom_tc = service_client.create_lora_training_client(
        base_model=server.model, rank=8, seed=4
    ).result()
    ce_tc = service_client.create_lora_training_client(
        base_model=server.model, rank=8, seed=4
    ).result()

    def linear(batch, logprobs):
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].tolist())).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {}

    for _ in range(3):
        custom = tc_step(custom_tc, lambda: custom_tc.forward_backward_custom(data, linear))
        ce = tc_step(ce_tc, lambda: ce_tc.forward_backward(data, "cross_entropy"))
        assert custom.metrics["loss:sum"] == pytest.approx(ce.metrics["loss:sum"], rel=1e-5)
        # The surrogate CE loss equals the custom loss too (weights = -dL/dlp = w).
        assert custom.metrics["surrogate_loss:sum"] == pytest.approx(
            ce.metrics["loss:sum"], rel=1e-5
        )
    after_custom = output_logprobs(custom_tc.forward(data, "cross_entropy").result())
    after_ce = output_logprobs(ce_tc.forward(data, "cross_entropy").result())
    for a, b in zip(after_custom, after_ce, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def tc_step(tc, submit):
    fb = submit()
    opt = tc.optim_step(adam(1e-2))
    out = fb.result()
    opt.result()
    return out
