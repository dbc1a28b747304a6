"""One scheduler thread per base model: it owns that model's worker and runs everything on it.

Training: each run's ops execute strictly in `seq_id` order with no gaps; ops that arrive early
wait (the SDK sends chunks 2..n before chunk 1), and a repeat of a seq_id is ignored. Every
loop takes, from every run, the contiguous forward_backward ops at the head of its queue and
packs them into micro-batches of at most `token_budget` padded tokens, so tenants share passes
but no batch can exhaust memory (the budget comes from the activation memory per token measured
at startup). Each op completes as soon as its own rows are done. Other ops (optim_step, saves,
loads) run one at a time in their run's order.

Sampling: pending sample ops of every sampling client are batched together, alternating with
training so neither starves the other.

Durability: with `run_states`, each run's adapter and optimizer are written to disk after its
creation or load and every `state_every` optim steps (engine/run_state.py). A run whose adapter
is not in memory (released when idle, or after a restart) comes back from there on its next op.
"""

import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from tinkerd.engine.adapter_files import read_adapter, write_adapter
from tinkerd.engine.ops import (
    CreateAdapter,
    ForwardBackward,
    LoadAdapter,
    Op,
    OptimStep,
    Sample,
    SaveAdapter,
    SnapshotAdapter,
    UserError,
)
from tinkerd.engine.run_state import RunStates
from tinkerd.engine.telemetry import BatchPart, Telemetry
from tinkerd.model.metrics import reduce_metrics
from tinkerd.model.types import ForwardBackwardInput, ForwardBackwardOutput
from tinkerd.model.worker import ModelWorker, UnknownAdapterError

log = logging.getLogger(__name__)


@dataclass
class _RunQueue:
    next_seq: int
    pending: dict[int, Op] = field(default_factory=dict)
    steps_since_state: int = 0  # optim steps applied since the run's state was last written


@dataclass(frozen=True)
class _Skip:
    """A seq_id whose submission was rejected with a 4xx. The SDK takes a seq_id before it
    posts, so after a rejection that id never comes: the run's sequence must move past it
    instead of waiting for it forever (`tinker-protocol.md` §6)."""


@dataclass
class _Slice:
    """Some datums of one forward_backward op, for one micro-batch."""

    op: Op
    start: int
    end: int


