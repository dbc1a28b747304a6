"""One scheduler thread per worker: it drives that worker (a `WorkerHandle`: in-process, a Ray
actor, or a gang) and runs everything on it. One per base model by default; with replicas, one
per replica behind engine/replicas.py.

Training: each run's ops execute strictly in `seq_id` order with no gaps; ops that arrive early
wait (the SDK sends chunks 2..n before chunk 1), and a repeat of a seq_id is ignored. Every
loop takes, from every run, the contiguous forward_backward ops at the head of its queue and
packs them into micro-batches of at most `token_budget` padded tokens, so tenants share passes
but no batch can exhaust memory (the budget comes from the activation memory per token measured
at startup). Each op completes as soon as its own rows are done. Other ops (optim_step, saves,
loads) run one at a time in their run's order.

Sampling (continuous batching, model/sample_engine.py; this thread's side of it in
engine/sampling_turn.py): each loop iteration admits the queued
sample ops of every sampling client into the worker's running decode batch (at most
`sample_batch` requests and `sample_rows` sequences decode together; a request that does not
fit waits, and no later one overtakes it), then runs decode steps for at most
`sample_slice_seconds` (at least one step), then goes back to training. Finished requests
complete at once; new ones join at the next iteration. Fairness bound: a training op that is
at the head of its run waits at most one sampling turn (one admission prefill of the requests
queued then + decode steps for `sample_slice_seconds`, plus the one step that crosses it)
before its micro-batch runs; a queued sample op waits at most one loop's training work (the
ops at the heads of the run queues when the loop began, at most 4 x `token_budget` tokens per
run) before it is admitted. Neither waits for the other to finish.

Durability: with `run_states`, each run's adapter and optimizer are written to disk after its
creation or load and every `state_every` optim steps (engine/run_state.py). A run whose adapter
is not in memory (released when idle, or after a restart) comes back from there on its next op.
The worker reads and writes those files itself (paths cross, tensors do not).

Worker loss: `ReplicaLost` from any worker call ends the loop iteration; `lose` fences every op
held here (a late result cannot complete it) and hands the runs and sample ops to `on_lost`.
"""

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tinkerd.engine.local_worker import LocalWorker
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
from tinkerd.engine.sampling_turn import SamplingTurn
from tinkerd.engine.telemetry import BatchPart, Telemetry
from tinkerd.engine.threads import single_threaded, take_threads
from tinkerd.engine.vllm_sampler import VllmSamplerPool
from tinkerd.engine.worker_handle import ReplicaLost, WorkerHandle
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


LostCallback = Callable[["ModelScheduler", list[str], list[Op]], None]


