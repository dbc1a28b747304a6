"""Idle runs leave memory (their state written first) and come back transparently: a run that
was released in the middle of training continues exactly as if it never left."""

import time
from pathlib import Path

import numpy as np
import tinker
from e2e_helpers import Server, adam, run_server, sft_datum

SEQS = [[3, 14, 15, 92, 65, 35, 89, 79], [27, 18, 28, 18, 28, 45, 90, 45, 23]]
RUNS = 12


def train(tc: tinker.TrainingClient, steps: int) -> list[float]:
    data = [sft_datum(s) for s in SEQS]
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam(1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


def wait_for_log(server: Server, needle: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.count_in_log(needle) < count:
        assert time.monotonic() < deadline, f"{count} x {needle!r} not in:\n{server.log()[-3000:]}"
        time.sleep(0.2)


def test_idle_runs_are_released_and_restored_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    with run_server(tiny_model_dir, tmp_path, TINKERD_IDLE_RELEASE_SECONDS="1") as server:
        sc = server.client("tml-idle")
        reference = sc.create_lora_training_client(base_model=server.model, rank=4, seed=9).result()
        expected = train(reference, 6)

        run = sc.create_lora_training_client(base_model=server.model, rank=4, seed=9).result()
        first = train(run, 3)
        time.sleep(2)  # no request for longer than the idle time (heartbeats come every 10 s)
        wait_for_log(server, f"run {run.model_id} released from memory", 1)
        second = train(run, 3)
        assert server.count_in_log(f"run {run.model_id} restored from its stored state") >= 1
        np.testing.assert_allclose(first + second, expected, rtol=1e-6, atol=1e-6)

        # Many runs, each trained once and left idle: every one leaves memory.
        runs = [
            sc.create_lora_training_client(base_model=server.model, rank=4, seed=i).result()
            for i in range(RUNS)
        ]
        for tc in runs:
            train(tc, 1)
        for tc in runs:
            wait_for_log(server, f"run {tc.model_id} released from memory", 1)
        # Restored on demand: a released run still samples and trains.
        sampler = runs[0].save_weights_and_get_sampling_client()
        out = sampler.sample(tinker.types.ModelInput.from_ints([1, 2, 3]), 1, _greedy()).result()
        assert len(out.sequences[0].tokens) == 4
        assert np.isfinite(train(runs[1], 1)[0])


def _greedy() -> tinker.types.SamplingParams:
    return tinker.types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
