"""Two "machines" on loopback: a head node on 127.0.0.2 and a worker node on 127.0.0.3 (one
CPU each, so each holds one replica). The worker node's raylet is SIGKILLed mid-loop: the runs
it held continue on the head's replica, with the same results as the in-process worker."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from e2e_helpers import run_server
from ray_helpers import (
    RayNode,
    assert_same,
    final_weights,
    replica_env,
    replicas,
    start_node,
    training_loop,
)

from tinkerd.store.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayNode, RayNode]]:
    workdir = tmp_path_factory.mktemp("ray-nodes")
    head = start_node("127.0.0.2", workdir, num_cpus=1)
    try:
        worker = start_node("127.0.0.3", workdir, num_cpus=1, head=head.address, name="worker")
        try:
            yield head, worker
        finally:
            worker.stop()
    finally:
        head.stop()


def test_a_dead_node_s_runs_continue_on_the_other(
    tiny_model_dir: Path, tmp_path: Path, two_nodes: tuple[RayNode, RayNode]
) -> None:
    head, worker = two_nodes
    (tmp_path / "ref").mkdir()
    (tmp_path / "ray").mkdir()
    with run_server(tiny_model_dir, tmp_path / "ref", TINKERD_STATE_EVERY="2") as ref_srv:
        ref = training_loop(ref_srv.base_url, str(tiny_model_dir))
        ref_weights = final_weights(ref_srv.data_dir, ref)

    with run_server(
        tiny_model_dir, tmp_path / "ray", **replica_env(tiny_model_dir, head, 2)
    ) as srv:
        before = replicas(srv)
        assert sorted(r["node"] for r in before) == ["127.0.0.2", "127.0.0.3"]

        def kill_worker_node(step: int) -> None:
            """The machine 127.0.0.3 dies: its raylet first, then whatever of it is left (its
            worker processes notice the raylet's death on their own, but not at once)."""
            if step != 4:
                return
            listing = replicas(srv)
            assert [r["runs"] for r in listing] == [1, 1]  # one run on each machine
            node_pids = worker.pids() - {worker.proc.pid}  # the test reaps `ray start` itself
            os.kill(worker.raylet_pid(), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(map(psutil.pid_exists, node_pids)):
                time.sleep(0.2)
            for pid in node_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        trace = training_loop(srv.base_url, str(tiny_model_dir), on_step=kill_worker_node)
        after = replicas(srv)
        log = srv.log()
    assert "lost (" in log
    by_node = {r["node"]: r for r in after if r["node"]}
    survivor = next(r for r in after if r["state"] == "ready")
    assert survivor["runs"] == 2, after  # both runs on the head's replica now
    assert "127.0.0.3" not in by_node  # the dead node's replica does not answer
    with Store(f"sqlite:///{srv.data_dir / 'tinkerd.db'}") as store:
        assert store.unfinished_futures() == []
        for model_id in trace.model_ids:
            for rec in store.futures_for_model(model_id):
                assert rec.status == "complete", (rec.kind, rec.seq_id, rec.status, rec.error)
    assert_same(trace, final_weights(srv.data_dir, trace), ref, ref_weights)
