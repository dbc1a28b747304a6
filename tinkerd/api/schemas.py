"""Pydantic models for the JSON side of the Tinker API (SDK 0.38; docs/tinker-protocol.md §3).

Requests: the SDK always adds a `type` discriminator and may add fields newer than this server
knows, so request models ignore unknown keys (`extra="ignore"`). Scalars are strict (no "5" for
5, no true for 1) so a wrong type is a 422 naming the field, not a silent coercion.

Responses: field names match the SDK's pydantic types exactly (the SDK validates every JSON
response with `_strict_response_validation=True`). Dump them with
`model_dump(mode="json", exclude_none=True)`: the SDK treats absent and null alike for optional
fields, and datetimes must be ISO strings.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator

from tinkerd.api.codec import CodecError, model_input_tokens, tensor_from_json
from tinkerd.model import types as mt
from tinkerd.model.sampling import MAX_NUM_SAMPLES

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]
StopString = Annotated[str, Strict(), Field(min_length=1)]
# seq_id and seeds are 64-bit on the wire; unpickled sampling clients use ids beyond 2^53.
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
Seed = Annotated[int, Strict(), Field(ge=-(2**63), le=2**64 - 1)]
SeqId = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]
# A training request's place in its run (create_model / create-via-load is the implicit 0).
TrainSeqId = Annotated[int, Strict(), Field(ge=1, le=2**63 - 1)]
# Tinker bounds ttl_seconds at 10 years.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
TtlSeconds = Annotated[int, Strict(), Field(ge=1, le=MAX_TTL_SECONDS)]
# Bounds that keep one request from taking the server's memory or time from everyone else
# (far above what any real training loop asks for).
MAX_LORA_RANK = 512
MAX_STOP_SEQUENCES = 1024


def _finite_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metadata is stored and echoed back as JSON, which has no NaN or infinity."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError as exc:
        raise ValueError("must not contain NaN or infinite numbers") from exc
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_finite_json)]


class RequestModel(BaseModel):
    """Base for request bodies: unknown keys (incl. `type`) ignored, `model_*` names allowed."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ResponseModel(BaseModel):
    """Base for response bodies (`model_*` field names are part of the protocol)."""

    model_config = ConfigDict(protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Shared pieces


class OptimizerConfig(BaseModel):
    """Optimizer family chosen at model creation: `{"type": "adamw"}` or e.g. dimuon+version."""

    model_config = ConfigDict(extra="allow")

    type: Str = "adamw"


class LoraConfig(RequestModel):
    """LoRA shape of a new training model (rank 32 is the SDK's default)."""

    rank: Annotated[int, Strict(), Field(ge=1, le=MAX_LORA_RANK)] = 32
    seed: Seed | None = None
    train_unembed: Bool = True
    train_mlp: Bool = True
    train_attn: Bool = True

    @model_validator(mode="after")
    def _some_target(self) -> LoraConfig:
        """The SDK refuses all-false too; a LoRA with no targets would train nothing."""
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError("at least one of train_unembed, train_mlp, train_attn must be true")
        return self


class AdamParams(RequestModel):
    """Per-step AdamW hyperparameters (Tinker defaults; weight decay is decoupled)."""

    learning_rate: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 1e-4
    beta1: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.95
    eps: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 1e-12
    weight_decay: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 0.0
    # 0 (or less) means no clipping, as in the SDK's docs.
    grad_clip_norm: Float = 0.0


class OptimizerParams(RequestModel):
    """Per-step hyperparameters of a non-Adam family (`optimizer_params`, e.g. dimuon)."""

    model_config = ConfigDict(extra="allow")

    type: NonEmptyStr
    learning_rate: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 1e-4
    grad_clip_norm: Float = 0.0
    beta1: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.9


class EncodedTextChunk(RequestModel):
    """A JSON ModelInput chunk. Non-text chunks are kept (extra fields allowed): an `image`
    chunk's `data` (base64), `format` and `expected_tokens` are decoded by
    `codec.model_input` for a model that takes images, and refused with a clear message
    otherwise."""

    model_config = ConfigDict(extra="allow")

    type: Str = "encoded_text"
    tokens: list[Int] | None = None

    @model_validator(mode="after")
    def _text_has_tokens(self) -> EncodedTextChunk:
        """An encoded_text chunk without tokens is malformed."""
        if self.type == "encoded_text" and self.tokens is None:
            raise ValueError("an encoded_text chunk needs 'tokens'")
        return self


class ModelInput(RequestModel):
    """`{"chunks": [...]}`: the prompt of a sample request."""

    chunks: list[EncodedTextChunk]

    def to_tokens(self) -> list[int]:
        """All token ids in order; raises CodecError for image/audio chunks."""
        return model_input_tokens(self.model_dump(exclude_none=True))


class TensorData(RequestModel):
    """TensorData JSON (`target_prompt_logprobs`): flat `data`, dtype, shape, optional CSR."""

    data: list[Int] | list[Float]
    dtype: Literal["int64", "float32"]
    shape: list[Annotated[int, Strict(), Field(ge=0)]] | None = None
    sparse_crow_indices: list[Int] | None = None
    sparse_col_indices: list[Int] | None = None

    @model_validator(mode="after")
    def _ints_for_int64(self) -> TensorData:
        """int64 data must be integral (a 422 here beats a late decode error)."""
        if self.dtype == "int64" and any(isinstance(v, float) for v in self.data):
            raise ValueError("int64 tensor data must be integers")
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise ValueError("sparse_crow_indices and sparse_col_indices go together")
        return self

    def to_torch(self, pad_value: float = 0) -> Any:
        """Dense torch tensor; unlisted CSR cells take `pad_value` (-1 for target logprobs)."""
        return tensor_from_json(self.model_dump(exclude_none=True), pad_value=pad_value)


class SamplingParams(RequestModel):
    """Sampling knobs. `stop`: absent = stop at EOS; [] = never stop; strings or token ids."""

    # Absent: the server's default; prompt + max_tokens must fit the model's context.
    max_tokens: Annotated[int, Strict(), Field(ge=1)] | None = None
    seed: Seed | None = None
    stop: (
        StopString
        | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]
        | Annotated[
            list[Annotated[int, Strict(), Field(ge=0)]], Field(max_length=MAX_STOP_SEQUENCES)
        ]
        | None
    ) = None
    temperature: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 1.0
    # -1 (no limit) or at least 1; 0 is refused (it would leave nothing to sample).
    top_k: Annotated[int, Strict(), Field(ge=-1)] = -1
    top_p: Annotated[float, Strict(), Field(gt=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _top_k_not_zero(self) -> SamplingParams:
        if self.top_k == 0:
            raise ValueError("sampling_params.top_k must be -1 (no limit) or >= 1, got 0")
        return self

    def to_model(self, default_max_tokens: int) -> mt.SamplingParams:
        """The model layer's SamplingParams (a lone stop string becomes a 1-tuple)."""
        stop: tuple[str, ...] | tuple[int, ...] | None
        if self.stop is None:
            stop = None
        elif isinstance(self.stop, str):
            stop = (self.stop,)
        else:
            stop = tuple(self.stop)  # type: ignore[assignment]
        return mt.SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
        )


# --------------------------------------------------------------------------------------------
# Requests


class ClientConfigRequest(RequestModel):
    """`/client/config` and `/client/dynamic_config`."""

    sdk_version: Str | None = None


class CreateSessionRequest(RequestModel):
    tags: list[Str] = Field(default_factory=list)
    user_metadata: Metadata | None = None
    sdk_version: Str | None = None
    project_id: Str | None = None
    display_name: Str | None = None


class SessionHeartbeatRequest(RequestModel):
    session_id: NonEmptyStr


class SessionEndReason(RequestModel):
    type: Str = "success"


class SessionFinishRequest(RequestModel):
    """`/sessions/{sid}/finish`; the body is informational."""

    reason: SessionEndReason | None = None
    detail: Str | None = None


class CreateModelRequest(RequestModel):
    session_id: NonEmptyStr
    model_seq_id: Annotated[int, Strict(), Field(ge=0)]
    base_model: NonEmptyStr
    user_metadata: Metadata | None = None
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)


