"""Several replicas of one base model behind the scheduler interface the api layer uses.

Each replica is a worker (a Ray actor, or a gang of them) driven by its own `ModelScheduler`
thread, so each gets its own cross-tenant micro-batch rounds, in seq_id order with barriers,
from the runs placed on it. `ReplicaRouter` decides where things go:

* A training run lives on one replica while in memory (adapter, optimizer, un-stepped
  gradients). A run with no replica (new, released when idle, restored after a restart, or
  moved off a lost replica) goes to the live replica with the most runs below
  `max_runs` (fill before spreading: tenants on one replica share batches), else to the one
  with the fewest runs.
* A sample goes to the replica that took its sampler snapshot (sticky), else to the least
  loaded; a saved snapshot reloads from its directory anywhere.
* A replica whose worker is lost (`ReplicaLost`) fences its ops (engine/scheduler.py `lose`);
  its runs are placed on live replicas, restored there from their stored state, and their
  logged requests after it are replayed through `replay` (the api layer's startup-recovery
  path, given as a callback: the engine does not import the api). Its sample ops run
  elsewhere once those replays are taken. No future fails because a worker died. With no live
  replica, ops wait in the router until one answers again (a restarted actor rejoins empty).

The api layer reads the model through `front` (description, tokenizer, image support: no
weights in the control plane; a Ray replica sends them once at startup).
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinkerd.engine.ops import Op, Sample, SnapshotAdapter
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.engine.telemetry import Telemetry
from tinkerd.engine.worker_handle import ModelFront, ReplicaLost
from tinkerd.model.loading import BaseModelInfo

log = logging.getLogger(__name__)

# Replays one run's logged requests after its stored state; returns the last logged seq_id
# (None: nothing to replay). Provided by the api layer (api/recovery.py `replay_run`).
ReplayRun = Callable[[str], int | None]


@dataclass
class _Routed(Op):
    """A sample op as handed to a replica: a lost replica's failure puts the original back
    through the router instead of failing it."""

    original: Op | None = None


def _original(op: Op) -> Op:
    return op.original if isinstance(op, _Routed) and op.original is not None else op


class ReplicaRouter:
    """The replicas of one base model, with `ModelScheduler`'s public interface."""

    def __init__(
        self,
        schedulers: list[ModelScheduler],
        *,
        max_runs: int = 16,
        probe_seconds: float = 1.0,
        replay_timeout: float = 3600.0,
    ) -> None:
        assert schedulers, "a router needs at least one replica"
        self.replicas = schedulers
        self.max_runs = max_runs
        self.probe_seconds = probe_seconds
        self.replay_timeout = replay_timeout
        self.replay: ReplayRun | None = None  # set by the api layer before start
        self.front: ModelFront = schedulers[0].front
        self.token_budget = min(s.token_budget for s in schedulers)
        self._lock = threading.RLock()
        self._placement: dict[str, int] = {}  # run -> replica index
        self._snapshots: dict[str, int] = {}  # sampler snapshot -> replica that took it
        self._parked: list[Op] = []  # ops waiting for a live replica
        self._recovering = 0  # loss recoveries in progress
        self._described: dict[int, dict[str, Any] | None] = {}  # last describe() per replica
        self._stale: dict[int, set[str]] = {}  # adapters moved off a lost replica
        self._stopping = threading.Event()
        self._prober = threading.Thread(
            target=self._probe, name=f"replicas:{self.info.name}", daemon=True
        )
        for scheduler in schedulers:
            scheduler.on_lost = self._lost
            scheduler.on_released = self._released

    # -- what the api layer uses ------------------------------------------------------------

    @property
    def info(self) -> BaseModelInfo:
        return self.front.info

    @property
    def telemetry(self) -> Telemetry:
        return self.replicas[0].telemetry

    @telemetry.setter
    def telemetry(self, observer: Telemetry) -> None:
        for scheduler in self.replicas:
            scheduler.telemetry = observer

    def start(self) -> None:
        for scheduler in self.replicas:
            scheduler.start()
        self._prober.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        for scheduler in self.replicas:
            scheduler.stop(timeout)

    def submit(self, op: Op) -> bool:
        with self._lock:
            if isinstance(op.action, Sample):
                return self._submit_sample(op)
            assert op.model_id is not None
            target = self._placement.get(op.model_id)
            if target is None:
                target = self._place(op.model_id)
            if target is None:
                self._parked.append(op)
                return True
            if isinstance(op.action, SnapshotAdapter):
                self._snapshots[op.action.snapshot_id] = target
            # Not taken: the replica was lost a moment ago; its loss handler (waiting for
            # this lock) replays the run's logged requests, this one included.
            self.replicas[target].submit(op)
            return True

    def skip(self, model_id: str, seq_id: int) -> None:
        with self._lock:
            target = self._placement.get(model_id)
            if target is None:
                target = self._place(model_id)
            if target is not None:
                self.replicas[target].skip(model_id, seq_id)

    def cancel_sample(self, request_id: str) -> Op | None:
        with self._lock:
            for i, op in enumerate(self._parked):
                if op.request_id == request_id and isinstance(op.action, Sample):
                    return self._parked.pop(i)
            for scheduler in self.replicas:
                op = scheduler.cancel_sample(request_id)
                if op is not None:
                    return op
        return None

    def state_seq_id(self, model_id: str) -> int | None:
        return self.replicas[0].state_seq_id(model_id)

    def release(self, model_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        with self._lock:
            for model_id in model_ids:
                target = self._placement.get(model_id)
                if target is not None:
                    by_replica.setdefault(target, []).append(model_id)
        for target, runs in by_replica.items():
            self.replicas[target].release(runs)

    def wait_applied(self, model_id: str, seq_id: int, timeout: float | None = None) -> bool:
        """As `ModelScheduler.wait_applied`, following the run if it moves."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            with self._lock:
                target = self._placement.get(model_id)
            if target is None:
                stored = self.state_seq_id(model_id)
                if stored is not None and stored >= seq_id:
                    return True
                step = 0.2 if remaining is None else min(0.2, remaining)
            else:
                scheduler = self.replicas[target]
                epoch = scheduler.epoch
                step = 1.0 if remaining is None else min(1.0, remaining)
                done = scheduler.wait_applied(model_id, seq_id, step)
                with self._lock:
                    same = self._placement.get(model_id) == target and scheduler.epoch == epoch
                if done and same:
                    return True
                step = 0.0
            if self._stopping.is_set() or remaining == 0.0:
                return False
            if step:
                time.sleep(step)

    def loaded_runs(self) -> list[str]:
        return [m for s in self._live() for m in s.loaded_runs()]

    def queued(self) -> int:
        with self._lock:
            parked = len(self._parked)
        return parked + sum(s.queued() for s in self.replicas)

    def adapter_bytes(self, model_id: str) -> int:
        with self._lock:
            target = self._placement.get(model_id)
        if target is None:
            raise KeyError(model_id)
        return self.replicas[target].handle.adapter_bytes(model_id)

    def listing(self) -> list[dict[str, Any]]:
        """One entry per replica: model, index, pid, node, devices, state (ready / lost /
        restarting), runs placed, queue depth, memory (`tinkerd status`, the replicas
        endpoint; operators and tests find a worker's process here)."""
        with self._lock:
            runs = [0] * len(self.replicas)
            for target in self._placement.values():
                runs[target] += 1
        out = []
        for i, scheduler in enumerate(self.replicas):
            handle: Any = scheduler.handle
            described = None
            if not scheduler.lost and hasattr(handle, "describe"):
                # A busy worker may not answer in time: its last answer stands meanwhile.
                described = handle.describe() or self._described.get(i)
                self._described[i] = described
            else:
                self._described.pop(i, None)  # a restarted worker is another process
            if not scheduler.lost:
                state = "ready"
            elif getattr(handle, "dead", False):
                state = "lost"
            else:
                state = "restarting"
            out.append(
                {
                    "model": self.info.name,
                    "replica": i,
                    "pid": described["pid"] if described else None,
                    "node": described["node"] if described else None,
                    "devices": getattr(handle, "devices", "local"),
                    "state": state,
                    "epoch": scheduler.epoch,
                    "runs": runs[i],
                    "queue_depth": scheduler.queued(),
                    "memory_bytes": described["memory_bytes"] if described else None,
                }
            )
        return out

    def placement(self, model_id: str) -> int | None:
        """The replica a run is on now (None: none; for tests and the listing)."""
        with self._lock:
            return self._placement.get(model_id)

    # -- placement ------------------------------------------------------------------------

    def _live(self) -> list[ModelScheduler]:
        return [s for s in self.replicas if not s.lost]

    def _place(self, model_id: str) -> int | None:
        """Under the lock: a replica for a run with none (None: no replica is live)."""
        counts = [0] * len(self.replicas)
        for target in self._placement.values():
            counts[target] += 1
        live = [i for i, s in enumerate(self.replicas) if not s.lost]
        if not live:
            return None
        with_room = [i for i in live if counts[i] < self.max_runs]
        if with_room:
            target = max(with_room, key=lambda i: (counts[i], -i))  # fill before spreading
        else:
            target = min(live, key=lambda i: (counts[i], i))
        self._placement[model_id] = target
        return target

    def _submit_sample(self, op: Op) -> bool:
        """Under the lock: the snapshot's replica if it is live, else the least loaded."""
        original = _original(op)
        action = original.action
        assert isinstance(action, Sample)
        live = [i for i, s in enumerate(self.replicas) if not s.lost]
        home = self._snapshots.get(action.input.adapter_id or "")
        order = ([home] if home in live else []) + sorted(
            (i for i in live if i != home), key=lambda i: self.replicas[i].queued()
        )
        for target in order:
            routed = _Routed(
                original.request_id,
                original.action,
                original.done,
                self._sample_failed(original, target),
                original.model_id,
                original.seq_id,
                original=original,
            )
            if self.replicas[target].submit(routed):
                return True
        self._parked.append(original)
        return True

    def _sample_failed(self, original: Op, target: int) -> Callable[[Exception], None]:
        def on_error(exc: Exception) -> None:
            if not isinstance(exc, ReplicaLost):
                original.fail(exc)
                return
            self.replicas[target].lose(exc)
            threading.Thread(
                target=self._resubmit_after_recovery, args=(original,), daemon=True
            ).start()

        return on_error

    def _resubmit_after_recovery(self, op: Op) -> None:
        """Run a sample of a lost replica again once the runs it moved are replayed (an
        ephemeral snapshot it reads is rebuilt by then)."""
        deadline = time.monotonic() + self.replay_timeout
        while self._recovering and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.1)
        with self._lock:
            if not op.finished:
                self._submit_sample(op)

    def _released(self, model_id: str) -> None:
        """A replica moved an idle run out of memory: it may come back anywhere."""
        with self._lock:
            target = self._placement.get(model_id)
            if target is not None and model_id not in self.replicas[target].runs():
                del self._placement[model_id]

    # -- loss -----------------------------------------------------------------------------

    def _lost(self, scheduler: ModelScheduler, runs: list[str], samples: list[Op]) -> None:
        """A replica's worker is gone (called once per loss, on its scheduler's thread)."""
        with self._lock:
            lost = self.replicas.index(scheduler)
            moved = sorted(set(runs) | {m for m, i in self._placement.items() if i == lost})
            for model_id in moved:
                self._placement.pop(model_id, None)
            for model_id in moved:
                self._place(model_id)
            for snapshot, home in list(self._snapshots.items()):
                if home == lost:
                    del self._snapshots[snapshot]
                    self._stale.setdefault(lost, set()).add(snapshot)
            self._stale.setdefault(lost, set()).update(moved)
            self._recovering += 1
        originals = [
            op.original if isinstance(op, _Routed) and op.original else op for op in samples
        ]
        log.warning(
            "%s replica %d lost: moving %d runs (%s), %d sample requests",
            self.info.name,
            lost,
            len(moved),
            ", ".join(f"{m}->{self._placement.get(m)}" for m in moved),
            len(originals),
        )
        threading.Thread(
            target=self._recover,
            args=(moved, originals),
            name=f"replica-recovery:{self.info.name}:{lost}",
            daemon=True,
        ).start()

    def _recover(self, runs: list[str], samples: list[Op]) -> None:
        """Replay the moved runs' logged requests, then run the lost replica's samples (their
        ephemeral snapshots are rebuilt by the replay)."""
        try:
            waits = []
            for model_id in runs:
                if self.replay is None:
                    log.error("run %s moved but no replay is set: its requests wait", model_id)
                    continue
                last = self.replay(model_id)
                if last is not None:
                    waits.append((model_id, last))
            for model_id, last in waits:
                self.wait_applied(model_id, last, self.replay_timeout)
            with self._lock:
                for op in samples:
                    if not op.finished:
                        self._submit_sample(op)
        except Exception:
            log.exception("%s: recovery after a lost replica failed", self.info.name)
        finally:
            with self._lock:
                self._recovering -= 1

    def _drop_stale(self, index: int) -> bool:
        """Remove from a replica that answers again the runs moved off it: a worker that was
        only unreachable (not restarted) still holds their old adapters. False if it is gone
        again."""
        with self._lock:
            stale = self._stale.pop(index, set())
        handle = self.replicas[index].handle
        try:
            for model_id in sorted(stale):
                if handle.has_adapter(model_id):
                    handle.remove_adapter(model_id)
        except ReplicaLost:
            with self._lock:
                self._stale.setdefault(index, set()).update(stale)
            return False
        return True

    def _probe(self) -> None:
        """Bring lost replicas back when their worker answers again; then run parked ops."""
        while not self._stopping.wait(self.probe_seconds):
            for i, scheduler in enumerate(self.replicas):
                alive = getattr(scheduler.handle, "alive", None)
                back = scheduler.lost and alive is not None and alive(self.probe_seconds)
                if back and self._drop_stale(i):
                    log.info("%s: replica %d answers again; it takes runs", self.info.name, i)
                    scheduler.rejoin()
            with self._lock:
                if not self._parked or not self._live():
                    continue
                parked, self._parked = self._parked, []
                for op in parked:
                    self.submit(op)


# What the api layer drives per base model: one in-process scheduler, or a router of replicas.
Scheduler = ModelScheduler | ReplicaRouter