class ModelScheduler:
    def __init__(
        self,
        worker: ModelWorker,
        *,
        token_budget: int = 8192,
        sample_batch: int = 64,
        max_snapshots: int = 256,
        snapshot_memory_bytes: int = 4 << 30,
        run_states: RunStates | None = None,
        state_every: int = 8,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.worker = worker
        self.telemetry = telemetry or Telemetry()  # observers (api/metrics.py, api/traces.py)
        self.token_budget = token_budget
        self.sample_batch = sample_batch
        self.max_snapshots = max_snapshots
        self.snapshot_memory_bytes = snapshot_memory_bytes
        self.run_states = run_states
        self.state_every = state_every
        # State files are written off the scheduler thread, in order (one writer).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-state")
        self._release: set[str] = set()  # idle runs to move out of memory
        self._cv = threading.Condition()
        self._runs: dict[str, _RunQueue] = {}
        self._samples: deque[Op] = deque()
        self._snapshots: deque[tuple[str, int]] = deque()  # (id, bytes) in memory, oldest first
        self._partial: dict[str, list[ForwardBackwardOutput]] = {}  # request_id -> slices done
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"scheduler:{worker.info.name}", daemon=True
        )

    # -- called from other threads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        self._writer.shutdown(wait=True)

    def submit(self, op: Op) -> None:
        """Queue an op. Training ops need `model_id` and `seq_id` (0 = the run's first)."""
        with self._cv:
            if isinstance(op.action, Sample):
                self._samples.append(op)
            else:
                assert op.model_id is not None and op.seq_id is not None
                queue = self._run_queue(op.model_id)
                if op.seq_id < queue.next_seq or op.seq_id in queue.pending:
                    return  # already applied or already queued: never apply twice
                queue.pending[op.seq_id] = op
            if not isinstance(op.action, _Skip):
                self.telemetry.op_queued(self.worker.info.name, op.request_id, time.time())
            self._cv.notify_all()

    def cancel_sample(self, request_id: str) -> Op | None:
        """Take a queued sample op out before it starts; the caller fails it. None if it is
        not queued here (started, done, or never here): it then runs to completion, since a
        batch in progress is never interrupted."""
        with self._cv:
            for i, op in enumerate(self._samples):
                if op.request_id == request_id:
                    del self._samples[i]
                    return op
        return None

    def skip(self, model_id: str, seq_id: int) -> None:
        """Mark a rejected request's seq_id as consumed (a no-op in the run's order). Does
        nothing if that seq_id is already queued or applied."""
        op = Op(
            f"skip:{model_id}:{seq_id}",
            _Skip(),  # type: ignore[arg-type]
            lambda _: None,
            lambda _: None,
            model_id=model_id,
            seq_id=seq_id,
        )
        self.submit(op)

    def _run_queue(self, model_id: str) -> _RunQueue:
        """Under the lock: the run's queue. A run not seen since it was released (or since a
        restart) continues after the seq_id its stored state includes."""
        queue = self._runs.get(model_id)
        if queue is None:
            seq = self.state_seq_id(model_id)
            queue = self._runs[model_id] = _RunQueue(next_seq=0 if seq is None else seq + 1)
        return queue

    def state_seq_id(self, model_id: str) -> int | None:
        """The last seq_id the run's stored state includes (None: no state stored)."""
        return self.run_states.seq_id(model_id) if self.run_states else None

    def release(self, model_ids: list[str]) -> None:
        """Ask for idle runs to leave memory (state written first). A run with queued ops or
        gradients not yet applied stays; it is asked again on the next sweep."""
        with self._cv:
            self._release.update(model_ids)
            self._cv.notify_all()

    def wait_applied(self, model_id: str, seq_id: int, timeout: float | None = None) -> bool:
        """Block until the run's ops up to `seq_id` are taken to run (or skipped): a sample op
        submitted after that runs after them, as this thread runs training ops first."""
        with self._cv:
            return self._cv.wait_for(
                lambda: self._stopping or self._run_queue(model_id).next_seq > seq_id, timeout
            )

    def loaded_runs(self) -> list[str]:
        """Training runs whose adapters are in memory now (for tests and stats)."""
        with self._cv:
            return [m for m in self._runs if self.worker.has_adapter(m)]

    def queued(self) -> int:
        with self._cv:
            return len(self._samples) + sum(len(q.pending) for q in self._runs.values())

    # -- the worker thread ---------------------------------------------------------------

    def _ready(self) -> bool:
        return (
            bool(self._samples)
            or bool(self._release)
            or any(q.next_seq in q.pending for q in self._runs.values())
        )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._ready():
                    self._cv.wait()
                if self._stopping:
                    return
                barriers, slices = self._take_training()
                samples = [
                    self._samples.popleft()
                    for _ in range(min(self.sample_batch, len(self._samples)))
                ]
                releases = [m for m in self._release if not self._busy(m)]
                self._release.difference_update(releases)
            for op in barriers:
                if not isinstance(op.action, _Skip):
                    self.telemetry.op_started(self.worker.info.name, op.request_id, time.time())
                self._run_barrier(op)
            slices = [s for s in slices if self._restored(s.op)]
            for batch in self._micro_batches(slices):
                if self._stopping:
                    break  # shutting down: what is left is replayed after the restart
                self._run_forward_backward(batch)
            for model_id in releases:
                self._release_run(model_id)
            if samples and not self._stopping:
                self._run_samples(samples)

    def _take_training(self) -> tuple[list[Op], list[_Slice]]:
        """Under the lock: every run's head. A run contributes either its leading
        forward_backward ops (batched across runs) or one other op (a barrier)."""
        barriers: list[Op] = []
        slices: list[_Slice] = []
        tokens = 0
        for queue in self._runs.values():
            op = queue.pending.get(queue.next_seq)
            if op is None:
                continue
            if not isinstance(op.action, ForwardBackward):
                barriers.append(queue.pending.pop(queue.next_seq))
                queue.next_seq += 1
                continue
            while op is not None and isinstance(op.action, ForwardBackward):
                if slices and tokens + op.action.tokens() > self.token_budget * 4:
                    break  # leave the rest for the next loop: keeps rounds short and fair
                queue.pending.pop(queue.next_seq)
                queue.next_seq += 1
                slices.append(_Slice(op, 0, len(op.action.input.data)))
                tokens += op.action.tokens()
                op = queue.pending.get(queue.next_seq)
        if barriers or slices:
            self._cv.notify_all()  # for wait_applied
        return barriers, slices

    def _micro_batches(self, slices: list[_Slice]) -> list[list[_Slice]]:
        """Split ops' datums into batches that fit `token_budget`. Rows are padded to the
        longest row of their batch, so a batch costs rows x longest, not the sum of lengths
        (29 rows of 80 to 513 tokens hold 8180 tokens but cost 14877). A datum longer than the
        budget goes alone."""
        batches: list[list[_Slice]] = []
        current: list[_Slice] = []
        rows = longest = 0
        for s in slices:
            data = s.op.action.input.data  # type: ignore[union-attr]
            start = 0
            for i, datum in enumerate(data):
                n = len(datum.tokens)
                if rows > 0 and (rows + 1) * max(longest, n) > self.token_budget:
                    if i > start:
                        current.append(_Slice(s.op, start, i))
                        start = i
                    batches.append(current)
                    current, rows, longest = [], 0, 0
                rows += 1
                longest = max(longest, n)
            current.append(_Slice(s.op, start, len(data)))
        if current:
            batches.append(current)
        return batches

    def _run_forward_backward(self, batch: list[_Slice]) -> None:
        inputs = []
        for s in batch:
            full: ForwardBackwardInput = s.op.action.input  # type: ignore[union-attr]
            inputs.append(dataclasses.replace(full, data=full.data[s.start : s.end]))
        start = time.time()
        for s in batch:
            if s.start == 0:
                self.telemetry.op_started(self.worker.info.name, s.op.request_id, start)
        try:
            outputs = self.worker.forward_backward(inputs)
        except Exception as exc:
            if len(batch) > 1:
                log.warning("batched forward_backward failed (%s); retrying one by one", exc)
                for s in batch:
                    self._run_forward_backward([s])
                return
            self._partial.pop(batch[0].op.request_id, None)
            batch[0].op.fail(_classify(exc))
            return
        rows = [[len(d.tokens) for d in i.data] for i in inputs]
        self.telemetry.micro_batch(
            self.worker.info.name,
            start,
            time.time(),
            [BatchPart(s.op.request_id, len(r), sum(r)) for s, r in zip(batch, rows, strict=True)],
            padded_tokens=sum(map(len, rows)) * max((n for r in rows for n in r), default=0),
            trained_tokens=sum(
                sum(r) for i, r in zip(inputs, rows, strict=True) if not i.forward_only
            ),
        )
        for s, out in zip(batch, outputs, strict=True):
            self._collect(s, out)

    def _collect(self, s: _Slice, out: ForwardBackwardOutput) -> None:
        """Merge an op's slices; complete it when its last datum is in."""
        parts = self._partial.setdefault(s.op.request_id, [])
        parts.append(out)
        if s.end == len(s.op.action.input.data):  # type: ignore[union-attr]
            del self._partial[s.op.request_id]
            s.op.done(
                ForwardBackwardOutput(
                    loss_fn_outputs=[o for p in parts for o in p.loss_fn_outputs],
                    metrics=reduce_metrics((p.metrics, len(p.loss_fn_outputs)) for p in parts),
                )
            )

    def _run_barrier(self, op: Op) -> None:
        action = op.action
        model_id = op.model_id
        assert model_id is not None
        if not isinstance(action, (CreateAdapter, LoadAdapter, _Skip)) and not self._restored(op):
            return
        try:
            if isinstance(action, _Skip):
                result: object = None
            elif isinstance(action, CreateAdapter):
                self.worker.add_adapter(model_id, action.config)
                result = None
            elif isinstance(action, OptimStep):
                result = self.worker.optim_step(model_id, action.params)
            elif isinstance(action, SaveAdapter):
                state = self.worker.export_adapter(model_id, with_optimizer=action.with_optimizer)
                result = write_adapter(
                    action.directory, state, action.base_model, overwrite=action.overwrite
                )
            elif isinstance(action, SnapshotAdapter):
                self.worker.snapshot_adapter(model_id, action.snapshot_id)
                self._remember_snapshot(action.snapshot_id)
                result = None
            elif isinstance(action, LoadAdapter):
                state = read_adapter(action.directory, with_optimizer=action.with_optimizer)
                self.worker.import_adapter(model_id, state)
                result = None
            else:
                raise TypeError(f"unknown action {action!r}")
        except Exception as exc:
            op.fail(_classify(exc))
            return
        self._after_barrier(op)
        op.done(result)

    # -- run state -----------------------------------------------------------------------

    def _restored(self, op: Op) -> bool:
        """Bring the op's run back into memory from its stored state if it is not there.
        False (and the op failed) if that fails; a run with no state is left to the op."""
        model_id = op.model_id
        if model_id is None or self.worker.has_adapter(model_id) or self.run_states is None:
            return True
        try:
            state = self.run_states.read(model_id)
            if state is not None:
                self.worker.import_adapter(model_id, state)
                log.info("run %s restored from its stored state", model_id)
        except Exception as exc:
            log.exception("run %s: stored state unreadable", model_id)
            op.fail(exc)
            return False
        return True

    def _after_barrier(self, op: Op) -> None:
        """Write the run's state after creation/load and every `state_every` optim steps."""
        if self.run_states is None:
            return
        assert op.model_id is not None and op.seq_id is not None
        with self._cv:
            queue = self._run_queue(op.model_id)
            if isinstance(op.action, OptimStep):
                queue.steps_since_state += 1
                if queue.steps_since_state < self.state_every:
                    return
            elif not isinstance(op.action, (CreateAdapter, LoadAdapter)):
                return
            queue.steps_since_state = 0
        written = self._write_state(op.model_id, op.seq_id)
        if not isinstance(op.action, OptimStep):
            # A run's first state is written before its op completes: replaying its creation
            # could not reproduce an unseeded initialization.
            written.result()

    def _write_state(self, model_id: str, seq_id: int) -> Future[None]:
        """Copy the run's tensors now (on this thread); write them on the writer thread."""
        assert self.run_states is not None
        run_states = self.run_states
        state = self.worker.export_adapter(model_id, with_optimizer=True)
        base_model = self.worker.info.name

        def write() -> None:
            try:
                run_states.write(model_id, state, base_model, seq_id)
            except Exception:
                log.exception("run %s: writing its state failed (replay covers it)", model_id)
                raise

        return self._writer.submit(write)

    def _busy(self, model_id: str) -> bool:
        """Under the lock: the run has work queued (in-flight work of a loop iteration is
        finished before that iteration's releases)."""
        queue = self._runs.get(model_id)
        return bool(queue and queue.pending)

    def _release_run(self, model_id: str) -> None:
        if self.run_states is None or not self.worker.has_adapter(model_id):
            return
        if self.worker.has_pending_grads(model_id):
            return  # the state on disk cannot hold gradients; keep it until its optim_step
        with self._cv:
            queue = self._runs.get(model_id)
            if queue is None or queue.pending:
                return
            seq_id = queue.next_seq - 1
        try:
            self._write_state(model_id, seq_id).result()
        except Exception:
            return  # stays in memory
        self.worker.remove_adapter(model_id)
        with self._cv:
            if not self._runs[model_id].pending:
                del self._runs[model_id]  # rebuilt from the stored state's seq_id on next use
        log.info("run %s released from memory (state at seq_id %d)", model_id, seq_id)

    def _remember_snapshot(self, snapshot_id: str) -> None:
        """Keep at most `max_snapshots` sampler snapshots, of at most `snapshot_memory_bytes`
        together, in memory: the oldest are dropped (saved ones reload from disk on their next
        use; an ephemeral one answers "no longer available")."""
        # A snapshot taken again under the same id (an inflight target) moves to the back.
        self._snapshots = deque((i, n) for i, n in self._snapshots if i != snapshot_id)
        self._snapshots.append((snapshot_id, self.worker.adapter_bytes(snapshot_id)))
        total = sum(size for _, size in self._snapshots)
        while len(self._snapshots) > 1 and (
            len(self._snapshots) > self.max_snapshots or total > self.snapshot_memory_bytes
        ):
            old, size = self._snapshots.popleft()
            total -= size
            if self.worker.has_adapter(old):
                self.worker.remove_adapter(old)
        self.telemetry.snapshots(self.worker.info.name, len(self._snapshots), total)

    def _ensure_snapshot(self, op: Op) -> None:
        action = op.action
        assert isinstance(action, Sample)
        adapter_id = action.input.adapter_id
        if adapter_id is None or self.worker.has_adapter(adapter_id):
            return
        if action.snapshot_dir is None:
            raise UserError(f"sampler weights {adapter_id!r} are no longer available")
        self.worker.import_snapshot(
            adapter_id, read_adapter(action.snapshot_dir, with_optimizer=False)
        )
        self._remember_snapshot(adapter_id)

    def _run_samples(self, ops: list[Op]) -> None:
        start = time.time()
        for op in ops:
            self.telemetry.op_started(self.worker.info.name, op.request_id, start)
        ready = []
        for op in ops:
            try:
                self._ensure_snapshot(op)
                ready.append(op)
            except Exception as exc:
                op.fail(_classify(exc))
        if not ready:
            return
        try:
            outputs = self.worker.sample([op.action.input for op in ready])  # type: ignore[union-attr]
        except Exception as exc:
            if len(ready) > 1:
                log.warning("batched sampling failed (%s); retrying one by one", exc)
                for op in ready:
                    self._run_samples([op])
                return
            ready[0].fail(_classify(exc))
            return
        parts = []
        for op, out in zip(ready, outputs, strict=True):
            item = op.action.input  # type: ignore[union-attr]
            sampled = sum(len(seq.tokens) for seq in getattr(out, "sequences", []))
            parts.append(BatchPart(op.request_id, item.num_samples, len(item.prompt), sampled))
        self.telemetry.sample_batch(self.worker.info.name, start, time.time(), parts)
        for op, out in zip(ready, outputs, strict=True):
            op.done(out)


def _classify(exc: Exception) -> Exception:
    """User errors stay user errors; a missing adapter is the caller's unknown id."""
    if isinstance(exc, UnknownAdapterError):
        return UserError(f"unknown model or sampler: {exc.args[0]}")
    if isinstance(exc, FileNotFoundError):
        return UserError(str(exc))
    return exc
