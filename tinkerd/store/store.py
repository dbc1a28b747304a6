"""The durable store: plain records in and out, SQLAlchemy (SQLite or PostgreSQL) underneath.

Every method opens its own short ORM session and transaction, so one `Store` can be shared by
the API threadpool and the engine threads. ORM rows never leave this module.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Engine,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tinkerd.store.db import (
    ApiKeyRow,
    Base,
    CheckpointRow,
    CustomLossRow,
    FutureRow,
    SamplingClientRow,
    SamplingSessionRow,
    SessionRow,
    StabilityRow,
    TrainingRunRow,
    UTCDateTime,
)
from tinkerd.store.records import (
    ApiKeyRecord,
    CheckpointRecord,
    Completion,
    CustomLossRecord,
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    StabilityRecord,
    TrainingRunRecord,
)

R = TypeVar("R")
Row = TypeVar("Row", bound=Base)

# Record fields the store fills with "now" when the caller leaves them None.
_NOW_FIELDS = ("created_at", "last_heartbeat", "last_request_time", "last_used_at")
# Columns added since the first release: (table, column, type). `_upgrade` adds them to
# databases made before; each is nullable, so old rows stay valid.
_ADDED_COLUMNS = (
    ("futures", "completion_seq", BigInteger()),
    ("sampling_sessions", "inflight", Boolean()),
    ("futures", "started_at", UTCDateTime()),
    ("futures", "timings", JSON()),
)
# Clients of a sampling session number their seq_ids from client_id * this (the SDK's
# `cloned_sampler_id = seq_id // 1_000_000_000`).
CLIENT_SEQ_BLOCK = 1_000_000_000
# How long a SQLite writer waits for the lock before "database is locked" (milliseconds).
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def _now() -> datetime:
    return datetime.now(UTC)


def _to_row(row_cls: type[Row], rec: Any) -> Row:
    """A new ORM row from a record (same attribute names), with missing timestamps set."""
    values = {f.name: getattr(rec, f.name) for f in fields(rec)}
    now = _now()
    for name in _NOW_FIELDS:
        if name in values and values[name] is None:
            values[name] = now
    return row_cls(**values)


def _to_record(rec_cls: type[R], row: Base) -> R:
    values = {f.name: getattr(row, f.name) for f in fields(rec_cls)}  # type: ignore[arg-type]
    for name in ("request", "result"):  # some drivers return memoryview for binary columns
        if isinstance(values.get(name), memoryview):
            values[name] = bytes(values[name])
    return rec_cls(**values)


def _sqlite_engine(url: str) -> Engine:
    """SQLite tuned for durability under concurrent threads.

    WAL lets readers run beside the writer; `synchronous=FULL` fsyncs each commit, so a future
    acknowledged to the client survives power loss (NORMAL may lose the last commits). SQLAlchemy
    emits BEGIN itself (sqlite3's legacy mode runs SELECTs outside the transaction), and write
    transactions use BEGIN IMMEDIATE so a read-then-write never fails with a stale snapshot.
    """
    engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("tinkerd_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Store:
    """Sessions, training runs, futures, checkpoints, sampling sessions and API keys, durably.

    `url` is a SQLAlchemy URL: `sqlite:///path/to/tinkerd.db` (a file) or
    `postgresql+psycopg://user@host/db`. Tables are created if missing.
    """

    def __init__(self, url: str) -> None:
        self._dialect = make_url(url).get_backend_name()
        if self._dialect == "sqlite":
            self._engine = _sqlite_engine(url)
        elif self._dialect == "postgresql":
            self._engine = create_engine(url, pool_pre_ping=True)
        else:
            raise ValueError(f"unsupported database {self._dialect!r}: use sqlite or postgresql")
        Base.metadata.create_all(self._engine)
        self._upgrade()
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        writer_engine = self._engine.execution_options(tinkerd_write=True)
        self._writer = sessionmaker(writer_engine, expire_on_commit=False)

    def _upgrade(self) -> None:
        """Bring a database made by an older tinkerd up to date. `create_all` adds missing
        tables (with their indexes) but never columns, so columns added since are added here;
        each is nullable, so existing rows stay valid (their NULL means "not recorded")."""
        inspector = inspect(self._engine)
        for table, name, type_ in _ADDED_COLUMNS:
            if name in {c["name"] for c in inspector.get_columns(table)}:
                continue
            kind = Column(name, type_).type.compile(dialect=self._engine.dialect)
            with self._engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        for index in FutureRow.__table__.indexes:
            index.create(self._engine, checkfirst=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """For tests and diagnostics only; application code goes through the methods."""
        return self._engine

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction, committed (durably) when the block exits without an exception."""
        with self._writer() as s, s.begin():
            yield s

    def _update(self, row_cls: type[Base], where: ColumnElement[bool], **values: Any) -> bool:
        """UPDATE rows matching `where`; True if any matched."""
        with self._write() as s:
            result = s.execute(update(row_cls).where(where).values(**values))
            return result.rowcount > 0  # type: ignore[attr-defined]

    # sessions

    def create_session(self, rec: SessionRecord) -> None:
        with self._write() as s:
            s.add(_to_row(SessionRow, rec))

    def get_session(self, session_id: str, user: str) -> SessionRecord | None:
        """None if unknown or owned by another user (the caller cannot tell which)."""
        with self._read() as s:
            row = s.get(SessionRow, session_id)
            if row is None or row.user != user:
                return None
            return _to_record(SessionRecord, row)

    def heartbeat(self, session_id: str) -> bool:
        """Record that the client is alive; False if the session is unknown."""
        return self._update(SessionRow, SessionRow.session_id == session_id, last_heartbeat=_now())

    def finish_session(self, session_id: str) -> bool:
        return self._update(SessionRow, SessionRow.session_id == session_id, finished=True)

    def list_sessions(self, user: str, limit: int = 20, offset: int = 0) -> list[SessionRecord]:
        """The user's sessions, newest first."""
        with self._read() as s:
            rows = s.scalars(
                select(SessionRow)
                .where(SessionRow.user == user)
                .order_by(SessionRow.created_at.desc(), SessionRow.session_id.desc())
                .limit(limit)
                .offset(offset)
            )
            return [_to_record(SessionRecord, r) for r in rows]

    def session_children(self, session_id: str) -> tuple[list[str], list[str]]:
        """(training run ids, sampling session ids) created in the session, oldest first."""
        with self._read() as s:
            runs = s.scalars(
                select(TrainingRunRow.model_id)
                .where(TrainingRunRow.session_id == session_id)
                .order_by(TrainingRunRow.created_at, TrainingRunRow.model_id)
            )
            samplers = s.scalars(
                select(SamplingSessionRow.sampling_session_id)
                .where(SamplingSessionRow.session_id == session_id)
                .order_by(SamplingSessionRow.created_at, SamplingSessionRow.sampling_session_id)
            )
            return list(runs), list(samplers)

    # training runs

    def create_training_run(self, rec: TrainingRunRecord) -> None:
        with self._write() as s:
            s.add(_to_row(TrainingRunRow, rec))

    def get_training_run(self, model_id: str, user: str | None = None) -> TrainingRunRecord | None:
        """None if unknown or, when `user` is given, owned by another user. `user=None` skips
        the ownership check (internal callers such as the engine)."""
        with self._read() as s:
            row = s.get(TrainingRunRow, model_id)
            if row is None or (user is not None and row.user != user):
                return None
            return _to_record(TrainingRunRecord, row)

    def list_training_runs(
        self, user: str, limit: int = 20, offset: int = 0
    ) -> tuple[list[TrainingRunRecord], int]:
        """(a page of the user's runs, newest first; the total number of the user's runs)."""
        where = TrainingRunRow.user == user
        with self._read() as s:
            rows = s.scalars(
                select(TrainingRunRow)
                .where(where)
                .order_by(TrainingRunRow.created_at.desc(), TrainingRunRow.model_id.desc())
                .limit(limit)
                .offset(offset)
            )
            page = [_to_record(TrainingRunRecord, r) for r in rows]
            total = s.scalar(select(func.count()).select_from(TrainingRunRow).where(where))
            return page, total or 0

    def last_logged_seq_ids(self) -> dict[str, int]:
        """Every training run with logged requests: its highest seq_id (for crash recovery)."""
        with self._read() as s:
            rows = s.execute(
                select(FutureRow.model_id, func.max(FutureRow.seq_id))
                .join(TrainingRunRow, FutureRow.model_id == TrainingRunRow.model_id)
                .group_by(FutureRow.model_id)
            )
            return {model_id: seq for model_id, seq in rows}

    def set_last_seq_id(self, model_id: str, seq_id: int) -> bool:
        return self._update(TrainingRunRow, TrainingRunRow.model_id == model_id, last_seq_id=seq_id)

    def touch_training_run(self, model_id: str) -> bool:
        """Set last_request_time to now (shown by the REST training-run listing)."""
        return self._update(
            TrainingRunRow, TrainingRunRow.model_id == model_id, last_request_time=_now()
        )

    # futures

    def create_future(self, rec: FutureRecord) -> FutureRecord:
        """Record a future durably (committed before returning) and return it as stored.

        A repeat of an existing (model_id, seq_id) is an SDK retry of the same request: the
        existing future is returned unchanged. The unique constraint makes this safe when the
        retries race; the loser's insert fails and it reads the winner's row.
        """
        row = _to_row(FutureRow, rec)
        try:
            with self._write() as s:
                s.add(row)
        except IntegrityError:
            if rec.model_id is None or rec.seq_id is None:
                raise
            existing = self.future_by_seq(rec.model_id, rec.seq_id)
            if existing is None:  # the conflict was on request_id, not a retry
                raise
            return existing
        return _to_record(FutureRecord, row)

    def future_by_seq(self, model_id: str, seq_id: int) -> FutureRecord | None:
        with self._read() as s:
            row = s.scalar(
                select(FutureRow).where(FutureRow.model_id == model_id, FutureRow.seq_id == seq_id)
            )
            return None if row is None else _to_record(FutureRecord, row)

    def get_future(self, request_id: str) -> FutureRecord | None:
        with self._read() as s:
            row = s.get(FutureRow, request_id)
            return None if row is None else _to_record(FutureRecord, row)

    def complete_future(
        self, request_id: str, result: bytes, result_type: str, **timing: Any
    ) -> bool:
        """Store the result. Only a pending future changes (first outcome wins, so a result a
        client may already have read is never replaced); returns whether it changed.
        `timing`: optional `started_at` and `timings` (see FutureRecord), stored with it."""
        return self._finish(
            request_id, status="complete", result=result, result_type=result_type, **timing
        )

    def fail_future(self, request_id: str, error: str, category: str, **timing: Any) -> bool:
        """Store the failure (`category`: user | server | unknown); as complete_future, only a
        pending future changes."""
        return self._finish(request_id, status="failed", error=error, category=category, **timing)

    def session_futures(self, model_ids: list[str]) -> list[FutureRecord]:
        """Futures of these runs and sampling sessions, oldest first, without their request
        and result bodies (for session traces)."""
        if not model_ids:
            return []
        columns = [c for c in FutureRow.__table__.columns if c.name not in ("request", "result")]
        with self._read() as s:
            rows = s.execute(
                select(*columns)
                .where(FutureRow.model_id.in_(model_ids))
                .order_by(FutureRow.created_at, FutureRow.request_id)
            )
            return [FutureRecord(request=b"", **row._mapping) for row in rows]

    def _finish(self, request_id: str, **values: Any) -> bool:
        """Finish a pending future; a sample of a sampling session also takes the next place
        in that session's completion queue, in the same transaction. The session's row is
        locked first (PostgreSQL; SQLite writes are serialized anyway), so places are given
        in commit order: a poller that has seen place n has seen every place before it."""
        pending = (FutureRow.request_id == request_id) & (FutureRow.status == "pending")
        with self._write() as s:
            row = s.execute(select(FutureRow.kind, FutureRow.model_id).where(pending)).first()
            if row is None:
                return False
            kind, model_id = row
            if kind == "sample" and model_id is not None:
                self._lock_sampling_session(s, model_id)
                last = s.scalar(
                    select(func.max(FutureRow.completion_seq)).where(FutureRow.model_id == model_id)
                )
                values["completion_seq"] = (last or 0) + 1
            result = s.execute(
                update(FutureRow).where(pending).values(completed_at=_now(), **values)
            )
            return result.rowcount > 0  # type: ignore[attr-defined]

    def unfinished_futures(self) -> list[FutureRecord]:
        """Pending futures, oldest first: what a restarted server must re-run or fail."""
        with self._read() as s:
            rows = s.scalars(
                select(FutureRow)
                .where(FutureRow.status == "pending")
                .order_by(FutureRow.created_at, FutureRow.seq_id, FutureRow.request_id)
            )
            return [_to_record(FutureRecord, r) for r in rows]

    def futures_for_model(self, model_id: str, min_seq_id: int = 0) -> list[FutureRecord]:
        """The model's futures with seq_id >= min_seq_id, in seq_id order."""
        with self._read() as s:
            rows = s.scalars(
                select(FutureRow)
                .where(FutureRow.model_id == model_id, FutureRow.seq_id >= min_seq_id)
                .order_by(FutureRow.seq_id)
            )
            return [_to_record(FutureRecord, r) for r in rows]

    def completed_results(self, model_id: str, kinds: tuple[str, ...]) -> list[FutureRecord]:
        """The run's completed futures of these kinds, in seq_id order (for its curves)."""
        with self._read() as s:
            rows = s.scalars(
                select(FutureRow)
                .where(
                    FutureRow.model_id == model_id,
                    FutureRow.status == "complete",
                    FutureRow.kind.in_(kinds),
                )
                .order_by(FutureRow.seq_id)
            )
            return [_to_record(FutureRecord, r) for r in rows]

    def recent_failures(self, user: str, limit: int) -> list[FutureRecord]:
        """The user's last failed futures, newest first."""
        with self._read() as s:
            rows = s.scalars(
                select(FutureRow)
                .where(FutureRow.user == user, FutureRow.status == "failed")
                .order_by(FutureRow.completed_at.desc(), FutureRow.request_id)
                .limit(limit)
            )
            return [_to_record(FutureRecord, r) for r in rows]

    # checkpoints

    def add_checkpoint(self, rec: CheckpointRecord) -> None:
        """Insert, or replace the checkpoint with the same (training_run_id, checkpoint_id)
        (a save with overwrite). A single upsert statement, so concurrent saves cannot clash."""
        row = _to_row(CheckpointRow, rec)
        values = {c.key: getattr(row, c.key) for c in CheckpointRow.__table__.columns}
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        keys = ("training_run_id", "checkpoint_id")
        stmt = insert(CheckpointRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={k: v for k, v in values.items() if k not in keys},
        )
        with self._write() as s:
            s.execute(stmt)

    def get_checkpoint(self, training_run_id: str, checkpoint_id: str) -> CheckpointRecord | None:
        """No ownership check: the caller decides (owner, or a public checkpoint)."""
        with self._read() as s:
            row = s.get(CheckpointRow, (training_run_id, checkpoint_id))
            return None if row is None else _to_record(CheckpointRecord, row)

    def list_checkpoints(
        self,
        user: str,
        training_run_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[list[CheckpointRecord], int]:
        """(a page of the user's checkpoints, newest first, optionally of one run; the total)."""
        where = CheckpointRow.user == user
        if training_run_id is not None:
            where = where & (CheckpointRow.training_run_id == training_run_id)
        with self._read() as s:
            rows = s.scalars(
                select(CheckpointRow)
                .where(where)
                .order_by(CheckpointRow.created_at.desc(), CheckpointRow.checkpoint_id.desc())
                .limit(limit)
                .offset(offset)
            )
            page = [_to_record(CheckpointRecord, r) for r in rows]
            total = s.scalar(select(func.count()).select_from(CheckpointRow).where(where))
            return page, total or 0

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> bool:
        """Remove the metadata (the files are the checkpoints layer's job); False if unknown."""
        with self._write() as s:
            result = s.execute(
                delete(CheckpointRow).where(
                    CheckpointRow.training_run_id == training_run_id,
                    CheckpointRow.checkpoint_id == checkpoint_id,
                )
            )
            return result.rowcount > 0  # type: ignore[attr-defined]

    def _checkpoint_key(self, training_run_id: str, checkpoint_id: str) -> ColumnElement[bool]:
        return (CheckpointRow.training_run_id == training_run_id) & (
            CheckpointRow.checkpoint_id == checkpoint_id
        )

    def set_checkpoint_ttl(
        self, training_run_id: str, checkpoint_id: str, expires_at: datetime | None
    ) -> bool:
        """Set (or clear, with None) the expiry time; False if the checkpoint is unknown."""
        key = self._checkpoint_key(training_run_id, checkpoint_id)
        return self._update(CheckpointRow, key, expires_at=expires_at)

    def set_checkpoint_public(self, training_run_id: str, checkpoint_id: str, public: bool) -> bool:
        key = self._checkpoint_key(training_run_id, checkpoint_id)
        return self._update(CheckpointRow, key, public=public)

    def expired_checkpoints(self, now: datetime) -> list[CheckpointRecord]:
        """Checkpoints whose expires_at is at or before `now`, soonest expired first."""
        with self._read() as s:
            rows = s.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.expires_at.is_not(None), CheckpointRow.expires_at <= now)
                .order_by(CheckpointRow.expires_at)
            )
            return [_to_record(CheckpointRecord, r) for r in rows]

    # stability records (stable_reinforce)

    def add_stability_record(self, rec: StabilityRecord) -> bool:
        """Insert; False (and nothing changed) if the request is recorded already, e.g. when a
        sample pending at a restart runs again."""
        try:
            with self._write() as s:
                s.add(_to_row(StabilityRow, rec))
        except IntegrityError:
            return False
        return True

    def stability_records(
        self, request_ids: list[str], session_id: str, user: str, used_since: datetime
    ) -> dict[str, StabilityRecord]:
        """The records of `request_ids` that belong to this session and user and were used
        (or made) since `used_since`; others are simply absent, exactly like unknown ids."""
        if not request_ids:
            return {}
        with self._read() as s:
            rows = s.scalars(
                select(StabilityRow).where(
                    StabilityRow.request_id.in_(request_ids),
                    StabilityRow.session_id == session_id,
                    StabilityRow.user == user,
                    StabilityRow.last_used_at >= used_since,
                )
            )
            return {r.request_id: _to_record(StabilityRecord, r) for r in rows}

    def touch_stability_records(self, request_ids: list[str]) -> None:
        """A training request used them: their day of validity starts again."""
        if request_ids:
            self._update(
                StabilityRow, StabilityRow.request_id.in_(request_ids), last_used_at=_now()
            )

    def stability_bytes(self) -> int:
        with self._read() as s:
            return int(s.scalar(select(func.coalesce(func.sum(StabilityRow.size_bytes), 0))))

    def sweep_stability_records(self, unused_since: datetime, max_bytes: int) -> int:
        """Delete records unused since `unused_since`, then the least recently used ones until
        the rest fit in `max_bytes`. Returns how many were deleted."""
        with self._write() as s:
            gone = s.execute(
                delete(StabilityRow).where(StabilityRow.last_used_at < unused_since)
            ).rowcount  # type: ignore[attr-defined]
            total = int(s.scalar(select(func.coalesce(func.sum(StabilityRow.size_bytes), 0))))
            if total <= max_bytes:
                return gone
            oldest = s.execute(
                select(StabilityRow.request_id, StabilityRow.size_bytes).order_by(
                    StabilityRow.last_used_at, StabilityRow.request_id
                )
            )
            doomed = []
            for request_id, size in oldest:
                if total <= max_bytes:
                    break
                doomed.append(request_id)
                total -= size
            s.execute(delete(StabilityRow).where(StabilityRow.request_id.in_(doomed)))
            return gone + len(doomed)

    # sampling sessions

    def create_sampling_session(self, rec: SamplingSessionRecord) -> None:
        with self._write() as s:
            s.add(_to_row(SamplingSessionRow, rec))

    def get_sampling_session(
        self, sampling_session_id: str, user: str | None = None
    ) -> SamplingSessionRecord | None:
        """None if unknown or, when `user` is given, owned by another user."""
        with self._read() as s:
            row = s.get(SamplingSessionRow, sampling_session_id)
            if row is None or (user is not None and row.user != user):
                return None
            return _to_record(SamplingSessionRecord, row)

    def completions(
        self, sampling_session_id: str, client_id: int, after: int, limit: int
    ) -> list[Completion]:
        """The session's finished samples of one client (its seq_id block) after queue place
        `after`, oldest first; payload sizes without reading the payloads."""
        low = client_id * CLIENT_SEQ_BLOCK
        with self._read() as s:
            rows = s.execute(
                select(
                    FutureRow.request_id,
                    FutureRow.status,
                    FutureRow.completion_seq,
                    func.length(FutureRow.result),
                )
                .where(
                    FutureRow.model_id == sampling_session_id,
                    FutureRow.completion_seq > after,
                    FutureRow.seq_id >= low,
                    FutureRow.seq_id < low + CLIENT_SEQ_BLOCK,
                )
                .order_by(FutureRow.completion_seq)
                .limit(limit)
            )
            return [
                Completion(rid, status, seq, size if status == "complete" else None)
                for rid, status, seq, size in rows
            ]

    def acked_cursor(self, sampling_session_id: str, client_id: int) -> int:
        """How far the client's poller has acknowledged the session's queue (0: not at all)."""
        with self._read() as s:
            row = s.get(SamplingClientRow, (sampling_session_id, client_id))
            return 0 if row is None else row.acked_cursor

    def ack_cursor(self, sampling_session_id: str, client_id: int, cursor: int) -> None:
        """Record that the client has seen the queue up to `cursor` (never moves back)."""
        with self._write() as s:
            self._lock_sampling_session(s, sampling_session_id)
            row = s.get(SamplingClientRow, (sampling_session_id, client_id))
            if row is None:
                s.add(
                    SamplingClientRow(
                        sampling_session_id=sampling_session_id,
                        client_id=client_id,
                        acked_cursor=cursor,
                        created_at=_now(),
                    )
                )
            elif row.acked_cursor < cursor:
                row.acked_cursor = cursor

    def join_sampling_session(self, sampling_session_id: str) -> int:
        """A new client id for the session, never handed out before (also not one a client
        picked for itself, as the SDK does when joining is off: ids above every seq_id block
        already used). Durable, so a restart never hands an id out twice."""
        with self._write() as s:
            self._lock_sampling_session(s, sampling_session_id)
            joined = s.scalar(
                select(func.max(SamplingClientRow.client_id)).where(
                    SamplingClientRow.sampling_session_id == sampling_session_id
                )
            )
            used = s.scalar(
                select(func.max(FutureRow.seq_id)).where(FutureRow.model_id == sampling_session_id)
            )
            client_id = max(joined or 0, (used or 0) // CLIENT_SEQ_BLOCK) + 1
            s.add(
                SamplingClientRow(
                    sampling_session_id=sampling_session_id,
                    client_id=client_id,
                    acked_cursor=0,
                    created_at=_now(),
                )
            )
            return client_id

    def _lock_sampling_session(self, s: Session, sampling_session_id: str) -> None:
        """Serialize writers of one sampling session's queue and clients (PostgreSQL; SQLite
        write transactions are serialized already)."""
        s.execute(
            select(SamplingSessionRow.sampling_session_id)
            .where(SamplingSessionRow.sampling_session_id == sampling_session_id)
            .with_for_update()
        )

    # API keys

    def create_api_key(self, rec: ApiKeyRecord) -> None:
        """Register a key (by its hash). Raises IntegrityError on a duplicate id or hash."""
        with self._write() as s:
            s.add(_to_row(ApiKeyRow, rec))

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._read() as s:
            row = s.get(ApiKeyRow, key_id)
            return None if row is None else _to_record(ApiKeyRecord, row)

    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every registered key, revoked ones included, oldest first (a short table: the
        server caches it whole)."""
        with self._read() as s:
            rows = s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id))
            return [_to_record(ApiKeyRecord, r) for r in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark the key revoked now; False if unknown or already revoked (the first
        revocation time stays)."""
        where = (ApiKeyRow.key_id == key_id) & ApiKeyRow.revoked_at.is_(None)
        return self._update(ApiKeyRow, where, revoked_at=_now())

    # custom losses

    def add_custom_loss(self, rec: CustomLossRecord, future: FutureRecord) -> CustomLossRecord:
        """Store an uploaded loss and its (already finished) future in one transaction, and
        return the loss as stored: a repeat of (session_id, seq_id), an SDK retry, gets the
        loss stored first, and adds nothing."""
        try:
            with self._write() as s:
                s.add(_to_row(FutureRow, future))
                s.add(_to_row(CustomLossRow, rec))
        except IntegrityError:
            existing = self.custom_loss_by_seq(rec.session_id, rec.seq_id)
            if existing is None:
                raise
            return existing
        return rec

    def custom_loss_by_seq(self, session_id: str, seq_id: int) -> CustomLossRecord | None:
        with self._read() as s:
            row = s.scalar(
                select(CustomLossRow).where(
                    CustomLossRow.session_id == session_id, CustomLossRow.seq_id == seq_id
                )
            )
            return None if row is None else _to_record(CustomLossRecord, row)

    def get_custom_loss(self, loss_id: str, session_id: str, user: str) -> CustomLossRecord | None:
        """None if unknown, or of another session or user (the caller cannot tell which)."""
        with self._read() as s:
            row = s.get(CustomLossRow, loss_id)
            if row is None or row.session_id != session_id or row.user != user:
                return None
            return _to_record(CustomLossRecord, row)
