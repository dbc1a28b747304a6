"""ORM models: one table per record type in `records.py`, with the same attribute names.

Attribute names match the record fields so the store can copy between them generically. No foreign
keys: a create_model future exists before its training run, and checkpoints may outlive runs.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type: values are stored as naive UTC there and get `tzinfo=UTC` back on
    read, so comparisons (`expires_at <= now`) are consistent. Naive inputs are refused because
    they are almost always a local-time bug.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Ids: session uuids, `<session>:train:<n>`, `<session>:sample:<n>`, checkpoint `<kind>/<name>`.
ID = String(512)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_user_created", "user", "created_at"),)

    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    user: Mapped[str] = mapped_column(ID)
    tags: Mapped[list[str]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON)
    sdk_version: Mapped[str | None] = mapped_column(String(64))
    project_id: Mapped[str | None] = mapped_column(ID)
    display_name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime)
    finished: Mapped[bool]


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    __table_args__ = (
        Index("ix_training_runs_user_created", "user", "created_at"),
        Index("ix_training_runs_session", "session_id"),
    )

    model_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    user: Mapped[str] = mapped_column(ID)
    base_model: Mapped[str] = mapped_column(ID)
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_request_time: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seq_id: Mapped[int] = mapped_column(BigInteger)


class FutureRow(Base):
    __tablename__ = "futures"
    __table_args__ = (
        # An SDK retry of (model_id, seq_id) is the same request: the database enforces it, so
        # concurrent retries cannot create two futures. NULLs never collide (samples, creates).
        UniqueConstraint("model_id", "seq_id", name="uq_futures_model_seq"),
        Index("ix_futures_status_created", "status", "created_at"),
        Index("ix_futures_completion", "model_id", "completion_seq"),
    )

    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    user: Mapped[str] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(64))
    request: Mapped[bytes] = mapped_column(LargeBinary)
    model_id: Mapped[str | None] = mapped_column(ID)
    # int64: cloned sampling clients use seq ids beyond 2^53.
    seq_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    result_type: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A sample of a sampling session: its place in the session's completion queue (1, 2, ...
    # in commit order), the cursor of /retrieve_futures; set by the store when it finishes.
    completion_seq: Mapped[int | None] = mapped_column(BigInteger)
    # Execution start and engine spans, stored with the outcome (session traces).
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    timings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        Index("ix_checkpoints_user_created", "user", "created_at"),
        Index("ix_checkpoints_expires", "expires_at"),
    )

    training_run_id: Mapped[str] = mapped_column(ID, primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(ID, primary_key=True)
    checkpoint_type: Mapped[str] = mapped_column(String(16))
    tinker_path: Mapped[str] = mapped_column(Text)
    user: Mapped[str] = mapped_column(ID)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    public: Mapped[bool]
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SamplingSessionRow(Base):
    __tablename__ = "sampling_sessions"
    __table_args__ = (Index("ix_sampling_sessions_session", "session_id"),)

    sampling_session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    user: Mapped[str] = mapped_column(ID)
    base_model: Mapped[str] = mapped_column(ID)
    model_path: Mapped[str | None] = mapped_column(Text)
    snapshot_of: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    inflight: Mapped[bool | None]


class SamplingClientRow(Base):
    """A client of a sampling session (`cloned_sampler_id`; 0 is the original): the ids
    /join_sampling_session has handed out, and how far each client's /retrieve_futures poller
    has acknowledged the session's completion queue."""

    __tablename__ = "sampling_clients"

    sampling_session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    client_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    acked_cursor: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class StabilityRow(Base):
    __tablename__ = "stability_records"
    __table_args__ = (
        Index("ix_stability_records_session", "session_id"),
        Index("ix_stability_records_last_used", "last_used_at"),
    )

    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    user: Mapped[str] = mapped_column(ID)
    base_model: Mapped[str] = mapped_column(ID)
    weights_run: Mapped[str | None] = mapped_column(Text)
    weights_step: Mapped[int | None] = mapped_column(BigInteger)
    prompt: Mapped[bytes] = mapped_column(LargeBinary)
    lengths: Mapped[list[int]] = mapped_column(JSON)
    tokens: Mapped[bytes] = mapped_column(LargeBinary)
    behaviour_logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    base_logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CustomLossRow(Base):
    """An uploaded custom loss (server-side custom losses): its checked graph, kept so that
    forward_backward requests replayed after a restart find it."""

    __tablename__ = "custom_losses"
    __table_args__ = (
        # The SDK numbers a session's uploads (`custom_loss_seq_id`); a retry repeats it.
        UniqueConstraint("session_id", "seq_id", name="uq_custom_losses_session_seq"),
    )

    loss_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    user: Mapped[str] = mapped_column(ID)
    seq_id: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(Text)
    inputs: Mapped[list[Any]] = mapped_column(JSON)
    graph: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(ID)  # the create_custom_loss future
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
