"""Training runs: create/load, forward_backward, optim_step, saves and sampler snapshots, in
each run's `seq_id` order; a refused request still moves its run past its seq_id."""

import contextlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from tinkerd.api import codec, stability
from tinkerd.api.checkpoint_service import MAX_TTL_SECONDS, CheckpointService
from tinkerd.api.service_base import (
    as_utc,
    inflight_adapter_id,
    json_result,
    replaying,
)
from tinkerd.api.service_types import ApiError, Future
from tinkerd.checkpoints.paths import TinkerPath
from tinkerd.checkpoints.peft_format import (
    checkpoint_exists,
    read_adapter_info,
)
from tinkerd.engine.ops import (
    CreateAdapter,
    ForwardBackward,
    LoadAdapter,
    OptimStep,
    SaveAdapter,
    SnapshotAdapter,
)
from tinkerd.engine.replicas import Scheduler
from tinkerd.model.lora import LoraConfig
from tinkerd.model.losses import LossInputError
from tinkerd.model.optimizer import AdamParams, OptimStepResult
from tinkerd.model.training import validate_input
from tinkerd.model.types import ForwardBackwardInput
from tinkerd.model.vision import ImageError
from tinkerd.store.records import (
    CheckpointRecord,
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    TrainingRunRecord,
)

KIND_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


class TrainingService(CheckpointService):
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
            return json_result({"model_id": model_id, "type": "create_model"})

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
        info = self.scheduler(run.base_model).front.info
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
            if replaying.get() is None:
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
        info = scheduler.front.info
        # Bad data is refused here, before batching, so it never fails other tenants' rows.
        with self._rejection_skips_seq(run, msg.model_id, msg.seq_id):
            try:
                worker = scheduler.front
                no_images = None if worker.vision else f"model {info.name!r} does not take images"
                req = codec.forward_backward_data(msg, no_images=no_images)
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
                    for new, old in zip(item.data, req.data, strict=True):
                        new.images = old.images
                for i, datum in enumerate(item.data):  # decodes and processes the images
                    worker.check_images(datum.tokens, datum.images, f"data[{i}].model_input")
                validate_input(item, info.vocab_size, info.context_length)
            except (
                codec.CodecError,
                LossInputError,
                stability.ProvenanceError,
                ImageError,
            ) as exc:
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
            return json_result(
                {"metrics": {"grad_norm:max": result.grad_norm}, "type": "optim_step"}
            )

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
            return json_result(out)

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
        self, user: str, body: dict[str, Any], run: TrainingRunRecord, scheduler: Scheduler
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
                return json_result(result)
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
            return json_result(result)

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
            return json_result({"path": str(tpath), "model_id": model_id, "type": "load_weights"})

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
                if max(as_utc(t) for t in seen if t is not None) < cutoff:
                    idle.append(model_id)
            if idle:
                scheduler.release(idle)
                asked += len(idle)
        return asked


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


def _unsupported_optimizer(name: object) -> str:
    """Dimuon's update rule is not public; running AdamW in its place would be a silent lie."""
    return f"optimizer {name!r} is not supported by tinkerd; use adamw (adam_params)"