class ModelScheduler:
    """The scheduler of one worker (one replica of a base model). `worker` is an in-process
    `ModelWorker` (wrapped in a `LocalWorker`) or any `WorkerHandle`; the scheduler drives it
    through `handle` and the api layer reads the model through `front`.

    A handle that raises `ReplicaLost` marks this scheduler lost (`lose`): its epoch moves on,
    every op it held is fenced (a late result can no longer complete it) and `on_lost` gets the
    runs it held and the sample ops to run elsewhere (engine/replicas.py)."""

    def __init__(
        self,
        worker: WorkerHandle | ModelWorker,
        *,
        token_budget: int = 8192,
        sample_batch: int = 64,
        sample_slice_seconds: float = 0.05,
        sample_rows: int = 256,
        max_snapshots: int = 256,
        snapshot_memory_bytes: int = 4 << 30,
        run_states: RunStates | None = None,
        state_every: int = 8,
        telemetry: Telemetry | None = None,
        on_lost: LostCallback | None = None,
        on_released: Callable[[str], None] | None = None,
        threads: int | None = None,
    ) -> None:
        self.worker = worker
        local = isinstance(worker, ModelWorker)
        self.handle: WorkerHandle = LocalWorker(worker) if local else worker
        self.front = self.handle.front()
        self.on_lost = on_lost
        self.vllm_pool: VllmSamplerPool | None = None  # attach_vllm
        self.on_released = on_released
        self.epoch = 0  # moves on each time the worker is lost
        self.lost = False
        self.telemetry = telemetry or Telemetry()  # observers (api/metrics.py, api/traces.py)
        self.token_budget = token_budget
        self.sample_batch = sample_batch  # most requests decoding together
        self.sample_slice_seconds = sample_slice_seconds  # decode time per loop iteration
        self.sample_rows = sample_rows  # most sequences decoding together (KV memory)
        self.max_snapshots = max_snapshots
        self.snapshot_memory_bytes = snapshot_memory_bytes
        self.run_states = run_states
        self.state_every = state_every
        self._release: set[str] = set()  # idle runs to move out of memory
        self._cv = threading.Condition()
        self._runs: dict[str, _RunQueue] = {}
        self._samples: deque[Op] = deque()
        # Sample ops in the worker's decode batch (engine/sampling_turn.py).
        self._turn = SamplingTurn(self.handle, self.front.info.name, _classify)
        self._cancelled: set[str] = set()  # decoding ops cancelled (under the lock)
        self._snapshots: deque[tuple[str, int]] = deque()  # (id, bytes) in memory, oldest first
        self._partial: dict[str, list[ForwardBackwardOutput]] = {}  # request_id -> slices done
        self._stopping = False
        # Intra-op threads this thread takes for itself (engine/threads.py); None: torch's.
        self.threads = threads
        self._threads_taken = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"scheduler:{self.handle.info.name}", daemon=True
        )

    # -- called from other threads -------------------------------------------------------

    def start(self) -> None:
        """Start the thread. With `threads`, once it holds them, the calling thread and
        those that start later run torch single-threaded (engine/threads.py)."""
        self._thread.start()
        if self.threads:
            self._threads_taken.wait()
            single_threaded()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        self.handle.close()
        if self.vllm_pool is not None:
            self.vllm_pool.close()

    def attach_vllm(self, pool: VllmSamplerPool) -> None:
        """Send the sample ops vLLM serves faithfully to `pool` (engine/vllm_sampler.py); the
        rest, and all of them if its runner dies, stay here. Before `start`."""
        pool.fallback = self.submit
        pool.telemetry = self.telemetry
        self.vllm_pool = pool

    def submit(self, op: Op) -> bool:
        """Queue an op. Training ops need `model_id` and `seq_id` (0 = the run's first).
        False if this scheduler's worker is lost: the op is not taken (the caller places it)."""
        with self._cv:
            if self.lost:
                return False
            if isinstance(op.action, Sample):
                if self.vllm_pool is not None and self.vllm_pool.try_submit(op):
                    return True
                self._samples.append(op)
            else:
                assert op.model_id is not None and op.seq_id is not None
                queue = self._run_queue(op.model_id)
                if op.seq_id < queue.next_seq or op.seq_id in queue.pending:
                    return True  # already applied or already queued: never apply twice
                queue.pending[op.seq_id] = op
            if not isinstance(op.action, _Skip):
                self.telemetry.op_queued(self.front.info.name, op.request_id, time.time())
            self._cv.notify_all()
        return True

    def cancel_sample(self, request_id: str) -> Op | None:
        """Take a sample op out, queued or decoding (its rows leave the decode batch at the
        next turn); the caller fails it. None if it is not here (done, or never here)."""
        if self.vllm_pool is not None:
            taken = self.vllm_pool.cancel(request_id)
            if taken is not None:
                return taken
        with self._cv:
            for i, op in enumerate(self._samples):
                if op.request_id == request_id:
                    del self._samples[i]
                    return op
            decoding = self._turn.decoding.get(request_id)
            if decoding is not None and not decoding.op.finished:
                self._cancelled.add(request_id)
                self._cv.notify_all()
                return decoding.op
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
            epoch = self.epoch
            return self._cv.wait_for(
                lambda: (
                    self._stopping
                    or self.epoch != epoch
                    or self._run_queue(model_id).next_seq > seq_id
                ),
                timeout,
            )

    def loaded_runs(self) -> list[str]:
        """Training runs whose adapters are in memory now (for tests and stats)."""
        with self._cv:
            runs = list(self._runs)
        try:
            return [m for m in runs if self.handle.has_adapter(m)]
        except ReplicaLost:
            return []

    def adapter_bytes(self, model_id: str) -> int:
        """Memory of a run's adapter weights on this worker (for metrics)."""
        return self.handle.adapter_bytes(model_id)

    def runs(self) -> list[str]:
        """Training runs with a queue here (in memory, or about to be)."""
        with self._cv:
            return list(self._runs)

    def lose(self, exc: BaseException, in_flight: Iterable[Op] = ()) -> None:
        """The worker is gone: fence every training op held here (they are replayed from
        the request log where their runs go next), and hand the runs and the sample ops not
        finished to `on_lost`. Safe from any thread; once per loss."""
        with self._cv:
            if self.lost:
                return
            self.lost = True
            self.epoch += 1
            held = [op for q in self._runs.values() for op in q.pending.values()]
            held += [op for op in in_flight if not op.finished]
            runs = {m for m in self._runs} | {op.model_id for op in held if op.model_id}
            samples = list(self._samples)
            for op in held:
                if isinstance(op.action, Sample):
                    samples.append(op)
                else:
                    op.finished = True  # fenced: a late result of the lost worker is dropped
            self._runs.clear()
            self._samples.clear()
            self._partial.clear()
            self._release.clear()
            self._snapshots.clear()
            self._cv.notify_all()
        log.warning(
            "worker of %s lost (%s): %d runs and %d sample requests move",
            self.handle.info.name,
            exc,
            len(runs),
            len(samples),
        )
        if self.on_lost is not None:
            self.on_lost(self, sorted(runs), samples)

    def rejoin(self) -> None:
        """The worker answers again (restarted, empty): take new runs."""
        with self._cv:
            self.lost = False
            self._cv.notify_all()

    def queued(self) -> int:
        with self._cv:
            return len(self._samples) + sum(len(q.pending) for q in self._runs.values())

    # -- the worker thread ---------------------------------------------------------------

    def _ready(self) -> bool:
        return (
            bool(self._samples)
            or bool(self._turn.decoding)
            or bool(self._release)
            or any(q.next_seq in q.pending for q in self._runs.values())
        )

    def _loop(self) -> None:
        if self.threads:
            take_threads(self.threads)
            self._threads_taken.set()
        while True:
            with self._cv:
                while not self._stopping and not self._ready():
                    self._cv.wait()
                if self._stopping:
                    return
                barriers, slices = self._take_training()
                samples = self._take_samples()
                releases = [m for m in self._release if not self._busy(m)]
                self._release.difference_update(releases)
            try:
                self._run_training(barriers, slices, releases)
            except ReplicaLost as exc:
                self.lose(
                    exc, [*barriers, *(s.op for s in slices), *samples, *self._turn.take_all()]
                )
                continue
            if (samples or self._turn.decoding) and not self._stopping:
                try:
                    self._run_samples(samples)
                except ReplicaLost as exc:
                    self.lose(exc, [*samples, *self._turn.take_all()])

    def _run_training(self, barriers: list[Op], slices: list[_Slice], releases: list[str]) -> None:
        """One loop's training work; ReplicaLost from any worker call ends it."""
        for op in barriers:
            if not isinstance(op.action, _Skip):
                self.telemetry.op_started(self.front.info.name, op.request_id, time.time())
            self._run_barrier(op)
        slices = [s for s in slices if self._restored(s.op)]
        for batch in self._micro_batches(slices):
            if self._stopping:
                break  # shutting down: what is left is replayed after the restart
            self._run_forward_backward(batch)
        for model_id in releases:
            self._release_run(model_id)

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
                self.telemetry.op_started(self.front.info.name, s.op.request_id, start)
        try:
            outputs = self.handle.forward_backward(inputs)
        except ReplicaLost:
            raise
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
            self.front.info.name,
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
                self.handle.add_adapter(model_id, action.config)
                result = None
            elif isinstance(action, OptimStep):
                result = self.handle.optim_step(model_id, action.params)
            elif isinstance(action, SaveAdapter):
                result = self.handle.save_adapter(
                    model_id,
                    action.directory,
                    action.base_model,
                    with_optimizer=action.with_optimizer,
                    overwrite=action.overwrite,
                )
            elif isinstance(action, SnapshotAdapter):
                self.handle.snapshot_adapter(model_id, action.snapshot_id)
                self._remember_snapshot(action.snapshot_id)
                self._publish_to_vllm(action.snapshot_id)
                result = None
            elif isinstance(action, LoadAdapter):
                self.handle.load_adapter(
                    model_id, action.directory, with_optimizer=action.with_optimizer
                )
                result = None
            else:
                raise TypeError(f"unknown action {action!r}")
        except ReplicaLost:
            raise
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
        if model_id is None or self.run_states is None or self.handle.has_adapter(model_id):
            return True
        try:
            if self.handle.read_state(model_id, self.run_states.root):
                log.info("run %s restored from its stored state", model_id)
        except ReplicaLost:
            raise
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
        # A run's first state is written before its op completes: replaying its creation
        # could not reproduce an unseeded initialization. Later ones are written behind.
        self._write_state(op.model_id, op.seq_id, wait=not isinstance(op.action, OptimStep))

    def _write_state(self, model_id: str, seq_id: int, *, wait: bool) -> None:
        """The worker copies the run's tensors now and writes them (in the background
        unless `wait`), in order."""
        assert self.run_states is not None
        self.handle.write_state(
            model_id, self.run_states.root, self.handle.info.name, seq_id, wait=wait
        )

    def _busy(self, model_id: str) -> bool:
        """Under the lock: the run has work queued (in-flight work of a loop iteration is
        finished before that iteration's releases)."""
        queue = self._runs.get(model_id)
        return bool(queue and queue.pending)

    def _release_run(self, model_id: str) -> None:
        if self.run_states is None or not self.handle.has_adapter(model_id):
            return
        if self.handle.has_pending_grads(model_id):
            return  # the state on disk cannot hold gradients; keep it until its optim_step
        with self._cv:
            queue = self._runs.get(model_id)
            if queue is None or queue.pending:
                return
            seq_id = queue.next_seq - 1
        try:
            self._write_state(model_id, seq_id, wait=True)
        except ReplicaLost:
            raise
        except Exception:
            return  # stays in memory
        self.handle.remove_adapter(model_id)
        with self._cv:
            released = not self._runs[model_id].pending
            if released:
                del self._runs[model_id]  # rebuilt from the stored state's seq_id on next use
        log.info("run %s released from memory (state at seq_id %d)", model_id, seq_id)
        if released and self.on_released is not None:
            self.on_released(model_id)  # it may come back on another replica

    def _remember_snapshot(self, snapshot_id: str) -> None:
        """Keep at most `max_snapshots` sampler snapshots, of at most `snapshot_memory_bytes`
        together, in memory: the oldest are dropped (saved ones reload from disk on their next
        use; an ephemeral one answers "no longer available")."""
        # A snapshot taken again under the same id (an inflight target) moves to the back.
        self._snapshots = deque((i, n) for i, n in self._snapshots if i != snapshot_id)
        self._snapshots.append((snapshot_id, self.handle.adapter_bytes(snapshot_id)))
        total = sum(size for _, size in self._snapshots)
        while len(self._snapshots) > 1 and (
            len(self._snapshots) > self.max_snapshots or total > self.snapshot_memory_bytes
        ):
            old, size = self._snapshots.popleft()
            total -= size
            if self.handle.has_adapter(old):
                self.handle.remove_adapter(old)
            if self.vllm_pool is not None:
                self.vllm_pool.forget(old)
        self.telemetry.snapshots(self.front.info.name, len(self._snapshots), total)

    def _publish_to_vllm(self, snapshot_id: str) -> None:
        """Give the vLLM pool the snapshot's adapter files (a fresh directory per version), so
        its samples can run there; saved snapshots already have theirs."""
        if self.vllm_pool is None:
            return
        directory = self.vllm_pool.new_snapshot_dir()
        self.handle.save_adapter(
            snapshot_id, directory, self.front.info.name, with_optimizer=False, overwrite=True
        )
        self.vllm_pool.register_snapshot(snapshot_id, directory)

    def _ensure_snapshot(self, op: Op) -> None:
        action = op.action
        assert isinstance(action, Sample)
        adapter_id = action.input.adapter_id
        if adapter_id is None or self.handle.has_adapter(adapter_id):
            return
        if action.snapshot_dir is None:
            raise UserError(f"sampler weights {adapter_id!r} are no longer available")
        self.handle.load_snapshot(adapter_id, action.snapshot_dir)
        self._remember_snapshot(adapter_id)

    def _take_samples(self) -> list[Op]:
        """Under the lock: the queued sample ops that fit the decode batch, in arrival order
        (at most `sample_batch` requests and `sample_rows` rows decode together; a request
        larger than that runs alone)."""
        taken: list[Op] = []
        requests = len(self._turn.decoding)
        rows = self._turn.rows()
        while self._samples and requests < self.sample_batch:
            n = self._samples[0].action.input.num_samples  # type: ignore[union-attr]
            if requests and rows + n > self.sample_rows:
                break  # first come, first served: no overtaking by smaller requests
            taken.append(self._samples.popleft())
            requests += 1
            rows += n
        return taken

    def _run_samples(self, ops: list[Op]) -> None:
        """One sampling turn (engine/sampling_turn.py) for `ops` and the decoding ones, after
        loading the sampler weights they name. ReplicaLost propagates (the caller moves the
        ops)."""
        start = time.time()
        for op in ops:
            self.telemetry.op_started(self.front.info.name, op.request_id, start)
        ready = []
        for op in ops:
            try:
                self._ensure_snapshot(op)
                ready.append(op)
            except ReplicaLost:
                raise
            except Exception as exc:
                op.fail(_classify(exc))
        with self._cv:
            cancelled, self._cancelled = self._cancelled, set()
        self._turn.run(ready, cancelled, start, self.sample_slice_seconds, self.telemetry)


def _classify(exc: Exception) -> Exception:
    """User errors stay user errors; a missing adapter is the caller's unknown id."""
    if isinstance(exc, UnknownAdapterError):
        return UserError(f"unknown model or sampler: {exc.args[0]}")
    if isinstance(exc, FileNotFoundError):
        return UserError(str(exc))
    return exc