class GetInfoRequest(RequestModel):
    model_id: NonEmptyStr


class OptimStepRequest(RequestModel):
    """`adam_params` (Adam) or `optimizer_params` (other families); `optim_params` is the SDK's
    internal name, accepted too and routed by its `type`."""

    model_id: NonEmptyStr
    seq_id: TrainSeqId
    adam_params: AdamParams | None = None
    optimizer_params: OptimizerParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _route_optim_params(cls, data: Any) -> Any:
        """Map `optim_params` to the wire key its `type` implies."""
        if isinstance(data, dict) and "optim_params" in data:
            data = dict(data)
            params = data.pop("optim_params")
            is_adam = not isinstance(params, dict) or params.get("type", "adamw") == "adamw"
            data.setdefault("adam_params" if is_adam else "optimizer_params", params)
        return data

    @model_validator(mode="after")
    def _one_family(self) -> OptimStepRequest:
        """Exactly one set of hyperparameters, as the SDK always sends."""
        if (self.adam_params is None) == (self.optimizer_params is None):
            raise ValueError("give exactly one of adam_params or optimizer_params")
        return self


class SaveWeightsRequest(RequestModel):
    model_id: NonEmptyStr
    path: NonEmptyStr
    seq_id: TrainSeqId
    ttl_seconds: TtlSeconds | None = None
    overwrite: Bool = False
    user_metadata: dict[str, Str] | None = None


