"""What each endpoint does, between HTTP (routes.py) and the store and engine.

Every request that returns a future follows one path: validate (4xx on bad input) → store the
future durably → hand an `Op` to the base model's scheduler → return the request_id. The op's
callbacks, run on the scheduler thread, encode the result as the SDK expects (protobuf for
forward/backward and sample results, JSON otherwise), store it, and wake the long-pollers.
"""

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tinkerd.api import codec, stability
from tinkerd.api.futures import FutureHub, completion_queue_key
from tinkerd.checkpoints import downloads
from tinkerd.checkpoints.paths import TinkerPath
from tinkerd.checkpoints.peft_format import (
    checkpoint_exists,
    copy_checkpoint,
    delete_checkpoint,
    read_adapter_info,
)
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
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.lora import LoraConfig
from tinkerd.model.losses import LossInputError
from tinkerd.model.optimizer import AdamParams, OptimStepResult
from tinkerd.model.sampling import validate_sample_input
from tinkerd.model.training import validate_input
from tinkerd.model.types import ForwardBackwardInput, SampleInput, SampleOutput, SamplingParams
from tinkerd.store.records import (
    CheckpointRecord,
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    StabilityRecord,
    TrainingRunRecord,
)
from tinkerd.store.store import Store

log = logging.getLogger(__name__)

# The logged request being replayed after a restart (None while serving clients).
_replaying: ContextVar[FutureRecord | None] = ContextVar("replaying", default=None)
# A zstd frame; a valid ForwardBackwardRequest starts with field 1 (model_id, byte 0x0a).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

KIND_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
# Tinker bounds ttl_seconds at 10 years (the lower bound of 1 hour is not enforced here).
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# How long signed external-weights download URLs stay valid.
DOWNLOAD_URL_SECONDS = 3600


class ApiError(Exception):
    """A caller error: HTTP `status` with a JSON body `{"detail": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


@dataclass
class Future:
    """What a future-returning endpoint answers (UntypedAPIFuture)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id}
        if self.model_id is not None:
            out["model_id"] = self.model_id
        if self.sample_sequence_ids is not None:
            out["sample_sequence_ids"] = self.sample_sequence_ids
        return out


