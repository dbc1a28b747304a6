"""Crash anywhere, lose nothing: an SDK training loop against a server that is killed with
SIGKILL at random moments and restarted on the same data dir ends exactly like an
uninterrupted run (same losses, samples and final weights).

The loop is a small RL-style loop: forward_backward + optim_step every step, and every few
steps an ephemeral sampler snapshot sampled with a seed, and a saved checkpoint. The server
writes run state every 2 optim steps (TINKERD_STATE_EVERY=2), so restarts exercise both the
stored state and the replay of the request log after it.
"""

import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tinker
from e2e_helpers import adam, free_port, sft_datum, start_serve, wait_healthy
from safetensors.numpy import load_file
from tinker import types

from tinkerd.store.store import Store

STEPS = 30
KILLS = 3
SEED = 20261123


@dataclass
class Trace:
    losses: list[float] = field(default_factory=list)
    samples: list[list[int]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    model_id: str = ""


def batch(step: int) -> list[types.Datum]:
    rng = random.Random(step)
    return [sft_datum([rng.randrange(1, 200) for _ in range(rng.randrange(6, 14))]) for _ in "ab"]


def training_loop(base_url: str, model: str) -> Trace:
    """What a user's script does; it knows nothing of the crashes (the SDK retries)."""
    trace = Trace()
    sc = tinker.ServiceClient(base_url=base_url, api_key="tml-crash")
    tc = sc.create_lora_training_client(base_model=model, rank=4, seed=3).result()
    trace.model_id = tc.model_id
    for step in range(STEPS):
        fb = tc.forward_backward(batch(step), "cross_entropy")
        opt = tc.optim_step(adam(1e-2))
        trace.losses.append(fb.result().metrics["loss:sum"])
        opt.result()
        if step % 3 == 2:
            sampler = tc.save_weights_and_get_sampling_client()
            params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=step)
            out = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1, params).result()
            trace.samples.append(list(out.sequences[0].tokens))
            trace.checkpoints.append(tc.save_state(f"step-{step}").result().path)
    trace.checkpoints.append(tc.save_state("final").result().path)
    return trace


class Server:
    """A `tinkerd serve` process on a fixed port and data dir that can be killed and restarted."""

    def __init__(self, model: Path, workdir: Path, **env: str) -> None:
        self.model, self.workdir, self.env = model, workdir, env
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = start_serve(
                self.model,
                self.data_dir,
                self.port,
                log,
                **{"TINKERD_LONG_POLL_SECONDS": "2", "TINKERD_STATE_EVERY": "2", **self.env},
            )
        self.starts += 1
        wait_healthy(self.proc, self.base_url, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def server(model: Path, workdir: Path) -> Iterator[Server]:
    srv = Server(model, workdir)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def final_weights(srv: Server, trace: Trace) -> dict[str, np.ndarray]:
    path = srv.data_dir / "checkpoints" / trace.model_id / "weights" / "final"
    return load_file(str(path / "adapter_model.safetensors"))


def test_sigkill_at_random_moments_loses_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    (tmp_path / "chaos").mkdir()
    with server(tiny_model_dir, tmp_path / "ref") as ref_srv:
        reference = training_loop(ref_srv.base_url, str(tiny_model_dir))
        ref_weights = final_weights(ref_srv, reference)

    with server(tiny_model_dir, tmp_path / "chaos") as srv:
        result: dict[str, Trace | BaseException] = {}

        def client() -> None:
            try:
                result["trace"] = training_loop(srv.base_url, str(tiny_model_dir))
            except BaseException as exc:
                result["trace"] = exc

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        rng = random.Random(SEED)
        kills = 0
        while kills < KILLS and thread.is_alive():
            time.sleep(rng.uniform(0.2, 1.2))
            if not thread.is_alive():
                break
            srv.kill()
            kills += 1
            srv.start()
        thread.join(timeout=300)
        assert not thread.is_alive(), f"the client hung:\n{srv.log()[-4000:]}"
        trace = result["trace"]
        if isinstance(trace, BaseException):
            raise AssertionError(f"the client failed: {trace!r}\n{srv.log()[-4000:]}")
        assert kills >= 2, "the loop finished before the server could be killed twice"
        weights = final_weights(srv, trace)
        log = srv.log()
    # Every request ever acknowledged finished (none hangs) and none failed.
    with Store(f"sqlite:///{srv.data_dir / 'tinkerd.db'}") as store:
        assert store.unfinished_futures() == []
        for rec in store.futures_for_model(trace.model_id):
            assert rec.status == "complete", (rec.kind, rec.seq_id, rec.status, rec.error)

    np.testing.assert_allclose(trace.losses, reference.losses, rtol=1e-6, atol=1e-6)
    assert trace.samples == reference.samples
    assert [p.rsplit("/", 1)[1] for p in trace.checkpoints] == [
        p.rsplit("/", 1)[1] for p in reference.checkpoints
    ]
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert log.count("===== start") == kills + 1
    # Every checkpoint the client was told about is complete on disk.
    for path in trace.checkpoints:
        run_id, _, rest = path.removeprefix("tinker://").partition("/")
        saved = srv.data_dir / "checkpoints" / run_id / rest
        assert (saved / "adapter_model.safetensors").exists(), path
        assert (saved / "tinkerd.json").exists(), path


def test_sigterm_mid_request_exits_promptly_and_the_request_completes_after(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A forward_backward of many micro-batches is in flight when SIGTERM comes: the server
    stops between micro-batches instead of finishing the request, and after the restart the
    request is re-run and its future completes with the right result."""
    srv = Server(tiny_model_dir, tmp_path, TINKERD_TOKEN_BUDGET="16")
    srv.start()
    try:
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key="tml-sigterm")
        tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
        data = [sft_datum([1 + (i * 7 + j) % 200 for j in range(12)]) for i in range(1200)]
        future = tc.forward_backward(data, "cross_entropy")
        time.sleep(1.0)  # the SDK has sent it; the server is working through micro-batches
        assert srv.proc is not None
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(15)
        stopped_in = time.monotonic() - started
        srv.start()
        result = future.result(timeout=300)
        forward = tc.forward(data, "cross_entropy").result(timeout=300)
    finally:
        srv.stop()
    assert stopped_in < 10, stopped_in
    assert "replaying" in srv.log()
    assert result.metrics["loss:sum"] == pytest.approx(forward.metrics["loss:sum"], rel=1e-5)
