"""Durable state (SQLAlchemy): sessions, training runs, futures, checkpoints, sampling sessions,
API keys."""

from tinkerd.store.records import (
    ApiKeyRecord,
    CheckpointRecord,
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    TrainingRunRecord,
)
from tinkerd.store.store import Store

__all__ = [
    "ApiKeyRecord",
    "CheckpointRecord",
    "FutureRecord",
    "SamplingSessionRecord",
    "SessionRecord",
    "Store",
    "TrainingRunRecord",
]
