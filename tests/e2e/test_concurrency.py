"""Several training clients on one base model at once: two users, and two clients of one user.
Each must train exactly as it does alone (the server batches their passes together)."""

import threading

import numpy as np
from e2e_helpers import adam, output_logprobs, sft_datum

STEPS = 6
SEED = 11
DATA = {
    "alice-1": [[97, 108, 105, 99, 101, 32, 111, 110, 101], [97, 97, 97, 97, 97]],
    "alice-2": [[115, 101, 99, 111, 110, 100, 32, 114, 117, 110]],
    "bob": [[98, 111, 98, 39, 115, 32, 100, 97, 116, 97, 33], [122, 122, 122, 122]],
}
KEYS = {"alice-1": "tml-alice", "alice-2": "tml-alice", "bob": "tml-bob"}


def train(tc, seqs: list[list[int]], start: threading.Barrier | None = None):
    data = [sft_datum(s) for s in seqs]
    if start is not None:
        start.wait(timeout=30)
    # Pipelined: every step is queued before any result is awaited, so the server has all
    # clients' work queued together.
    futures = []
    for step in range(STEPS):
        futures.append(tc.forward_backward(data, "cross_entropy"))
        tc.optim_step(adam(1e-2 * (1 + step % 2)))
    losses = [f.result().metrics["loss:sum"] for f in futures]
    final = output_logprobs(tc.forward(data, "cross_entropy").result())
    return losses, final


def test_concurrent_clients_have_no_crosstalk(clients, server) -> None:
    alice, bob = clients("tml-alice"), clients("tml-bob")
    owners = {"alice-1": alice, "alice-2": alice, "bob": bob}
    tcs = {
        name: sc.create_lora_training_client(base_model=server.model, rank=8, seed=SEED).result()
        for name, sc in owners.items()
    }
    assert tcs["alice-1"].model_id != tcs["alice-2"].model_id

    results: dict[str, tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(tcs))

    def worker(name: str) -> None:
        try:
            results[name] = train(tcs[name], DATA[name], start)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in tcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    assert set(results) == set(tcs)

    # Solo references: the same seed and data on a fresh run of a fresh session, trained
    # with nothing else on the server.
    for name, seqs in DATA.items():
        solo_tc = clients(KEYS[name]).create_lora_training_client(
            base_model=server.model, rank=8, seed=SEED
        )
        solo_losses, solo_final = train(solo_tc.result(), seqs)
        losses, final = results[name]
        np.testing.assert_allclose(losses, solo_losses, rtol=1e-5, atol=1e-5, err_msg=name)
        for a, b in zip(final, solo_final, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        assert losses[-1] < 0.5 * losses[0], (name, losses)