class Service:
    def __init__(
        self,
        store: Store,
        schedulers: dict[str, ModelScheduler],
        checkpoint_root: Path,
        hub: FutureHub,
        *,
        stability_max_bytes: int = 1 << 30,
        custom_losses: Any = None,
    ) -> None:
        self.store = store
        if custom_losses is None:  # imported here: custom_losses.py imports this module
            from tinkerd.api.custom_losses import CustomLosses

            custom_losses = CustomLosses(store)
        self.custom_losses = custom_losses
        self.schedulers = schedulers
        self.checkpoint_root = checkpoint_root
        self.hub = hub
        # Sequence records (record_stability_info): at most this many bytes on disk; an
        # estimate of the total (None: not read yet) triggers a sweep when it passes the bound.
        self.stability_max_bytes = stability_max_bytes
        self._stability_bytes: int | None = None
        self._bookkeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bookkeeping")
        self._download_secret: bytes | None = None

    # -- models and sessions ------------------------------------------------------------

    def infos(self) -> list[BaseModelInfo]:
        return [s.worker.info for s in self.schedulers.values()]

    def scheduler(self, base_model: str) -> ModelScheduler:
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

    # -- futures ------------------------------------------------------------------------

    def _submit(
        self,
        user: str,
        kind: str,
        body: Any,
        scheduler: ModelScheduler,
        make_op: Callable[[str], Op],
        *,
        model_id: str | None = None,
        seq_id: int | None = None,
    ) -> FutureRecord:
        """Store the future (deduped by (model_id, seq_id)), then queue its op once.

        While replaying a logged request (see `replay`), the future exists already: its op is
        queued again under the same request_id, and if it had completed, only for its effect
        on the run (the stored result stays as the client may have read it)."""
        logged = _replaying.get()
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
            self.store.complete_future(request_id, data, result_type)
            self._wake(request_id, _finished(request_id, "complete", data, result_type), queue)

        def failed(exc: Exception) -> None:
            user_error = isinstance(exc, (UserError, LossInputError, ValueError, KeyError))
            if not user_error:
                log.exception("request %s failed", request_id, exc_info=exc)
            message = str(exc) or type(exc).__name__
            category = "user" if user_error else "server"
            self.store.fail_future(request_id, message, category)
            record = _finished(request_id, "failed", error=message, category=category)
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

    # -- training ----------------------------------------------------------------------

    def create_model(self, user: str, body: dict[str, Any]) -> Future:
        session = self.session(body["session_id"], user)
        base_model = body["base_model"]
        scheduler = self.scheduler(base_model)
        optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
        if optimizer != "adamw":
            raise ApiError(400, _unsupported_optimizer(optimizer))
        lora = body.get("lora_config") or {}
        try:
            config = LoraConfig(
                rank=int(lora.get("rank", 32)),
                seed=lora.get("seed"),
                train_attn=bool(lora.get("train_attn", True)),
                train_mlp=bool(lora.get("train_mlp", True)),
                train_unembed=bool(lora.get("train_unembed", True)),
            )
        except ValueError as exc:
            raise ApiError(400, f"lora_config: {exc}") from exc
        model_id = f"{session.session_id}:train:{int(body.get('model_seq_id', 0))}"
        self._create_run(user, session, model_id, base_model, config, body.get("user_metadata"))

        def encode(_: object) -> tuple[bytes, str]:
            return _json({"model_id": model_id, "type": "create_model"})

        rec = self._submit(
            user,
            "create_model",
            body,
            scheduler,
            lambda rid: self._op(rid, CreateAdapter(config), encode, model_id, 0),
            model_id=model_id,
            seq_id=0,
        )
        return Future(rec.request_id, model_id=model_id)

    def _create_run(
        self,
        user: str,
        session: SessionRecord,
        model_id: str,
        base_model: str,
        config: LoraConfig,
        user_metadata: dict[str, Any] | None,
    ) -> None:
        if self.store.get_training_run(model_id) is not None:
            return  # a retried create: same run
        self.store.create_training_run(
            TrainingRunRecord(
                model_id=model_id,
                session_id=session.session_id,
                user=user,
                base_model=base_model,
                lora_rank=config.rank,
                lora_config={
                    "rank": config.rank,
                    "alpha": config.alpha,
                    "seed": config.seed,
                    "train_attn": config.train_attn,
                    "train_mlp": config.train_mlp,
                    "train_unembed": config.train_unembed,
                },
                user_metadata=dict(user_metadata or {}),
            )
        )

    def get_info(self, user: str, model_id: str) -> dict[str, Any]:
        run = self.run(model_id, user)
        info = self.scheduler(run.base_model).worker.info
        return {
            "model_id": model_id,
            "model_data": {
                "arch": info.architecture,
                "model_name": run.base_model,
                "tokenizer_id": info.tokenizer_name,
            },
            "is_lora": True,
            "lora_rank": run.lora_rank,
            "model_name": run.base_model,
            "type": "get_info",
        }

    def _training_target(self, user: str, model_id: str, seq_id: int) -> TrainingRunRecord:
        run = self.run(model_id, user)
        if seq_id < 1:
            raise ApiError(400, f"seq_id must be >= 1, got {seq_id}")
        return run

    @contextmanager
    def _rejection_skips_seq(
        self, run: TrainingRunRecord, model_id: str, seq_id: int
    ) -> Iterator[None]:
        """A caller error (4xx) for a request of a known run and seq_id: the SDK has consumed
        that seq_id and will never resend it, so let the run's sequence move past it; else
        every later request of the run would wait for it forever."""
        try:
            yield
        except (ApiError, KeyError) as exc:  # KeyError: a missing field, answered with a 400
            if _replaying.get() is None:
                # Logged as a failed future, so that a replay after a restart skips it too.
                rec = self.store.create_future(
                    FutureRecord(
                        request_id=str(uuid.uuid4()),
                        user=run.user,
                        kind="rejected",
                        request=b"",
                        model_id=model_id,
                        seq_id=seq_id,
                    )
                )
                if rec.kind == "rejected":  # not an accepted request with this seq_id
                    self.store.fail_future(rec.request_id, str(exc), "user")
            if run.base_model in self.schedulers:
                self.schedulers[run.base_model].skip(model_id, seq_id)
            raise

    def forward_backward(self, user: str, body: bytes, content_encoding: str | None) -> Future:
        try:
            msg = codec.parse_forward_backward(body, content_encoding)
        except codec.CodecError as exc:
            raise ApiError(400, str(exc)) from exc
        run = self._training_target(user, msg.model_id, msg.seq_id)
        scheduler = self.scheduler(run.base_model)
        info = scheduler.worker.info
        # Bad data is refused here, before batching, so it never fails other tenants' rows.
        with self._rejection_skips_seq(run, msg.model_id, msg.seq_id):
            try:
                req = codec.forward_backward_data(msg)
                item = ForwardBackwardInput(
                    req.model_id, req.data, req.loss_fn, dict(req.loss_fn_config), req.forward_only
                )
                if req.loss_fn == "custom":  # an uploaded loss of this run's session
                    loss_id = req.loss_fn_config_text.get("loss_id")
                    item.custom_loss = self.custom_losses.resolve(user, run.session_id, loss_id)
                if item.loss_fn == "stable_reinforce":
                    item.data = stability.attach_stability_inputs(
                        self.store, item.data, run.session_id, user, run.model_id
                    )
                validate_input(item, info.vocab_size, info.context_length)
            except (codec.CodecError, LossInputError, stability.ProvenanceError) as exc:
                raise ApiError(400, str(exc)) from exc
            _check_fits_memory(item, scheduler.token_budget)

        def encode(result: object) -> tuple[bytes, str]:
            return codec.encode_forward_backward_output(result), "proto"  # type: ignore[arg-type]

        rec = self._submit(
            user,
            "forward_backward",
            body,
            scheduler,
            lambda rid: self._op(rid, ForwardBackward(item), encode, req.model_id, req.seq_id),
            model_id=req.model_id,
            seq_id=req.seq_id,
        )
        return Future(rec.request_id, model_id=req.model_id)

    def optim_step(self, user: str, body: dict[str, Any]) -> Future:
        model_id, seq_id = body["model_id"], int(body["seq_id"])
        run = self._training_target(user, model_id, seq_id)
        adam = body.get("adam_params") or {}
        with self._rejection_skips_seq(run, model_id, seq_id):
            other = body.get("optimizer_params")
            if other is not None:
                raise ApiError(400, _unsupported_optimizer(other.get("type")))
            try:
                params = AdamParams(
                    **{k: float(v) for k, v in adam.items() if k in AdamParams.__dataclass_fields__}
                )
            except (TypeError, ValueError) as exc:
                raise ApiError(400, str(exc)) from exc

        def encode(result: object) -> tuple[bytes, str]:
            assert isinstance(result, OptimStepResult)
            return _json({"metrics": {"grad_norm:max": result.grad_norm}, "type": "optim_step"})

        rec = self._submit(
            user,
            "optim_step",
            body,
            self.scheduler(run.base_model),
            lambda rid: self._op(rid, OptimStep(params), encode, model_id, seq_id),
            model_id=model_id,
            seq_id=seq_id,
        )
        return Future(rec.request_id, model_id=model_id)

    def save_weights(self, user: str, body: dict[str, Any], *, for_sampler: bool) -> Future:
        model_id, seq_id = body["model_id"], int(body["seq_id"])
        run = self._training_target(user, model_id, seq_id)
        with self._rejection_skips_seq(run, model_id, seq_id):
            return self._save_weights(user, body, run, for_sampler=for_sampler)

    def _save_weights(
        self,
        user: str,
        body: dict[str, Any],
        run: TrainingRunRecord,
        *,
        for_sampler: bool,
        external: bool = False,
    ) -> Future:
        model_id, seq_id = body["model_id"], int(body["seq_id"])
        scheduler = self.scheduler(run.base_model)
        name = body.get("path")
        kind = "save_weights_for_sampler" if for_sampler else "save_weights"
        if external:
            kind = "save_weights_external"
        if for_sampler and not name:
            return self._snapshot(user, body, run, scheduler)
        if not name:
            raise ApiError(400, "path (the checkpoint name) is required")
        dir_kind = "sampler_weights" if for_sampler else "weights"
        try:
            tpath = TinkerPath(model_id, "external_weights" if external else dir_kind, name)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        directory = tpath.storage_dir(self.checkpoint_root)
        # An external export has no overwrite flag: saving the same name again replaces it.
        overwrite = external or bool(body.get("overwrite", False))
        if not overwrite and checkpoint_exists(directory) and not self._is_retry(model_id, seq_id):
            raise ApiError(400, f"checkpoint {tpath} already exists (set overwrite to replace)")
        ttl = body.get("ttl_seconds")
        if ttl is not None and ttl > MAX_TTL_SECONDS:
            raise ApiError(400, f"ttl_seconds must be at most {MAX_TTL_SECONDS} (10 years)")
        metadata = dict(body.get("user_metadata") or {})

        def encode(result: object) -> tuple[bytes, str]:
            self.store.add_checkpoint(
                CheckpointRecord(
                    training_run_id=model_id,
                    checkpoint_id=tpath.checkpoint_id,
                    checkpoint_type=KIND_TYPES[tpath.kind],
                    tinker_path=str(tpath),
                    user=user,
                    size_bytes=int(result),  # type: ignore[call-overload]
                    user_metadata=metadata,
                    expires_at=datetime.now(UTC) + timedelta(seconds=ttl) if ttl else None,
                )
            )
            out: dict[str, Any] = {"path": str(tpath), "type": kind}
            if external:
                out["size_bytes"] = int(result)  # type: ignore[call-overload]
            return _json(out)

        with_optimizer = tpath.kind == "weights"
        action = SaveAdapter(directory, with_optimizer, run.base_model, overwrite=True)
        rec = self._submit(
            user,
            kind,
            body,
            scheduler,
            lambda rid: self._op(rid, action, encode, model_id, seq_id),
            model_id=model_id,
            seq_id=seq_id,
        )
        return Future(rec.request_id, model_id=model_id)

    def save_weights_external(self, user: str, body: dict[str, Any]) -> Future:
        """An HF-format (PEFT adapter) export under `tinker://<run>/external_weights/<name>`."""
        model_id, seq_id = body["model_id"], int(body["seq_id"])
        run = self._training_target(user, model_id, seq_id)
        with self._rejection_skips_seq(run, model_id, seq_id):
            if body.get("age_encryption_recipients"):
                raise ApiError(
                    400, "age_encryption_recipients is not supported by self-hosted tinkerd"
                )
            return self._save_weights(user, body, run, for_sampler=False, external=True)

    def _is_retry(self, model_id: str, seq_id: int) -> bool:
        """A future for exactly this (model_id, seq_id) already exists: the SDK retrying."""
        return self.store.future_by_seq(model_id, seq_id) is not None

    def skip_refused(self, user: str, model_id: str, seq_id: int, message: str) -> None:
        """A training request refused before it reached the service (a 422 of the HTTP
        layer) still used up its seq_id: move the caller's run past it, as for the service's
        own refusals. Nothing happens for another user's run or a seq_id already taken."""
        run = self.store.get_training_run(model_id, user)
        if run is None or self._is_retry(model_id, seq_id):
            return
        with contextlib.suppress(ApiError), self._rejection_skips_seq(run, model_id, seq_id):
            raise ApiError(422, message)

    def _snapshot(
        self, user: str, body: dict[str, Any], run: TrainingRunRecord, scheduler: ModelScheduler
    ) -> Future:
        """Ephemeral save_weights_for_sampler: a frozen in-memory snapshot as a new sampler."""
        model_id, seq_id = body["model_id"], int(body["seq_id"])
        n = body.get("sampling_session_seq_id")
        if n is None:
            raise ApiError(400, "either path or sampling_session_seq_id is required")
        sampler_id = f"{run.session_id}:sample:{int(n)}"
        kind = body.get("kind") or "snapshot"
        if kind not in ("snapshot", "inflight"):
            raise ApiError(400, f"kind must be 'snapshot' or 'inflight', got {kind!r}")
        # An inflight save updates the run's one inflight target, which all its inflight
        # clients (earlier ones too) sample; a snapshot freezes weights for this client only.
        inflight = kind == "inflight"
        snapshot_id = inflight_adapter_id(model_id) if inflight else sampler_id

        def encode(_: object) -> tuple[bytes, str]:
            result = {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
            if self.store.get_sampling_session(sampler_id) is not None:  # a replay after restart
                return _json(result)
            self.store.create_sampling_session(
                SamplingSessionRecord(
                    sampling_session_id=sampler_id,
                    session_id=run.session_id,
                    user=user,
                    base_model=run.base_model,
                    model_path=None,
                    snapshot_of=model_id,
                    inflight=inflight,
                )
            )
            return _json(result)

        rec = self._submit(
            user,
            "save_weights_for_sampler",
            body,
            scheduler,
            lambda rid: self._op(rid, SnapshotAdapter(snapshot_id), encode, model_id, seq_id),
            model_id=model_id,
            seq_id=seq_id,
        )
        return Future(rec.request_id, model_id=model_id)

    def resolve_checkpoint(self, user: str, path: str) -> tuple[TinkerPath, CheckpointRecord]:
        """A tinker:// path the user may read (own or public), with its record."""
        try:
            tpath = TinkerPath.parse(path)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        rec = self.store.get_checkpoint(tpath.run_id, tpath.checkpoint_id)
        if rec is not None and _expired(rec):
            self._remove_checkpoint(rec)
            rec = None
        if rec is None or (rec.user != user and not rec.public):
            raise not_found(f"checkpoint {path!r}")
        return tpath, rec

    def load_weights(self, user: str, body: dict[str, Any]) -> Future:
        if "session_id" not in body:  # legacy load_state into an existing run (seq_id >= 1)
            model_id, seq_id = body["model_id"], int(body["seq_id"])
            run = self._training_target(user, model_id, seq_id)
            with self._rejection_skips_seq(run, model_id, seq_id):
                return self._load_weights(user, body)
        return self._load_weights(user, body)

    def _load_weights(self, user: str, body: dict[str, Any]) -> Future:
        tpath, _ = self.resolve_checkpoint(user, body["path"])
        directory = tpath.storage_dir(self.checkpoint_root)
        with_optimizer = bool(body.get("optimizer", False))
        if with_optimizer and tpath.kind != "weights":
            raise ApiError(400, "optimizer state exists only in training checkpoints (weights/)")
        info = read_adapter_info(directory)

        if "session_id" in body:  # create a new training run from the checkpoint
            session = self.session(body["session_id"], user)
            optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
            if optimizer != "adamw":
                raise ApiError(400, _unsupported_optimizer(optimizer))
            model_id = f"{session.session_id}:train:{int(body.get('model_seq_id', 0))}"
            base_model = body.get("base_model") or info.base_model
            config = LoraConfig(
                info.rank,
                info.alpha,
                info.seed,
                info.train_attn,
                info.train_mlp,
                info.train_unembed,
            )
            self._create_run(user, session, model_id, base_model, config, body.get("user_metadata"))
            seq_id = 0
        else:  # legacy load_state into an existing run
            model_id, seq_id = body["model_id"], int(body["seq_id"])
            base_model = self._training_target(user, model_id, seq_id).base_model

        def encode(_: object) -> tuple[bytes, str]:
            return _json({"path": str(tpath), "model_id": model_id, "type": "load_weights"})

        action = LoadAdapter(directory, with_optimizer)
        rec = self._submit(
            user,
            "load_weights",
            body,
            self.scheduler(base_model),
            lambda rid: self._op(rid, action, encode, model_id, seq_id),
            model_id=model_id,
            seq_id=seq_id,
        )
        return Future(rec.request_id, model_id=model_id)

    # -- sampling ----------------------------------------------------------------------

    def create_sampling_session(self, user: str, body: dict[str, Any]) -> str:
        session = self.session(body["session_id"], user)
        sampler_id = f"{session.session_id}:sample:{int(body['sampling_session_seq_id'])}"
        model_path = body.get("model_path")
        base_model = body.get("base_model")
        if model_path:
            tpath, _ = self.resolve_checkpoint(user, model_path)
            info = read_adapter_info(tpath.storage_dir(self.checkpoint_root))
            base_model = base_model or info.base_model
        if not base_model:
            raise ApiError(400, "either base_model or model_path is required")
        self.scheduler(base_model)
        if self.store.get_sampling_session(sampler_id) is None:
            self.store.create_sampling_session(
                SamplingSessionRecord(
                    sampling_session_id=sampler_id,
                    session_id=session.session_id,
                    user=user,
                    base_model=base_model,
                    model_path=model_path,
                )
            )
        return sampler_id

    def sampler(self, user: str, sampler_id: str) -> SamplingSessionRecord:
        rec = self.store.get_sampling_session(sampler_id, user)
        if rec is None:
            raise not_found(f"sampler {sampler_id!r}")
        return rec

    def sample(self, user: str, body: dict[str, Any]) -> Future:
        sampler_id = body.get("sampling_session_id")
        if sampler_id:
            sampler = self.sampler(user, sampler_id)
            base_model = sampler.base_model
        else:
            sampler, base_model = None, body.get("base_model")
            if not base_model and not body.get("model_path"):
                raise ApiError(400, "sampling_session_id, model_path or base_model is required")
        # A sampler's checkpoint, or one named in the request: either way own or public only.
        model_path = sampler.model_path if sampler is not None else body.get("model_path")
        adapter_id, snapshot_dir = None, None
        if model_path:
            tpath, _ = self.resolve_checkpoint(user, model_path)
            adapter_id, snapshot_dir = str(tpath), tpath.storage_dir(self.checkpoint_root)
            base_model = base_model or read_adapter_info(snapshot_dir).base_model
        elif sampler is not None and sampler.snapshot_of:
            adapter_id = (
                inflight_adapter_id(sampler.snapshot_of)
                if sampler.inflight
                else sampler.sampling_session_id
            )
        record = bool(body.get("record_stability_info") or False)
        if record and sampler is None:
            raise ApiError(
                400, "record_stability_info needs a sampling_session_id (records are per session)"
            )
        scheduler = self.scheduler(base_model)
        try:
            target, target_layout = None, None
            if body.get("target_prompt_logprobs") is not None:
                target, target_layout = codec.target_prompt_ids(body["target_prompt_logprobs"])
            last_n = body.get("prompt_logprobs_last_n")
            prompt = codec.model_input_tokens(body["prompt"])
            # An absent max_tokens takes what the context leaves (at most 128); a given one
            # must fit with the prompt (validate_sample_input).
            room = scheduler.worker.info.context_length - len(prompt)
            item = SampleInput(
                adapter_id=adapter_id,
                prompt=prompt,
                params=sampling_params(body.get("sampling_params") or {}, max(1, min(128, room))),
                num_samples=int(body.get("num_samples", 1)),
                prompt_logprobs=bool(body.get("prompt_logprobs") or False),
                topk_prompt_logprobs=int(body.get("topk_prompt_logprobs") or 0),
                topk_sample_logprobs=int(body.get("topk_sample_logprobs") or 0),
                target_prompt_logprobs=target,
                prompt_alt_tokens_k=int(body.get("prompt_alt_tokens_k") or 0),
                prompt_logprobs_last_n=int(last_n) if last_n is not None else None,
                record_stability=record,
            )
            info = scheduler.worker.info
            validate_sample_input(item, info.vocab_size, info.context_length)
        except (codec.CodecError, ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from exc

        def encode_for(request_id: str) -> Callable[[object], tuple[bytes, str]]:
            def encode(result: object) -> tuple[bytes, str]:
                assert isinstance(result, SampleOutput)
                if record and sampler is not None:
                    weights_run = sampler.snapshot_of or (str(model_path) if model_path else None)
                    self._record_stability(
                        stability.make_record(
                            request_id,
                            sampler.session_id,
                            user,
                            sampler.base_model,
                            weights_run,
                            item.prompt,
                            result,
                        )
                    )
                data = codec.encode_sample_response(
                    result,
                    prompt_logprobs_requested=item.prompt_logprobs,
                    topk_prompt_k=item.topk_prompt_logprobs,
                    topk_sample_k=item.topk_sample_logprobs,
                    target_layout=target_layout,
                )
                return data, "proto"

            return encode

        seq_id = body.get("seq_id")
        # A sample of a sampling session with a seq_id joins the session's completion queue
        # (the store numbers it when it finishes; see /retrieve_futures).
        queue = sampler_id if seq_id is not None else None
        rec = self._submit(
            user,
            "sample",
            body,
            scheduler,
            lambda rid: self._op(rid, Sample(item, snapshot_dir), encode_for(rid), queue=queue),
            model_id=queue,
            seq_id=int(seq_id) if seq_id is not None else None,
        )
        ids = [f"{rec.request_id}:{i}" for i in range(item.num_samples)]
        return Future(rec.request_id, sample_sequence_ids=ids)

    def _record_stability(self, rec: StabilityRecord) -> None:
        """Store a sample's sequence record before its result is visible (so a training
        request that names its sequences finds it); sweep when past the disk bound."""
        if not self.store.add_stability_record(rec):
            return
        if self._stability_bytes is None:
            self._stability_bytes = self.store.stability_bytes()
        else:
            self._stability_bytes += rec.size_bytes
        if self._stability_bytes > self.stability_max_bytes:
            self.sweep_stability_records()

    def sweep_stability_records(self) -> int:
        """Expired sequence records out, then the least recently used past the bound."""
        gone = stability.sweep(self.store, self.stability_max_bytes)
        self._stability_bytes = self.store.stability_bytes()
        return gone

    # -- sampling clients: completion queues, clone ids, cancellation --------------------

    def completion_queue_start(
        self, user: str, sampler_id: str, client_id: int, prev_cursor: int
    ) -> int:
        """For a /retrieve_futures poll (404 for another user's sampler): record the client's
        acknowledgement `prev_cursor` (the SDK's poller sends the last cursor it processed)
        and answer where to read from. A fresh poller (cursor 0) of a client whose poller
        came before starts after what that one acknowledged, as the SDK trims seen events."""
        self.sampler(user, sampler_id)
        acked = self.store.acked_cursor(sampler_id, client_id)
        if prev_cursor > acked:
            self.store.ack_cursor(sampler_id, client_id, prev_cursor)
        return prev_cursor if prev_cursor > 0 else acked

    def join_sampling_session(self, user: str, sampler_id: str) -> int:
        """A clone id for a new client of the user's sampling session (never reused)."""
        self.sampler(user, sampler_id)
        return self.store.join_sampling_session(sampler_id)

    def cancel_future(self, user: str, request_id: str) -> bool:
        """Cancel a sample that has not started: out of its queue, its future failed (category
        user: the client gave it up). One that runs or has finished is left alone, so a
        repeat is harmless. Returns whether it was cancelled now."""
        rec = self.get_future(request_id, user)
        if rec.kind != "sample":
            raise ApiError(
                400,
                f"request {request_id!r} is a {rec.kind} request; only sample requests can be "
                "cancelled (training requests are part of their run's ordered log)",
            )
        if rec.status != "pending":
            return False
        for scheduler in self.schedulers.values():
            op = scheduler.cancel_sample(request_id)
            if op is not None:
                op.fail(UserError("sample request cancelled by its client before it started"))
                return True
        return False

    # -- checkpoints and runs -----------------------------------------------------------

    def delete_checkpoint(self, user: str, run_id: str, checkpoint_id: str) -> None:
        self.run(run_id, user)
        tpath = TinkerPath.from_checkpoint_id(run_id, checkpoint_id)
        if self.store.get_checkpoint(run_id, checkpoint_id) is None:
            raise not_found(f"checkpoint {tpath}")
        delete_checkpoint(tpath.storage_dir(self.checkpoint_root))
        self.store.delete_checkpoint(run_id, checkpoint_id)

    def owned_checkpoint(self, user: str, run_id: str, checkpoint_id: str) -> CheckpointRecord:
        """The user's own (unexpired) checkpoint, else 404 (others' checkpoints too)."""
        self.run(run_id, user)
        try:
            tpath = TinkerPath.from_checkpoint_id(run_id, checkpoint_id)
        except ValueError as exc:
            raise not_found(f"checkpoint {checkpoint_id!r}") from exc
        rec = self.store.get_checkpoint(run_id, checkpoint_id)
        if rec is not None and _expired(rec):
            self._remove_checkpoint(rec)
            rec = None
        if rec is None or rec.user != user:
            raise not_found(f"checkpoint {tpath}")
        return rec

    def set_checkpoint_ttl(
        self, user: str, run_id: str, checkpoint_id: str, ttl_seconds: int | None
    ) -> None:
        self.owned_checkpoint(user, run_id, checkpoint_id)
        if ttl_seconds is not None and ttl_seconds > MAX_TTL_SECONDS:
            raise ApiError(400, f"ttl_seconds must be at most {MAX_TTL_SECONDS} (10 years)")
        expires = (
            None if ttl_seconds is None else datetime.now(UTC) + timedelta(seconds=ttl_seconds)
        )
        self.store.set_checkpoint_ttl(run_id, checkpoint_id, expires)

    def set_checkpoint_public(
        self, user: str, run_id: str, checkpoint_id: str, public: bool
    ) -> None:
        self.owned_checkpoint(user, run_id, checkpoint_id)
        self.store.set_checkpoint_public(run_id, checkpoint_id, public)

    def _remove_checkpoint(self, rec: CheckpointRecord) -> None:
        tpath = TinkerPath.from_checkpoint_id(rec.training_run_id, rec.checkpoint_id)
        delete_checkpoint(tpath.storage_dir(self.checkpoint_root))
        self.store.delete_checkpoint(rec.training_run_id, rec.checkpoint_id)

    def sweep_expired(self) -> int:
        """Delete every checkpoint whose TTL has passed (files and record); returns how many.
        Cheap (one indexed query), so it runs before listings and on loads."""
        expired = self.store.expired_checkpoints(datetime.now(UTC))
        for rec in expired:
            try:
                self._remove_checkpoint(rec)
            except OSError:
                log.exception("could not delete expired checkpoint %s", rec.tinker_path)
        return len(expired)

    # -- external weights downloads -----------------------------------------------------

    def download_secret(self) -> bytes:
        if self._download_secret is None:
            self._download_secret = downloads.load_secret(self.checkpoint_root.parent)
        return self._download_secret

    def external_weights_urls(
        self, user: str, run_id: str, checkpoint_id: str, base_url: str
    ) -> dict[str, Any]:
        """Signed download URLs (served by `download`) for every file of a checkpoint."""
        rec = self.owned_checkpoint(user, run_id, checkpoint_id)
        tpath = TinkerPath.from_checkpoint_id(run_id, rec.checkpoint_id)
        directory = tpath.storage_dir(self.checkpoint_root)
        expires = int(time.time()) + DOWNLOAD_URL_SECONDS
        secret = self.download_secret()
        urls = {}
        for relpath in downloads.checkpoint_files(directory):
            grant = downloads.DownloadGrant(run_id, rec.checkpoint_id, relpath, expires)
            urls[relpath] = f"{base_url}/api/v1/downloads/{downloads.sign(secret, grant)}"
        return {"urls": urls, "expires": datetime.fromtimestamp(expires, UTC).isoformat()}

    def download(self, token: str) -> Path:
        """The file a signed token names: 403 if tampered with or expired, 404 if gone."""
        try:
            grant = downloads.verify(self.download_secret(), token)
        except downloads.TokenError as exc:
            raise ApiError(403, str(exc)) from exc
        rec = self.store.get_checkpoint(grant.run_id, grant.checkpoint_id)
        if rec is None or _expired(rec):
            raise not_found("checkpoint")
        tpath = TinkerPath.from_checkpoint_id(grant.run_id, grant.checkpoint_id)
        try:
            return downloads.resolve_file(tpath.storage_dir(self.checkpoint_root), grant.relpath)
        except FileNotFoundError as exc:
            raise not_found(f"file {grant.relpath!r}") from exc

    # -- copies -------------------------------------------------------------------------

    def copy_weights(
        self, user: str, body: dict[str, Any], idempotency_key: str | None
    ) -> dict[str, str]:
        """Copy a readable checkpoint (own or public) into a new run that holds only it.

        The new run is `<session_id>:train:<model_seq_id>` when those are given, else
        `copy-<hash>` derived from the idempotency key, so an SDK retry of the same call
        answers the same copy.
        """
        src, src_rec = self.resolve_checkpoint(user, body["source_path"])
        ttl = body.get("ttl_seconds")
        if ttl is not None and ttl > MAX_TTL_SECONDS:
            raise ApiError(400, f"ttl_seconds must be at most {MAX_TTL_SECONDS} (10 years)")
        info = read_adapter_info(src.storage_dir(self.checkpoint_root))
        if body.get("session_id") is not None:
            if body.get("model_seq_id") is None:
                raise ApiError(400, "session_id and model_seq_id go together")
            session = self.session(body["session_id"], user)
            run_id = f"{session.session_id}:train:{int(body['model_seq_id'])}"
            session_id = session.session_id
        elif body.get("destination_project_id") is not None:
            key = idempotency_key or str(uuid.uuid4())
            digest = hashlib.sha256(f"{user}\0{key}".encode()).hexdigest()[:24]
            run_id, session_id = f"copy-{digest}", ""
        else:
            raise ApiError(400, "give destination_project_id, or session_id and model_seq_id")
        existing = self.store.get_training_run(run_id)
        if existing is not None and existing.user != user:
            raise not_found(f"session {session_id!r}")
        dst = TinkerPath(run_id, src.kind, src.name)
        if existing is not None and self.store.get_checkpoint(run_id, dst.checkpoint_id):
            return {"tinker_path": str(dst)}  # a retry: already copied
        if existing is not None:
            raise ApiError(400, f"training run {run_id!r} already exists")
        self.store.create_training_run(
            TrainingRunRecord(
                model_id=run_id,
                session_id=session_id,
                user=user,
                base_model=info.base_model,
                lora_rank=info.rank,
                lora_config={
                    "rank": info.rank,
                    "alpha": info.alpha,
                    "seed": info.seed,
                    "train_attn": info.train_attn,
                    "train_mlp": info.train_mlp,
                    "train_unembed": info.train_unembed,
                },
                user_metadata={"copied_from": str(src)},
            )
        )
        size = copy_checkpoint(
            src.storage_dir(self.checkpoint_root),
            dst.storage_dir(self.checkpoint_root),
            overwrite=True,
        )
        self.store.add_checkpoint(
            CheckpointRecord(
                training_run_id=run_id,
                checkpoint_id=dst.checkpoint_id,
                checkpoint_type=dst.checkpoint_type,
                tinker_path=str(dst),
                user=user,
                size_bytes=size,
                user_metadata=dict(src_rec.user_metadata or {}),
                expires_at=datetime.now(UTC) + timedelta(seconds=ttl) if ttl else None,
            )
        )
        return {"tinker_path": str(dst)}

    # -- restarts and idle runs ---------------------------------------------------------

    def replay(self, rec: FutureRecord) -> None:
        """Queue a logged request again, exactly as it was first handled (see `_submit`).
        A request refused now fails its future (if pending) and moves its run past it."""
        token = _replaying.set(rec)
        try:
            self._dispatch(rec)
        except (ApiError, KeyError, ValueError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            self.fail_unfinished(rec, f"could not be re-run after a restart: {message}")
            if rec.model_id is not None and rec.seq_id is not None:
                for scheduler in self.schedulers.values():
                    scheduler.skip(rec.model_id, rec.seq_id)
        finally:
            _replaying.reset(token)

    def _dispatch(self, rec: FutureRecord) -> None:
        if rec.kind == "forward_backward":
            encoding = "zstd" if rec.request[:4] == ZSTD_MAGIC else None
            self.forward_backward(rec.user, rec.request, encoding)
            return
        body = json.loads(rec.request)
        handlers: dict[str, Callable[[], object]] = {
            "create_model": lambda: self.create_model(rec.user, body),
            "optim_step": lambda: self.optim_step(rec.user, body),
            "save_weights": lambda: self.save_weights(rec.user, body, for_sampler=False),
            "save_weights_for_sampler": lambda: self.save_weights(rec.user, body, for_sampler=True),
            "save_weights_external": lambda: self.save_weights_external(rec.user, body),
            "load_weights": lambda: self.load_weights(rec.user, body),
            "sample": lambda: self.sample(rec.user, body),
        }
        if rec.kind not in handlers:
            raise ApiError(400, f"requests of kind {rec.kind!r} are not re-run")
        handlers[rec.kind]()

    def fail_unfinished(self, rec: FutureRecord, message: str) -> None:
        if rec.status == "pending":
            self.store.fail_future(rec.request_id, message, "server")
            queue = rec.model_id if rec.kind == "sample" else None
            record = _finished(rec.request_id, "failed", error=message, category="server")
            self._wake(rec.request_id, record, queue)

    def release_idle_runs(self, idle_seconds: float) -> int:
        """Ask the schedulers to move out of memory the runs that neither had a request nor
        their session a heartbeat for `idle_seconds` (or whose session finished): their state
        is written first and they come back on next use. Returns how many were asked."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        asked = 0
        for scheduler in self.schedulers.values():
            idle = []
            for model_id in scheduler.loaded_runs():
                run = self.store.get_training_run(model_id)
                session = self.store.get_session(run.session_id, run.user) if run else None
                if run is None or session is None or session.finished:
                    idle.append(model_id)
                    continue
                seen = [session.last_heartbeat, session.created_at, run.last_request_time]
                if max(_utc(t) for t in seen if t is not None) < cutoff:
                    idle.append(model_id)
            if idle:
                scheduler.release(idle)
                asked += len(idle)
        return asked


def inflight_adapter_id(model_id: str) -> str:
    """The one mutable sampler target that every inflight client of a run samples."""
    return f"{model_id}:inflight"


def _check_fits_memory(item: ForwardBackwardInput, token_budget: int) -> None:
    """A training sequence must fit one micro-batch's activation memory; a longer one would
    exhaust the server's memory for every tenant."""
    if item.forward_only:
        return
    for i, datum in enumerate(item.data):
        if len(datum.tokens) > token_budget:
            raise ApiError(
                400,
                f"data[{i}].model_input has {len(datum.tokens)} tokens; this server trains "
                f"sequences of at most {token_budget} tokens (its activation memory, "
                "TINKERD_TRAIN_MEMORY_GB, bounds that)",
            )


def sampling_params(d: dict[str, Any], default_max_tokens: int = 128) -> SamplingParams:
    stop = d.get("stop")
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list):
        stop = tuple(stop)
    max_tokens = d.get("max_tokens")
    seed = d.get("seed")
    return SamplingParams(
        max_tokens=int(max_tokens) if max_tokens is not None else default_max_tokens,
        temperature=float(d.get("temperature", 1.0)),
        top_k=int(d.get("top_k", -1)),
        top_p=float(d.get("top_p", 1.0)),
        stop=stop,
        seed=int(seed) if seed is not None else None,
    )


def _unsupported_optimizer(name: object) -> str:
    """Dimuon's update rule is not public; running AdamW in its place would be a silent lie."""
    return f"optimizer {name!r} is not supported by tinkerd; use adamw (adam_params)"


def _utc(t: datetime) -> datetime:
    """The store may hand back naive datetimes (SQLite); they are UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _expired(rec: CheckpointRecord) -> bool:
    return rec.expires_at is not None and rec.expires_at <= datetime.now(UTC)


def _json(data: dict[str, Any]) -> tuple[bytes, str]:
    return json.dumps(data).encode(), "json"


def _finished(
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
