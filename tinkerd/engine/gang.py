"""A replica that spans several devices: K SPMD Ray actors in one placement group.

Each rank is a Ray actor on one device (a GPU with NCCL, or a CPU slice with gloo) holding a
`LocalWorker` over a `ShardedWorker` (model/fsdp.py: the base sharded with FSDP2, adapters
replicated). `GangWorker` implements `WorkerHandle`: every call goes to every rank, because the
sharded passes are collectives and the replicated adapter state must change everywhere alike,
and rank 0's answer is returned. Two exceptions: files are written by rank 0 alone
(`save_adapter`, `write_state`, always synchronously, so that a following read on any rank sees
them), and reads happen on every rank (the paths must name a filesystem all ranks reach).
There is no step-wise sampling (`sample_step`): the scheduler sends a gang whole static batches,
because decode slices bounded by time would end at different steps on different ranks.

A gang is one unit of failure: a rank whose process or node died breaks the process group, so
the first call that sees it kills every rank, starts a whole new gang in the same placement
group and raises `ReplicaLost`; the scheduler then restores the runs (as after any lost replica)
and later calls wait for the new gang. Ray never restarts a rank on its own
(`max_restarts=0`) and never re-runs a task (`max_task_retries=0`).

Ray is imported lazily: the default server path never imports this module.
"""

import contextlib
import dataclasses
import socket
import threading
from typing import Any, NoReturn

import torch

from tinkerd.engine.ray_worker import (
    ForwardingHandle,
    ReplicaSpec,
    WorkerActor,
    import_ray,
    pack,
    unpack,
)
from tinkerd.engine.worker_handle import ModelFront, ReplicaLost
from tinkerd.model.vision import VisionSupport

# Seconds a collective may wait for a peer before the ranks give up (the process group timeout).
COLLECTIVE_TIMEOUT_S = 300.0


class GangRankActor(WorkerActor):
    """One rank: created empty, then `setup` joins the process group and loads its shard (all
    ranks at once: the rendezvous waits for every rank)."""

    def __init__(self, spec: ReplicaSpec, rank: int, world_size: int) -> None:
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        if spec.threads:
            torch.set_num_threads(spec.threads)

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the gang's rendezvous (rank 0)."""
        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((address, 0))
            return address, sock.getsockname()[1]

    def setup(self, address: str, port: int, timeout_s: float) -> None:
        from tinkerd.engine.local_worker import LocalWorker
        from tinkerd.model.fsdp import ShardedWorker, init_gang
        from tinkerd.model.loading import load_base_model

        spec = self.spec
        # Ray gives a GPU rank one visible device: it is cuda:0 in this process.
        device = "cuda:0" if spec.device.startswith("cuda") else spec.device
        place = init_gang(
            self.rank, self.world_size, address, port, device=device, timeout_s=timeout_s
        )
        base = load_base_model(
            spec.source,
            data_dir=spec.data_dir,
            dtype=spec.dtype,
            device=str(place.device),
            served_name=spec.name,
            trust_remote_code=spec.trust_remote_code,
        )
        autocast = torch.bfloat16 if spec.dtype == "bfloat16" else None
        self.model = ShardedWorker(base, place, autocast_dtype=autocast)
        self.local = LocalWorker(self.model)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rank": self.rank}

    def healthy(self) -> bool:
        """Whether the process group still works (one tiny all-reduce): after a collective
        failed or timed out it does not, and only a new gang helps."""
        import torch.distributed as dist

        try:
            flag = torch.ones(1, device=self.model.place.device)
            dist.all_reduce(flag)
            return int(flag.item()) == self.world_size
        except Exception:
            return False


