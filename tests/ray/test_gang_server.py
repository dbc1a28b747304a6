"""A replica of 2 devices (`tinkerd serve --replicas MODEL=1x2`: a gang of 2 CPU ranks, FSDP2
over gloo) behind the real server: the SDK loop gives what the in-process worker gives, and a
killed rank is invisible to the client.

Uses the module's loopback Ray cluster (`ray_head`, conftest.py) and the SDK loop of the
replica tests (ray_helpers.training_loop: two runs, samples every 3 steps, final saves).
"""

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from e2e_helpers import run_server
from ray_helpers import (
    RAY_ENV,
    RayNode,
    assert_same,
    final_weights,
    replicas,
    training_loop,
)

from tinkerd.store.store import Store


def gang_env(model: Path, head: RayNode) -> dict[str, str]:
    return {
        **RAY_ENV,
        "TINKERD_REPLICAS": f'["{model}=1x2"]',
        "TINKERD_RAY_ADDRESS": head.address,
        "TINKERD_STATE_EVERY": "2",
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The loop on one in-process worker (no Ray), and its final weights."""
    workdir = tmp_path_factory.mktemp("inprocess")
    with run_server(tiny_model_dir, workdir, TINKERD_STATE_EVERY="2") as srv:
        trace = training_loop(srv.base_url, str(tiny_model_dir))
    return trace, final_weights(srv.data_dir, trace)


@pytest.mark.slow  # about 70 s on the 2-core CI machine; tests/distributed cover the gang fast
def test_gang_replica_matches_the_in_process_worker(
    tiny_model_dir: Path, tmp_path: Path, ray_head: RayNode, reference
) -> None:
    ref, ref_weights = reference
    with run_server(tiny_model_dir, tmp_path, **gang_env(tiny_model_dir, ray_head)) as srv:
        trace = training_loop(srv.base_url, str(tiny_model_dir))
        listing = replicas(srv)
    assert_same(trace, final_weights(srv.data_dir, trace), ref, ref_weights)
    assert len(listing) == 1
    gang = listing[0]
    assert gang["devices"] == "cpu:2" and gang["state"] == "ready" and gang["runs"] == 2
    assert gang["node"] == "127.0.0.2" and gang["pid"] not in (None, os.getpid())


@pytest.mark.slow
def test_killed_rank_mid_training_loses_nothing(
    tiny_model_dir: Path, tmp_path: Path, ray_head: RayNode, reference
) -> None:
    """SIGKILL of the gang's rank-0 process at a random moment of steps 2 and 5 (most often in
    the middle of a collective): the whole gang is restarted, the runs restored from their
    states and their requests replayed; the loop ends as the uninterrupted one, every future
    complete."""
    ref, ref_weights = reference
    rng = random.Random(20261202)
    killed: list[int] = []
    killers: list[threading.Thread] = []

    with run_server(tiny_model_dir, tmp_path, **gang_env(tiny_model_dir, ray_head)) as srv:

        def kill_rank0(pid: int, delay: float) -> None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # a rank of this test's cluster
            killed.append(pid)

        def kill(step: int) -> None:
            for killer in killers:  # each kill lands before the next step
                killer.join(150)
            if step not in (2, 5):
                return
            deadline = time.monotonic() + 180
            while True:  # the gang is back (after the first kill) with new processes
                listing = replicas(srv)
                if listing[0]["state"] == "ready" and listing[0]["pid"] not in (None, *killed):
                    break
                assert time.monotonic() < deadline, f"the gang did not come back: {listing}"
                time.sleep(0.5)
            killer = threading.Thread(
                target=kill_rank0, args=(listing[0]["pid"], rng.uniform(0.05, 0.6))
            )
            killer.start()
            killers.append(killer)

        trace = training_loop(srv.base_url, str(tiny_model_dir), on_step=kill)
        for killer in killers:
            killer.join(150)
        log = srv.log()
    assert len(killed) == 2
    assert log.count("gang of 2 lost") >= 2, log[-4000:]
    with Store(f"sqlite:///{srv.data_dir / 'tinkerd.db'}") as store:
        assert store.unfinished_futures() == []
        for model_id in trace.model_ids:
            for rec in store.futures_for_model(model_id):
                assert rec.status == "complete", (rec.kind, rec.seq_id, rec.status, rec.error)
    assert_same(trace, final_weights(srv.data_dir, trace), ref, ref_weights)
