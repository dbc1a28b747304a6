"""Plain records the store takes and returns (no SQLAlchemy objects leak out of store/)."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class SessionRecord:
    session_id: str
    user: str
    tags: list[str] = field(default_factory=list)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None
    created_at: datetime | None = None
    last_heartbeat: datetime | None = None
    finished: bool = False


@dataclass
class TrainingRunRecord:
    """A training run is a model: id `<session_id>:train:<model_seq_id>`."""

    model_id: str
    session_id: str
    user: str
    base_model: str
    lora_rank: int
    lora_config: dict[str, Any]  # rank, alpha, seed, train_attn, train_mlp, train_unembed
    user_metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    last_request_time: datetime | None = None
    last_seq_id: int = 0  # the last seq_id whose request completed or failed


@dataclass
class FutureRecord:
    """A request acknowledged with a request_id. `request` and `result` are opaque bytes."""

    request_id: str
    user: str
    kind: str  # create_model | forward_backward | optim_step | save_weights | ... | sample
    request: bytes
    model_id: str | None = None
    seq_id: int | None = None
    status: str = "pending"  # pending | complete | failed
    result: bytes | None = None
    result_type: str | None = None  # "json" | "proto"
    error: str | None = None
    category: str | None = None  # user | server | unknown
    created_at: datetime | None = None
    completed_at: datetime | None = None
    # Place in its sampling session's completion queue (samples with a seq_id; set by the
    # store when the future finishes, never by callers).
    completion_seq: int | None = None
    # When the engine began executing it (None: never started, or finished before tracing),
    # and what it shared while it ran: micro-batches / sampling batches as trace spans
    # ({name, start, end (unix s), args}); both stored with its outcome (api/traces.py).
    started_at: datetime | None = None
    timings: list[dict[str, Any]] | None = None


@dataclass
class CheckpointRecord:
    training_run_id: str
    checkpoint_id: str  # "weights/<name>" | "sampler_weights/<name>" | "external_weights/<name>"
    checkpoint_type: str  # training | sampler | external
    tinker_path: str
    user: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass
class SamplingSessionRecord:
    """`<session_id>:sample:<n>`: a base model, or a frozen adapter snapshot (`model_path`)."""

    sampling_session_id: str
    session_id: str
    user: str
    base_model: str
    model_path: str | None = None
    snapshot_of: str | None = None  # training run whose in-memory snapshot this samples
    created_at: datetime | None = None
    # An inflight client of `snapshot_of`: it samples the run's one mutable inflight target,
    # which every later inflight save updates (tinker's SamplingClientKind "inflight").
    inflight: bool | None = None


@dataclass
class StabilityRecord:
    """What a sample request with `record_stability_info` recorded, for `stable_reinforce`.

    One record per request; its sequence i is `<request_id>:<i>` (the SDK's `sequence_id`).
    Arrays are little-endian: `prompt` and `tokens` int32, the logprobs float32; `tokens` and
    both logprob arrays hold every sequence back to back, `lengths[i]` long each.
    """

    request_id: str
    session_id: str  # the Tinker session whose training requests may use it
    user: str
    base_model: str
    weights_run: str | None  # training run (or checkpoint path) sampled from; None: base model
    weights_step: int | None  # that run's optim steps at the freeze; None: unknown / base
    prompt: bytes
    lengths: list[int]
    tokens: bytes
    behaviour_logprobs: bytes
    base_logprobs: bytes
    size_bytes: int
    created_at: datetime | None = None
    last_used_at: datetime | None = None


@dataclass
class ApiKeyRecord:
    """A registered API key. Only the key's SHA-256 is stored; the user it stands for is
    `name` (keys sharing a name are one user, so keys can be rotated)."""

    key_id: str  # short public id, shown by `tinkerd keys list`
    name: str
    key_hash: str  # hex SHA-256 of the whole key
    created_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass
class Completion:
    """A finished or failed sample in its sampling session's completion queue."""

    request_id: str
    status: str  # complete | failed
    cursor: int  # its completion_seq: place in the session's queue
    payload_size: int | None = None  # bytes of the stored result (complete only)


@dataclass
class CustomLossRecord:
    """An uploaded custom loss: `<session_id>:loss:<seq_id>`, usable only by that session's
    (and user's) training runs. `inputs` and `graph` are the checked JSON as uploaded;
    `sha256` is of both, canonically serialized."""

    loss_id: str
    session_id: str
    user: str
    seq_id: int  # the SDK's custom_loss_seq_id
    name: str
    inputs: list[Any]
    graph: dict[str, Any]
    sha256: str
    request_id: str  # the create_custom_loss future (complete from the start)
    created_at: datetime | None = None
