"""What every endpoint family shares: errors, the answer of future-returning calls, and the
path of every such request (store the future durably, queue its op, encode and store its
result from the op's callbacks, wake the long-pollers).

Resource families build on `ServiceBase`: `checkpoint_service.py`, `training_service.py`,
`sampling_service.py`; `service.py` puts them together.
"""

import json
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinkerd import logs
from tinkerd.api.custom_losses import CustomLosses
from tinkerd.api.futures import FutureHub, completion_queue_key
from tinkerd.api.metrics import ServiceHooks
from tinkerd.api.service_types import ApiError, not_found
from tinkerd.engine.ops import (
    Op,
    UserError,
)
from tinkerd.engine.replicas import Scheduler
from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.losses import LossInputError
from tinkerd.store.records import (
    CheckpointRecord,
    FutureRecord,
    SessionRecord,
    TrainingRunRecord,
)
from tinkerd.store.store import Store

log = logging.getLogger(__name__)

# The logged request being replayed after a restart (None while serving clients).
replaying: ContextVar[FutureRecord | None] = ContextVar("replaying", default=None)


class ServiceBase:
    """Models, sessions, and the future plumbing every endpoint family uses."""

    # Metrics and session-trace timings of futures (api/metrics.py; set by the app).
    hooks: ServiceHooks = ServiceHooks()

    def __init__(
        self,
        store: Store,
        schedulers: dict[str, Scheduler],
        checkpoint_root: Path,
        hub: FutureHub,
        *,
        stability_max_bytes: int = 1 << 30,
        custom_losses: CustomLosses | None = None,
    ) -> None:
        self.store = store
        self.custom_losses = custom_losses or CustomLosses(store)
        self.schedulers = schedulers
        self.checkpoint_root = checkpoint_root
        self.hub = hub
        # Sequence records (record_stability_info): at most this many bytes on disk; an
        # estimate of the total (None: not read yet) triggers a sweep when it passes the bound.
        self.stability_max_bytes = stability_max_bytes
        self._stability_bytes: int | None = None
        self._bookkeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bookkeeping")
        self._download_secret: bytes | None = None

    def infos(self) -> list[BaseModelInfo]:
        return [s.front.info for s in self.schedulers.values()]

    def scheduler(self, base_model: str) -> Scheduler:
        if base_model not in self.schedulers:
            served = ", ".join(self.schedulers)
            raise ApiError(404, f"base_model {base_model!r} is not served here; served: {served}")
        return self.schedulers[base_model]

    def create_session(self, user: str, body: dict[str, Any]) -> str:
        session_id = str(uuid.uuid4())
        self.store.create_session(
            SessionRecord(
                session_id=session_id,
                user=user,
                tags=list(body.get("tags") or []),
                user_metadata=dict(body.get("user_metadata") or {}),
                sdk_version=body.get("sdk_version"),
                project_id=body.get("project_id"),
                display_name=body.get("display_name"),
            )
        )
        return session_id

    def session(self, session_id: str, user: str) -> SessionRecord:
        rec = self.store.get_session(session_id, user)
        if rec is None:
            raise not_found(f"session {session_id!r}")
        return rec

    def run(self, model_id: str, user: str) -> TrainingRunRecord:
        rec = self.store.get_training_run(model_id, user)
        if rec is None:
            raise not_found(f"model {model_id!r}")
        return rec

    def _submit(
        self,
        user: str,
        kind: str,
        body: Any,
        scheduler: Scheduler,
        make_op: Callable[[str], Op],
        *,
        model_id: str | None = None,
        seq_id: int | None = None,
    ) -> FutureRecord:
        """Store the future (deduped by (model_id, seq_id)), then queue its op once.

        While replaying a logged request (see `replay`), the future exists already: its op is
        queued again under the same request_id, and if it had completed, only for its effect
        on the run (the stored result stays as the client may have read it)."""
        logs.bind(model=model_id, seq_id=seq_id, kind=kind)  # for this request's log lines
        logged = replaying.get()
        if logged is not None:
            op = make_op(logged.request_id)
            if logged.status == "complete":
                op = Op(
                    op.request_id,
                    op.action,
                    lambda _: None,
                    lambda exc: log.error("replay of %s failed: %s", op.request_id, exc),
                    op.model_id,
                    op.seq_id,
                )
            pending = logged.status == "pending"
            self.hooks.replayed(logged.request_id, logged.user, logged.kind, pending)
            scheduler.submit(op)
            return logged
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        rec = FutureRecord(
            request_id=str(uuid.uuid4()),
            user=user,
            kind=kind,
            request=raw,
            model_id=model_id,
            seq_id=seq_id,
        )
        stored = self.store.create_future(rec)
        if stored.request_id == rec.request_id:
            self.hooks.created(rec.request_id, user, kind)
            scheduler.submit(make_op(rec.request_id))
        return stored

    def _callbacks(
        self,
        request_id: str,
        encode: Callable[[object], tuple[bytes, str]],
        queue: str | None = None,
    ) -> tuple[Callable[[object], None], Callable[[Exception], None]]:
        """`queue`: the sampling session whose completion queue the future joins (a sample
        with a seq_id), whose /retrieve_futures pollers are woken too."""

        def done(result: object) -> None:
            try:
                data, result_type = encode(result)
            except Exception as exc:
                failed(exc)
                return
            timing = self.hooks.finished(request_id, "complete")
            self.store.complete_future(request_id, data, result_type, **timing)
            self._wake(
                request_id, finished_record(request_id, "complete", data, result_type), queue
            )

        def failed(exc: Exception) -> None:
            user_error = isinstance(exc, (UserError, LossInputError, ValueError, KeyError))
            if not user_error:
                log.exception("request %s failed", request_id, exc_info=exc)
            message = str(exc) or type(exc).__name__
            category = "user" if user_error else "server"
            timing = self.hooks.finished(request_id, "failed", category)
            self.store.fail_future(request_id, message, category, **timing)
            record = finished_record(request_id, "failed", error=message, category=category)
            self._wake(request_id, record, queue)

        return done, failed

    def _wake(self, request_id: str, record: FutureRecord, queue: str | None) -> None:
        """Wake the long-pollers of a future just stored as finished, and of its queue."""
        self.hub.notify(request_id, record)
        if queue is not None:
            self.hub.notify(completion_queue_key(queue), record)

    def _op(
        self,
        request_id: str,
        action: Any,
        encode: Callable[[object], tuple[bytes, str]],
        model_id: str | None = None,
        seq_id: int | None = None,
        queue: str | None = None,
    ) -> Op:
        done, failed = self._callbacks(request_id, encode, queue)
        if model_id is None:
            return Op(request_id, action, done, failed)

        def done_and_touch(result: object) -> None:
            done(result)
            # Bookkeeping off the scheduler thread: the run's next op need not wait for it.
            self._bookkeeping.submit(self.store.touch_training_run, model_id)

        return Op(request_id, action, done_and_touch, failed, model_id=model_id, seq_id=seq_id)

    def get_future(self, request_id: str, user: str) -> FutureRecord:
        rec = self.store.get_future(request_id)
        if rec is None or rec.user != user:
            raise not_found(f"request {request_id!r}")
        return rec

    def fail_unfinished(self, rec: FutureRecord, message: str) -> None:
        if rec.status == "pending":
            self.store.fail_future(rec.request_id, message, "server")
            queue = rec.model_id if rec.kind == "sample" else None
            record = finished_record(rec.request_id, "failed", error=message, category="server")
            self._wake(rec.request_id, record, queue)


def inflight_adapter_id(model_id: str) -> str:
    """The one mutable sampler target that every inflight client of a run samples."""
    return f"{model_id}:inflight"


def as_utc(t: datetime) -> datetime:
    """The store may hand back naive datetimes (SQLite); they are UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def expired(rec: CheckpointRecord) -> bool:
    return rec.expires_at is not None and rec.expires_at <= datetime.now(UTC)


def json_result(data: dict[str, Any]) -> tuple[bytes, str]:
    return json.dumps(data).encode(), "json"


def finished_record(
    request_id: str,
    status: str,
    result: bytes | None = None,
    result_type: str | None = None,
    error: str | None = None,
    category: str | None = None,
) -> FutureRecord:
    """The finished future as just stored, for long-pollers (only these fields are read)."""
    return FutureRecord(
        request_id=request_id,
        user="",
        kind="",
        request=b"",
        status=status,
        result=result,
        result_type=result_type,
        error=error,
        category=category,
    )