class GangWorker(ForwardingHandle):
    """Implements `WorkerHandle` on K `GangRankActor`s. One scheduler thread calls it; a lock
    keeps the router's probe (`alive`) out of its way, and the listing (`describe`) reads the
    pids and nodes recorded at setup."""

    def __init__(
        self,
        spec: ReplicaSpec,
        *,
        ranks: int,
        num_cpus: float,
        num_gpus: float = 0.0,
        max_restarts: int = -1,
        timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        if ranks < 1:
            raise ValueError(f"a gang needs at least one rank, got {ranks}")
        if num_gpus and num_gpus != 1:
            raise ValueError("a GPU gang takes one whole GPU per rank")
        self.ray = import_ray()
        from ray.util.placement_group import placement_group

        threads = spec.threads or max(1, int(num_cpus))
        self.spec = dataclasses.replace(
            spec, threads=threads, device="cuda" if num_gpus else spec.device
        )
        self.ranks = ranks
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.restarts = 0
        self.timeout_s = timeout_s
        self.devices = f"gpu:{ranks}" if num_gpus else f"cpu:{num_cpus * ranks:g}"
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        # GPUs of one gang talk over NVLink: one node. CPU slices: packed where they fit.
        self.group = placement_group(
            [dict(bundle) for _ in range(ranks)], strategy="STRICT_PACK" if num_gpus else "PACK"
        )
        self.actors: list[Any] = []
        self._setup: list[Any] = []
        self._endpoint: Any = None
        self._ranks_described: list[dict[str, Any]] = []  # pid and node per rank, at setup
        self.dead = False  # restarts exhausted: the replica listing says "lost"
        # The scheduler thread calls the worker; the router's probe thread calls `alive`.
        self._lock = threading.RLock()
        self.max_restarts = 0  # a gang that cannot start the first time is an error
        try:
            self._start()
            self._ready()
            info, tokenizer, config, source = self._get(self.actors[0].front_parts.remote())
        except ReplicaLost as exc:
            self.kill()
            raise RuntimeError(f"could not start a gang of {ranks} for {spec.name}") from exc
        self.max_restarts = max_restarts
        vision = VisionSupport(config, source, info.name) if config is not None else None
        self._front = ModelFront(info, tokenizer, vision, source)

    @classmethod
    def create(
        cls,
        spec: ReplicaSpec,
        *,
        ranks: int,
        num_cpus: float,
        num_gpus: float = 0.0,
        max_restarts: int = -1,
    ) -> "GangWorker":
        """A gang of `ranks` devices for `spec` (each rank `num_cpus`, and one GPU if
        `num_gpus`)."""
        return cls(
            spec, ranks=ranks, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts
        )

    # -- the gang's life ----------------------------------------------------------------------

    def _start(self) -> None:
        """Create the ranks and ask rank 0 for a rendezvous endpoint; `_advance` goes on."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = self.ray.remote(GangRankActor)
        self.actors = [
            actor_cls.options(
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                max_restarts=0,
                max_task_retries=0,
                max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=rank
                ),
            ).remote(self.spec, rank, self.ranks)
            for rank in range(self.ranks)
        ]
        self._endpoint = self.actors[0].endpoint.remote()

    def _advance(self, timeout: float | None) -> bool:
        """Move a starting gang on (endpoint, then every rank's setup), waiting at most
        `timeout` seconds per stage; True once it is set up. A failed stage loses the gang."""
        if not self.actors:
            self._lost(RuntimeError("no live gang"))
        if self._endpoint is not None:
            ready, _ = self.ray.wait([self._endpoint], timeout=timeout)
            if not ready:
                return False
            address, port = self._get(self._endpoint)
            self._endpoint = None
            self._setup = [a.setup.remote(address, port, self.timeout_s) for a in self.actors]
        if self._setup:
            ready, _ = self.ray.wait(self._setup, num_returns=len(self._setup), timeout=timeout)
            if len(ready) < len(self._setup):
                return False
            setup, self._setup = self._setup, []
            self._gather(setup)
            self._ranks_described = self._gather([a.describe.remote() for a in self.actors])
        return True

    def _ready(self) -> None:
        with self._lock:
            self._advance(None)

    def _lost(self, cause: BaseException) -> NoReturn:
        """Kill every rank, start a new gang (restarts permitting) and raise ReplicaLost. The
        new gang starts in the background: the next call waits for it."""
        self._kill_ranks()
        message = f"gang of {self.ranks} lost: {type(cause).__name__}: {_first_line(cause)}"
        if self.max_restarts < 0 or self.restarts < self.max_restarts:
            self.restarts += 1
            try:
                self._start()
            except self.ray.exceptions.RayError:
                self._kill_ranks()  # the next call tries again
        else:
            self.dead = True
        raise ReplicaLost(message) from cause

    def _kill_ranks(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors, self._setup, self._endpoint = [], [], None
        self._ranks_described = []

    def _get(self, ref: Any, timeout: float | None = None) -> Any:
        try:
            return self.ray.get(ref, timeout=timeout)
        except self.ray.exceptions.RayError as exc:
            self._lost(exc)

    def _gather(self, refs: list[Any]) -> list[Any]:
        """Every rank's result, in rank order. The first rank seen dead (its actor, node, or a
        task that raised outside the worker) loses the gang at once: the others may be stuck in
        a collective waiting for it."""
        results: dict[Any, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            try:
                results[ready[0]] = self.ray.get(ready[0])
            except self.ray.exceptions.RayError as exc:
                self._lost(exc)
        return [results[ref] for ref in refs]

    def _call(self, name: str, *args: Any, ranks: int | None = None, **kwargs: Any) -> Any:
        """Call `name` on the first `ranks` ranks (all by default); rank 0's answer."""
        packed_args, packed_kwargs = pack(args), pack(kwargs)
        with self._lock:
            self._advance(None)
            actors = self.actors[: ranks or self.ranks]
            refs = [a.call.remote(name, packed_args, packed_kwargs) for a in actors]
            answers = self._gather(refs)
            failed = [value for ok, value in answers if not ok]
            if failed and len(failed) < len(answers):
                # Some ranks failed and others did not: their states may have parted; only a
                # fresh gang is sure to be consistent.
                self._lost(failed[0])
            # Every rank failed: the request's error, unless a collective broke (a peer stuck
            # until the timeout, a torn connection), which leaves the group unusable.
            if (
                failed
                and len(actors) > 1
                and not all(self._gather([a.healthy.remote() for a in self.actors]))
            ):
                self._lost(failed[0])
        ok, value = answers[0]
        if not ok:
            raise value
        return unpack(value)

    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Files are written by rank 0 alone (every rank reads them), and synchronously."""
        if "wait" in kwargs:
            kwargs["wait"] = True
        return self._call(name, *args, ranks=1, **kwargs)

    def close(self) -> None:
        with contextlib.suppress(ReplicaLost):
            self._call("close")

    # -- beyond the protocol (as RayWorker) -------------------------------------------------

    def activation_bytes_per_token(self) -> int:
        """Rank 0's measure (each rank holds about 1/K of the rows of a batch: a bound)."""
        with self._lock:
            self._advance(None)
            refs = [a.activation_bytes_per_token.remote() for a in self.actors]
            return int(self._gather(refs)[0])

    def alive(self, timeout: float) -> bool:
        """Whether every rank is set up and answers within `timeout` seconds (False while a
        new gang starts)."""
        with self._lock:
            try:
                if not self._advance(timeout):
                    return False
            except ReplicaLost:
                return False
            refs = [a.ping.remote() for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            return False
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayError:
            return False
        return True

    def describe(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Rank 0's pid and node (the replica listing's), every rank's pid and node, and the
        ranks' summed memory (None while a rank is busy for `timeout` seconds). None while no
        gang is set up."""
        ranks, actors = self._ranks_described, list(self.actors)
        if not ranks or len(actors) != len(ranks):
            return None
        try:
            now = self.ray.get([a.describe.remote() for a in actors], timeout=timeout)
            memory: int | None = sum(r["memory_bytes"] for r in now)
        except (self.ray.exceptions.RayError, self.ray.exceptions.GetTimeoutError):
            memory = None
        return {
            "pid": ranks[0]["pid"],
            "node": ranks[0]["node"],
            "memory_bytes": memory,
            "devices": self.devices,
            "pids": [r["pid"] for r in ranks],
            "nodes": [r["node"] for r in ranks],
        }

    def kill(self) -> None:
        """End every rank and free the placement group (no restart)."""
        with self._lock:
            self._kill_ranks()
            self.dead = True
        with contextlib.suppress(Exception):
            self.ray.util.remove_placement_group(self.group)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
