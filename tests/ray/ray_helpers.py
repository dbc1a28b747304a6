"""Ray nodes on loopback for the replica tests: started with `ray start --block`, ended by the
process ids of that process and everything it started (never `ray stop`, which ends every Ray
process on the machine by name).

Loopback addresses other than 127.0.0.1 (127.0.0.2, 127.0.0.3, ...) stand for machines: Ray
does not rewrite them to the machine's outward address. Every port is chosen free, so two nodes
fit on one host. Token auth stays on (`RAY_AUTH_MODE=token`: the token file in ~/.ray is
shared by every process of the test).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import tinker
import torch
from e2e_helpers import Server, adam, free_port, sft_datum
from numerics import assert_close_scaled
from safetensors.numpy import load_file
from tinker import types

RAY = Path(sys.executable).parent / "ray"
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "PYTHONDONTWRITEBYTECODE": "1",
}
NODE_START_TIMEOUT_S = 120.0


# -- the SDK loop the tests compare -------------------------------------------------------

STEPS = 9
RUNS = 2
ADAPTER = "adapter_model.safetensors"


@dataclass
class Trace:
    losses: list[list[float]] = field(default_factory=list)  # per step, per run
    samples: list[list[int]] = field(default_factory=list)
    model_ids: list[str] = field(default_factory=list)


def batch(step: int, run: int) -> list[types.Datum]:
    rng = random.Random(step * 10 + run)
    return [sft_datum([rng.randrange(1, 200) for _ in range(rng.randrange(6, 14))]) for _ in "ab"]


def training_loop(base_url: str, model: str, on_step: Callable[[int], None] | None = None) -> Trace:
    """A user's script: it knows nothing of replicas or of workers dying (`on_step(step)`
    runs before each step: the test's hook)."""
    trace = Trace()
    sc = tinker.ServiceClient(base_url=base_url, api_key="tml-ray")
    clients = [
        sc.create_lora_training_client(base_model=model, rank=4, seed=3 + i).result()
        for i in range(RUNS)
    ]
    trace.model_ids = [tc.model_id for tc in clients]
    for step in range(STEPS):
        if on_step is not None:
            on_step(step)
        fbs = [tc.forward_backward(batch(step, i), "cross_entropy") for i, tc in enumerate(clients)]
        opts = [tc.optim_step(adam(1e-2)) for tc in clients]
        trace.losses.append([fb.result().metrics["loss:sum"] for fb in fbs])
        for opt in opts:
            opt.result()
        if step % 3 == 2:
            for tc in clients:
                sampler = tc.save_weights_and_get_sampling_client().result()
                params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=step)
                out = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1, params).result()
                trace.samples.append(list(out.sequences[0].tokens))
    for tc in clients:
        tc.save_state("final").result()
    return trace


def final_weights(data_dir: Path, trace: Trace) -> list[dict[str, np.ndarray]]:
    return [
        load_file(
            str(data_dir / "checkpoints" / m / "weights" / "final" / "adapter_model.safetensors")
        )
        for m in trace.model_ids
    ]


def assert_same(trace: Trace, weights: list, ref: Trace, ref_weights: list) -> None:
    """Same losses, samples and final weights as the reference, within float32 rounding of
    a different batch composition (a replica batches only its own runs)."""
    assert_close_scaled(torch.tensor(trace.losses), torch.tensor(ref.losses), terms=64)
    assert trace.samples == ref.samples
    for got, want in zip(weights, ref_weights, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert_close_scaled(
                torch.from_numpy(got[name]), torch.from_numpy(value), terms=256, msg=name
            )


def replicas(server: Server) -> list[dict]:
    r = httpx.get(
        f"{server.base_url}/api/v1/tinkerd/replicas", headers={"X-API-Key": "tml-ray"}, timeout=30
    )
    r.raise_for_status()
    return r.json()["replicas"]


def replica_env(model: Path, head: RayNode, count: int) -> dict[str, str]:
    """`tinkerd serve` env: `count` replicas of `model` on the cluster of `head`."""
    return {
        **RAY_ENV,
        "TINKERD_REPLICAS": f'["{model}={count}"]',
        "TINKERD_RAY_ADDRESS": head.address,
        "TINKERD_REPLICA_MAX_RUNS": "1",  # one run per replica: both replicas train
        "TINKERD_STATE_EVERY": "2",
    }


# -- Ray nodes -----------------------------------------------------------------------------


@dataclass
class RayNode:
    ip: str
    address: str  # the head's GCS address, HOST:PORT
    proc: subprocess.Popen[bytes]
    log_path: Path
    temp_dir: Path | None = None  # the head's Ray temp dir (removed by `stop`)
    seen: set[int] = field(default_factory=set)  # every pid of this node ever observed

    def pids(self) -> set[int]:
        """The `ray start` process and every process below it now (raylet, GCS, workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            found = {self.proc.pid} | {c.pid for c in root.children(recursive=True)}
        except psutil.NoSuchProcess:
            found = set()
        self.seen |= found
        return found

    def raylet_pid(self) -> int:
        for pid in self.pids():
            try:
                if psutil.Process(pid).name() == "raylet":
                    return pid
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no raylet under node {self.ip}")

    def stop(self) -> None:
        """End the node's processes by id: SIGTERM, then SIGKILL what is left after 10 s."""
        pids = self.pids() | self.seen
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, sig)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


def start_node(
    ip: str, workdir: Path, *, num_cpus: int, head: str | None = None, name: str = "head"
) -> RayNode:
    """A head node on `ip` (head=None) or a node joining `head` (HOST:PORT)."""
    log_path = workdir / f"ray-{name}.log"
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    cmd = [str(RAY), "start", "--block", "--node-ip-address", ip, "--num-cpus", str(num_cpus)]
    cmd += ["--object-store-memory", str(200 << 20), "--disable-usage-stats"]
    cmd += [x for k, v in ports.items() for x in (k, str(v))]
    temp_dir = ""
    if head is None:
        port = free_port()
        address = f"{ip}:{port}"
        # Short: Ray's unix socket paths live under it (at most 107 bytes).
        temp_dir = tempfile.mkdtemp(prefix="tr", dir="/tmp")
        cmd += ["--head", "--port", str(port), "--include-dashboard", "false"]
        cmd += ["--dashboard-port", str(free_port())]  # its process starts anyway
        cmd += ["--temp-dir", temp_dir]
    else:
        address = head
        cmd += ["--address", head]
    env = {**os.environ, **RAY_ENV}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    node = RayNode(ip, address, proc, log_path, Path(temp_dir) if head is None else None)
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while "Ray runtime started" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"ray start failed:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.2)
    node.pids()
    return node