class SaveWeightsForSamplerRequest(RequestModel):
    """Named form (`path`) stores sampler weights; ephemeral form (`sampling_session_seq_id`)
    creates a sampling session directly."""

    model_id: NonEmptyStr
    path: NonEmptyStr | None = None
    sampling_session_seq_id: Annotated[int, Strict(), Field(ge=0)] | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: TrainSeqId
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, Str] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> SaveWeightsForSamplerRequest:
        """Without either a name or a session seq id there is nothing to return."""
        if self.path is None and self.sampling_session_seq_id is None:
            raise ValueError("give path (named save) or sampling_session_seq_id (ephemeral)")
        return self

    @property
    def is_ephemeral(self) -> bool:
        """True for save_weights_and_get_sampling_client (no name)."""
        return self.path is None


class SaveWeightsExternalRequest(RequestModel):
    model_id: NonEmptyStr
    path: NonEmptyStr
    seq_id: TrainSeqId
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[Str] | None = None


class LoadWeightsRequest(RequestModel):
    """Create-via-load (`session_id` + `model_seq_id`, the new model's seq 0, id
    `<session_id>:train:<model_seq_id>`) or legacy load into `model_id` (seq 1)."""

    model_id: NonEmptyStr | None = None
    seq_id: TrainSeqId | None = None
    session_id: NonEmptyStr | None = None
    model_seq_id: Annotated[int, Strict(), Field(ge=0)] | None = None
    base_model: NonEmptyStr | None = None
    user_metadata: Metadata | None = None
    path: NonEmptyStr
    optimizer: Bool = False
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: Str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> LoadWeightsRequest:
        """The two addressings are mutually exclusive."""
        create = self.session_id is not None or self.model_seq_id is not None
        if create and self.model_id is not None:
            raise ValueError("give either model_id or session_id+model_seq_id, not both")
        if create and (self.session_id is None or self.model_seq_id is None):
            raise ValueError("session_id and model_seq_id go together")
        if not create and self.model_id is None:
            raise ValueError("give model_id or session_id+model_seq_id")
        if not create and self.seq_id is None:
            raise ValueError("seq_id is required when loading into model_id")
        return self

    @property
    def is_create(self) -> bool:
        """True for create_training_client_from_state[_with_optimizer]."""
        return self.session_id is not None

    @property
    def new_model_id(self) -> str | None:
        """The id the SDK will use for a create-via-load model (it builds it itself)."""
        if self.session_id is None:
            return None
        return f"{self.session_id}:train:{self.model_seq_id}"


class CreateSamplingSessionRequest(RequestModel):
    session_id: NonEmptyStr
    sampling_session_seq_id: Annotated[int, Strict(), Field(ge=0)]
    base_model: NonEmptyStr | None = None
    model_path: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _has_target(self) -> CreateSamplingSessionRequest:
        """Something must say which weights to sample from."""
        if self.base_model is None and self.model_path is None:
            raise ValueError("give base_model or model_path")
        if self.model_path is not None and not self.model_path.startswith("tinker://"):
            raise ValueError("model_path must be a tinker:// path")
        return self


class SampleRequest(RequestModel):
    num_samples: Annotated[int, Strict(), Field(ge=1, le=MAX_NUM_SAMPLES)] = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: NonEmptyStr | None = None
    model_path: NonEmptyStr | None = None
    sampling_session_id: NonEmptyStr | None = None
    seq_id: Int64 | None = None
    prompt_logprobs: Bool | None = None
    topk_prompt_logprobs: Annotated[int, Strict(), Field(ge=0)] = 0
    topk_sample_logprobs: Annotated[int, Strict(), Field(ge=0)] = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: Annotated[int, Strict(), Field(ge=0)] = 0
    prompt_logprobs_last_n: Annotated[int, Strict(), Field(ge=1)] | None = None
    record_stability_info: Bool | None = None

    @model_validator(mode="after")
    def _has_target(self) -> SampleRequest:
        """0.38 sends sampling_session_id; older clients name the weights directly."""
        if self.sampling_session_id is None and self.base_model is None and not self.model_path:
            raise ValueError("give sampling_session_id, model_path or base_model")
        return self


