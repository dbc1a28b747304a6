"""Durable state (SQLAlchemy): sessions, training runs, futures, checkpoints, sampling sessions."""

from tinkerd.store.records import (
    CheckpointRecord,
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    TrainingRunRecord,
)
from tinkerd.store.store import Store

__all__ = [
    "CheckpointRecord",
    "FutureRecord",
    "SamplingSessionRecord",
    "SessionRecord",
    "Store",
    "TrainingRunRecord",
]
