"""save_state → create_training_client_from_state[_with_optimizer] resumes training."""

import numpy as np
from e2e_helpers import adam, sft_datum

SEQS = [
    [116, 105, 110, 107, 101, 114, 32, 115, 116, 97, 116, 101],  # "tinker state"
    [114, 101, 115, 117, 109, 101, 32, 109, 101],  # "resume me"
]
K, M = 3, 4
LR = 1e-2


def train(tc, steps: int) -> list[float]:
    data = [sft_datum(s) for s in SEQS]
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam(LR))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


def test_resume_from_state_with_and_without_optimizer(service_client, server) -> None:
    run_a = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=5)
    run_a = run_a.result()
    first = train(run_a, K)
    path = run_a.save_state("after-k").result().path
    assert path == f"tinker://{run_a.model_id}/weights/after-k"
    continued = train(run_a, M)  # the uninterrupted run
    assert continued[-1] < first[0]

    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id != run_a.model_id
    resumed_losses = train(resumed, M)
    np.testing.assert_allclose(resumed_losses, continued, rtol=1e-6, atol=1e-6)

    # Weights only: the first loss (same weights) matches, but the Adam moments start from
    # zero, so the next steps take a different path.
    fresh_moments = service_client.create_training_client_from_state(path).result()
    fresh_losses = train(fresh_moments, M)
    assert abs(fresh_losses[0] - continued[0]) < 1e-4 * abs(continued[0])
    assert not np.allclose(fresh_losses[1:], continued[1:], rtol=1e-3, atol=1e-3), (
        fresh_losses,
        continued,
    )
