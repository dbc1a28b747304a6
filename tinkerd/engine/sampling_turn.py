"""The scheduler's side of the worker's decode batch (model/sample_engine.py): which sample
ops are decoding, one sampling turn (admit, decode for a time slice, stream and complete),
and the static batches of a handle that cannot decode step by step (an FSDP gang).

Owned by one `ModelScheduler` and run on its thread; `decoding` is also read under the
scheduler's lock by `cancel_sample`.
"""

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinkerd.engine.ops import Op, Sample
from tinkerd.engine.telemetry import BatchPart, Telemetry
from tinkerd.engine.worker_handle import ReplicaLost, WorkerHandle
from tinkerd.model.types import SampleInput

log = logging.getLogger(__name__)

Classify = Callable[[Exception], Exception]  # a worker's error -> what the op fails with


@dataclass
class Decoding:
    """A sample op in the worker's decode batch."""

    op: Op
    admitted: float  # time.time()
    sampled: int = 0  # tokens drawn so far
    hook_failed: bool = False  # its on_token raised: no more calls


class SamplingTurn:
    def __init__(self, handle: WorkerHandle, model: str, classify: Classify) -> None:
        self.handle = handle
        self.model = model
        self.classify = classify
        self.decoding: dict[str, Decoding] = {}  # request id -> its op in the batch
        self._prefix_seen = (0, 0)  # prefix-cache (lookups, hits) reported so far

    def rows(self) -> int:
        """Sequences decoding now (what admission counts against `sample_rows`)."""
        return sum(_input(d.op).num_samples for d in self.decoding.values())

    def take_all(self) -> list[Op]:
        """Take every op out of the decode batch (the worker is lost)."""
        ops = [d.op for d in self.decoding.values()]
        self.decoding.clear()
        return ops

    def run(
        self,
        ops: list[Op],
        cancelled: set[str],
        start: float,
        slice_seconds: float,
        telemetry: Telemetry,
    ) -> None:
        """Drop `cancelled` ops' rows, admit `ops`, decode for at most `slice_seconds` (at
        least one step), stream new tokens and complete finished ops. ReplicaLost
        propagates (the scheduler moves the ops)."""
        stepper: Any = self.handle
        if not hasattr(stepper, "sample_step"):  # a gang: whole static batches
            if ops:
                self._run_static(ops, start, telemetry)
            return
        self._drop_cancelled(cancelled)
        if ops:
            self._admit(ops, start)
        if not self.decoding:
            return
        try:
            finished, deltas = stepper.sample_step(slice_seconds)
        except ReplicaLost:
            raise
        except Exception as exc:
            log.warning("sampling step failed (%s); failing the batch's requests", exc)
            stepper.sample_abort()
            for op in self.take_all():
                op.fail(self.classify(exc))
            return
        for key, tokens in deltas.items():
            decoding = self.decoding.get(key)
            if decoding is not None:
                _stream(decoding, tokens)
        parts = []
        first = time.time()
        done: list[tuple[Op, object]] = []
        for key, out in finished.items():
            decoding = self.decoding.pop(key)
            item = _input(decoding.op)
            sampled = sum(len(seq.tokens) for seq in out.sequences)
            parts.append(
                BatchPart(decoding.op.request_id, item.num_samples, len(item.prompt), sampled)
            )
            first = min(first, decoding.admitted)
            done.append((decoding.op, out))
        if parts:
            telemetry.sample_batch(self.model, first, time.time(), parts)
        self._report_prefix_cache(telemetry)
        for op, out in done:
            op.done(out)

    def _report_prefix_cache(self, telemetry: Telemetry) -> None:
        stats = getattr(self.handle, "prefix_cache_stats", None)
        if stats is None:
            return
        lookups, hits = stats()
        last_lookups, last_hits = self._prefix_seen
        if lookups > last_lookups:
            telemetry.prefix_cache(self.model, lookups - last_lookups, hits - last_hits)
            self._prefix_seen = (lookups, hits)

    def _drop_cancelled(self, cancelled: set[str]) -> None:
        """Take cancelled ops' rows out of the decode batch (their callers failed them)."""
        keys = [key for key in cancelled if key in self.decoding]
        if keys:
            self.handle.sample_cancel(keys)  # type: ignore[attr-defined]
            for key in keys:
                del self.decoding[key]

    def _admit(self, ops: list[Op], start: float) -> None:
        """Prefill ops into the decode batch; if a batched admission fails, one by one (only
        the op that fails alone fails)."""
        inputs = [dataclasses.replace(_input(op), on_token=None) for op in ops]
        try:
            self.handle.sample_admit([op.request_id for op in ops], inputs)  # type: ignore[attr-defined]
        except ReplicaLost:
            raise
        except Exception as exc:
            if len(ops) > 1:
                log.warning("batched admission failed (%s); admitting one by one", exc)
                for op in ops:
                    self._admit([op], start)
                return
            ops[0].fail(self.classify(exc))
            return
        for op in ops:
            self.decoding[op.request_id] = Decoding(op, start)

    def _run_static(self, ops: list[Op], start: float, telemetry: Telemetry) -> None:
        """A handle without step-wise sampling: one static batch, to the end."""
        try:
            outputs = self.handle.sample([_input(op) for op in ops])
        except ReplicaLost:
            raise
        except Exception as exc:
            if len(ops) > 1:
                log.warning("batched sampling failed (%s); retrying one by one", exc)
                for op in ops:
                    self._run_static([op], start, telemetry)
                return
            ops[0].fail(self.classify(exc))
            return
        parts = []
        for op, out in zip(ops, outputs, strict=True):
            item = _input(op)
            sampled = sum(len(seq.tokens) for seq in getattr(out, "sequences", []))
            parts.append(BatchPart(op.request_id, item.num_samples, len(item.prompt), sampled))
        telemetry.sample_batch(self.model, start, time.time(), parts)
        for op, out in zip(ops, outputs, strict=True):
            op.done(out)


def _input(op: Op) -> SampleInput:
    action = op.action
    assert isinstance(action, Sample)
    return action.input


def _stream(decoding: Decoding, tokens: list) -> None:  # type: ignore[type-arg]
    """Call the op's on_token hook (in-process callers only) with its new tokens."""
    decoding.sampled += len(tokens)
    hook = _input(decoding.op).on_token
    if hook is None or decoding.hook_failed:
        return
    for index, choice in tokens:
        try:
            hook(index, choice)
        except Exception:  # a caller's hook never breaks the batch for the others
            log.warning("on_token hook failed; dropped for this request", exc_info=True)
            decoding.hook_failed = True
            return
