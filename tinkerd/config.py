"""One typed settings object for the whole service: CLI flags and `TINKERD_*` env vars."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tinkerd.constants import EMBEDDED_MODEL


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tinkerd"))


@dataclass(frozen=True)
class ModelSpec:
    """A served model: the name clients use, and where its weights come from (a local
    directory, a hub name, or the embedded model's name)."""

    name: str
    source: str


def parse_model_spec(spec: str) -> ModelSpec:
    """`NAME=PATH` serves the local directory PATH under NAME (so that clients, such as the
    cookbook, which pick renderers and tokenizers by name, recognise it); anything else is
    served under itself."""
    name, sep, source = spec.partition("=")
    if not sep:
        return ModelSpec(spec, spec)
    name, source = name.strip(), source.strip()
    if not name or not source:
        raise ValueError(f"model {spec!r}: expected NAME=PATH (e.g. Qwen/Qwen3-8B=/models/q3)")
    if not Path(source).is_dir():
        raise ValueError(f"model {spec!r}: {source} is not a directory")
    return ModelSpec(name, source)


@dataclass(frozen=True)
class ReplicaCount:
    """`--replicas MODEL=N` or `MODEL=NxK`: N replicas of the served model MODEL, each on K
    devices (K > 1: a gang of SPMD processes, engine/gang.py)."""

    model: str
    replicas: int
    devices: int = 1


def parse_replica_count(spec: str) -> ReplicaCount:
    """ValueError naming the spec for anything but MODEL=N or MODEL=NxK (N, K >= 1)."""
    model, sep, count = spec.rpartition("=")
    replicas, x, devices = count.strip().lower().partition("x")
    model = model.strip()
    try:
        parsed = ReplicaCount(model, int(replicas), int(devices) if x else 1)
    except ValueError:
        parsed = None
    if not sep or not model or parsed is None or parsed.replicas < 1 or parsed.devices < 1:
        raise ValueError(
            f"replicas {spec!r}: expected MODEL=N or MODEL=NxK with N, K >= 1 "
            "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct=2)"
        )
    return parsed


class Settings(BaseSettings):
    """Every knob of tinkerd. Each field is also read from `TINKERD_<FIELD>` (upper case);
    list fields take JSON (`TINKERD_MODELS='["a", "b"]'`)."""

    model_config = SettingsConfigDict(env_prefix="TINKERD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Serve a non-loopback host even with no registered API key (anyone reaching it is a user).
    insecure: bool = False
    data_dir: Path = Field(default_factory=default_data_dir)
    # Each a hub name, a local directory, or NAME=PATH (a local directory served as NAME).
    models: list[str] = Field(default_factory=lambda: [EMBEDDED_MODEL])
    # Served names of models allowed to run the Python code they ship (off for all by default).
    trust_remote_code: list[str] = Field(default_factory=list)
    database_url: str | None = None  # default: SQLite in the data dir
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Serve bfloat16 on a CPU without native bf16 matmuls (tinkerd/model/cpu_features.py),
    # where it runs tens to hundreds of times slower than float32; refused unless set.
    allow_slow_bf16: bool = False
    device: str = "cpu"
    threads: int | None = None
    token_budget: int = 8192  # most padded tokens per forward/backward micro-batch
    # Memory for one micro-batch's activations; the budget in tokens is this divided by the
    # bytes per token measured at startup. None: a quarter of RAM (1-8 GiB) on CPU, half of
    # the free memory on a GPU.
    train_memory_gb: float | None = None
    # A run's adapter and optimizer are written to disk every this many optim steps; after a
    # crash at most this many steps are recomputed from the request log (see api/recovery.py).
    state_every: int = Field(default=8, ge=1)
    # Runs of sessions without a heartbeat for this long leave memory (state written first)
    # and come back on their next request.
    idle_release_seconds: float = Field(default=600.0, gt=0)
    # Memory for frozen sampler weights (save_weights_for_sampler snapshots and loaded sampler
    # checkpoints); beyond it the oldest leave memory (saved ones reload from disk).
    sampler_memory_gb: float = Field(default=4.0, gt=0)
    # Memory for prompt KV shared across sample requests (model/prefix_cache.py: a prompt's
    # prefix is computed once per adapter snapshot; least recently used evicted). 0: off.
    prefix_cache_mb: float = Field(default=512.0, ge=0)
    # Prompt tokens prefilled per decode step (model/sample_engine.py): a longer prompt is
    # prefilled in chunks between decode steps, so rows already decoding are not stalled.
    prefill_chunk_tokens: int = Field(default=512, ge=1)
    # Decode step of Llama-family models: "tinkerd" (model/decoder.py, a KV arena and packed
    # weights) or "transformers" (its forward over a padded cache, as other models use).
    decoder: Literal["tinkerd", "transformers"] = "tinkerd"
    # The tinkerd decoder's fused CPU kernels (model/kernels: RMSNorm, RoPE + KV write,
    # attention, SiLU gate), compiled with the machine's g++ on first use and cached under
    # $XDG_CACHE_HOME/tinkerd/kernels. False, or where they cannot be built: eager torch ops.
    decode_kernels: bool = True
    # Decode time per scheduler turn before training work runs again (engine/scheduler.py:
    # bounds how long sampling delays a training op, and the per-turn overhead).
    sample_slice_ms: float = Field(default=50.0, gt=0)
    # The vLLM venv's python (`make vllm-venv`; docs/vllm.md): set, eligible samples run on a
    # vLLM sampler pool in that interpreter (tinkerd/engine/vllm_sampler.py). None: tinkerd's own.
    vllm_python: Path | None = None
    long_poll_seconds: float = 30.0  # how long retrieve_future waits before try_again
    # Datums per forward_backward request that clients are told to send (the SDK splits
    # larger batches into chunks); None leaves the SDK's default (1024).
    fwdbwd_max_chunk_len: int | None = None
    # Largest request body accepted (413 above it). The SDK's forward_backward chunks are ~5 MB
    # and its sample requests far smaller, so the default leaves ample room.
    max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # Optional parts of the protocol announced to clients. Off, the SDK falls back to what
    # works without them: one /retrieve_future long-poll per sample (instead of one
    # /retrieve_futures poll per sampling client), random clone ids for unpickled sampling
    # clients (instead of /join_sampling_session), abandoned samples left to run (instead of
    # /cancel_future). The endpoints answer either way.
    sample_use_retrieve_futures: bool = True
    sample_join_sampling_session: bool = True
    sample_cancel_enabled: bool = True
    # Sequence records of samples with record_stability_info (for stable_reinforce): at most
    # this much disk in all; past it the least recently used are deleted (and a training
    # request naming one gets the "unknown or expired sequence_id" 400).
    stability_records_max_mb: float = Field(default=1024.0, gt=0)
    # Server-side custom losses: announced in /client/config, so ServiceClient.create_custom_loss
    # uploads the traced loss (/create_custom_loss) and forward_backward_custom runs it here
    # (tinkerd/model/custom_loss.py). Off, the SDK runs them client-side and uploads are
    # refused; losses stored before still run (replays after a restart need them).
    custom_loss_server_side: bool = True
    # Prometheus `/metrics` (api/metrics.py). Served to loopback clients only, unless a token
    # is set: then every scrape needs `Authorization: Bearer <metrics_token>`.
    metrics_enabled: bool = True
    metrics_token: str | None = None
    # Server log lines: "text" (human-readable) or "json" (one object per line, with the
    # request context: request_id, user, model, seq_id, kind; see tinkerd/logs.py).
    log_format: Literal["text", "json"] = "text"

    # Worker replicas on Ray, per served model: MODEL=N or MODEL=NxK (K devices each). Empty:
    # one in-process worker per model, no Ray (the default).
    replicas: list[str] = Field(default_factory=list)
    # An existing Ray cluster (`ray start --head` on this host, `ray start --address` on the
    # others); None: tinkerd starts a local one and ends it on shutdown.
    ray_address: str | None = None
    # CPUs one CPU replica (or one rank of a gang) holds on the cluster; on CUDA each holds a GPU.
    replica_cpus: float = Field(default=1.0, gt=0)
    # Runs placed on a replica before new runs go to the next one (fill before spreading).
    replica_max_runs: int = Field(default=16, ge=1)

    def model_specs(self) -> list[ModelSpec]:
        """`models`, parsed (ValueError for a malformed NAME=PATH)."""
        return [parse_model_spec(m) for m in self.models]

    def replica_counts(self) -> dict[str, ReplicaCount]:
        """`replicas`, parsed and checked against the served models (ValueError)."""
        served = {spec.name for spec in self.model_specs()}
        counts: dict[str, ReplicaCount] = {}
        for spec in self.replicas:
            count = parse_replica_count(spec)
            if count.model not in served:
                raise ValueError(
                    f"replicas {spec!r}: {count.model!r} is not a served model "
                    f"(served: {', '.join(sorted(served))})"
                )
            counts[count.model] = count
        return counts

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tinkerd.db'}"