class RetrieveFutureRequest(RequestModel):
    request_id: NonEmptyStr
    allow_metadata_only: Bool = False


class CancelFutureRequest(RequestModel):
    request_id: NonEmptyStr


# The SDK's clone ids are below 1e9 (seq_ids are clone * 1e9 + n, within int64).
ClientId = Annotated[int, Strict(), Field(ge=0, le=(2**63 - 1) // 1_000_000_000)]
# The most request ids one poll may report as retrieved (the SDK reports them as they come).
MAX_RETRIEVED_IDS = 100_000


class SamplingSessionFuturesTarget(RequestModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: NonEmptyStr
    cloned_sampler_id: ClientId = 0


class FuturesRetrieveRequest(RequestModel):
    """POST /retrieve_futures: poll one client's part of a sampling session's completion
    queue. `timeout` 0 asks for an answer at once; none, the server's long-poll time."""

    target: SamplingSessionFuturesTarget
    prev_cursor: Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)] = 0
    timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    retrieved_request_ids: Annotated[list[Str], Field(max_length=MAX_RETRIEVED_IDS)] = []


class JoinSamplingSessionRequest(RequestModel):
    sampling_session_id: NonEmptyStr


class TtlUpdateRequest(RequestModel):
    """PUT .../checkpoints/{ckpt}/ttl; null means never expire."""

    ttl_seconds: TtlSeconds | None = None


class CopyWeightsRequest(RequestModel):
    """POST /copy_weights: a destination project, or a session_id plus model_seq_id."""

    source_path: NonEmptyStr
    destination_project_id: Str | None = None
    session_id: NonEmptyStr | None = None
    model_seq_id: Annotated[int, Strict(), Field(ge=0)] | None = None
    ttl_seconds: TtlSeconds | None = None
    weights_access_token: Str | None = None


class WeightsInfoRequest(RequestModel):
    tinker_path: NonEmptyStr


# --------------------------------------------------------------------------------------------
# Responses


class ErrorResponse(ResponseModel):
    """Every caller error (4xx) except 422: what is wrong, naming the field."""

    detail: str


class UntypedAPIFuture(ResponseModel):
    """What every "future" POST returns at once; `sample_sequence_ids` is required for asample
    (one per sample, else the SDK fails an assertion)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class TryAgainResponse(ResponseModel):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    queue_state_reason: str | None = None


class RequestFailedResponse(ResponseModel):
    """A failed future. Never put an `error` key in a success body."""

    error: str
    category: Literal["unknown", "server", "user"] = "user"


class ClientConfigResponse(ResponseModel):
    """Flags for the SDK; anything left out takes the SDK's default (§2). Dump with
    `exclude_none=True`: the SDK's fields are non-optional, so a null would fail validation."""

    pjwt_auth_enabled: bool = False
    use_pyqwest_transport: bool | None = None
    proto_compress_fwdbwd: bool | None = None
    parallel_fwdbwd_chunks: bool | None = None
    fwdbwd_max_chunk_len: int | None = None
    fwdbwd_max_chunk_bytes_count: int | None = None
    sample_max_concurrent_requests: int | None = None
    sample_use_retrieve_futures: bool | None = None
    sample_join_sampling_session: bool | None = None


class ClientDynamicConfigResponse(ResponseModel):
    refresh_interval_sec: int = 300
    sample_cancel_enabled: bool = False


class FutureCompletion(ResponseModel):
    """One entry of /retrieve_futures: `state` finished (with the result's size) or failed."""

    state: Literal["finished", "failed"]
    request_id: str
    response_payload_uncompressed_size: int | None = None


class FuturesRetrieveResponse(ResponseModel):
    completions: list[FutureCompletion]
    cursor: int


class JoinSamplingSessionResponse(ResponseModel):
    type: Literal["join_sampling_session"] = "join_sampling_session"
    client_counter: int


class CreateSessionResponse(ResponseModel):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class SessionHeartbeatResponse(ResponseModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class TelemetryResponse(ResponseModel):
    status: Literal["accepted"] = "accepted"


class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"


class CreateModelResponse(ResponseModel):
    model_id: str
    type: Literal["create_model"] = "create_model"


class ModelData(ResponseModel):
    """`model_name` (or `tokenizer_id`) must be set for `get_tokenizer()`; no `:` in it."""

    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(ResponseModel):
    type: Literal["get_info"] | None = "get_info"
    model_id: str
    model_data: ModelData
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class OptimStepResponse(ResponseModel):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(ResponseModel):
    path: str
    type: Literal["save_weights"] | None = "save_weights"


class SaveWeightsForSamplerResponse(ResponseModel):
    """`path` for the named form; `sampling_session_id` for the ephemeral form."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = "save_weights_for_sampler"


class SaveWeightsExternalResponse(ResponseModel):
    path: str
    size_bytes: int | None = None
    type: Literal["save_weights_external"] | None = "save_weights_external"


class LoadWeightsResponse(ResponseModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = "load_weights"


class CreateSamplingSessionResponse(ResponseModel):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(ResponseModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class SupportedModel(ResponseModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None
    # tinkerd's addition (the SDK ignores it): ["text", "image"] for a model that takes images.
    modalities: list[str] | None = None


class GetServerCapabilitiesResponse(ResponseModel):
    supported_models: list[SupportedModel]


class Cursor(ResponseModel):
    offset: int
    limit: int
    total_count: int


class Checkpoint(ResponseModel):
    """`checkpoint_id` is `<weights|sampler_weights|external_weights>/<name>`."""

    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler", "external"]
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class CheckpointsListResponse(ResponseModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(ResponseModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(ResponseModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoResponse(ResponseModel):
    base_model: str
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class GetSessionResponse(ResponseModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(ResponseModel):
    sessions: list[str]


class ExternalWeightsUrlsResponse(ResponseModel):
    urls: dict[str, str]
    expires: datetime


__all__ = [
    "AdamParams",
    "CancelFutureRequest",
    "Checkpoint",
    "CheckpointsListResponse",
    "ClientConfigRequest",
    "ClientConfigResponse",
    "ClientDynamicConfigResponse",
    "CodecError",
    "CopyWeightsRequest",
    "CreateModelRequest",
    "CreateModelResponse",
    "CreateSamplingSessionRequest",
    "CreateSamplingSessionResponse",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "Cursor",
    "EncodedTextChunk",
    "ErrorResponse",
    "ExternalWeightsUrlsResponse",
    "FutureCompletion",
    "FuturesRetrieveRequest",
    "FuturesRetrieveResponse",
    "GetInfoRequest",
    "GetInfoResponse",
    "GetSamplerResponse",
    "GetServerCapabilitiesResponse",
    "GetSessionResponse",
    "HealthResponse",
    "JoinSamplingSessionRequest",
    "JoinSamplingSessionResponse",
    "ListSessionsResponse",
    "LoadWeightsRequest",
    "LoadWeightsResponse",
    "LoraConfig",
    "ModelData",
    "ModelInput",
    "OptimStepRequest",
    "OptimStepResponse",
    "OptimizerConfig",
    "OptimizerParams",
    "RequestFailedResponse",
    "RetrieveFutureRequest",
    "SampleRequest",
    "SamplingParams",
    "SamplingSessionFuturesTarget",
    "SaveWeightsExternalRequest",
    "SaveWeightsExternalResponse",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsRequest",
    "SaveWeightsResponse",
    "SessionFinishRequest",
    "SessionHeartbeatRequest",
    "SessionHeartbeatResponse",
    "SupportedModel",
    "TelemetryResponse",
    "TensorData",
    "TrainingRun",
    "TrainingRunsResponse",
    "TryAgainResponse",
    "TtlUpdateRequest",
    "UntypedAPIFuture",
    "WeightsInfoRequest",
    "WeightsInfoResponse",
]


# --------------------------------------------------------------------------------------------
# Server-side custom losses (tinkerd/model/custom_loss.py checks the graph itself)


class CustomLossInput(RequestModel):
    name: Annotated[str, Strict(), Field(min_length=1, max_length=64)]
    rank: Literal[0, 1, 2]


class CustomLossNode(RequestModel):
    """One torch.fx node as the SDK encodes it; its args are checked when the graph is
    rebuilt, against the server's allowlist."""

    op: Literal["placeholder", "get_attr", "call_function", "call_method", "call_module", "output"]
    name: Annotated[str, Strict(), Field(min_length=1, max_length=128)]
    target: Annotated[str, Strict(), Field(max_length=256)]
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CustomLossGraph(RequestModel):
    format: Literal[1] = 1
    nodes: Annotated[list[CustomLossNode], Field(min_length=1, max_length=1024)]


class CreateCustomLossRequest(RequestModel):
    session_id: NonEmptyStr
    custom_loss_seq_id: SeqId
    name: Annotated[str, Strict(), Field(min_length=1, max_length=128)]
    inputs: Annotated[list[CustomLossInput], Field(min_length=1, max_length=16)]
    graph: CustomLossGraph


class ExportMergedRequest(RequestModel):
    """POST /export_merged: a checkpoint the caller may read (own or public)."""

    path: NonEmptyStr
