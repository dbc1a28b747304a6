"""Checkpoints: resolving `tinker://` paths (own or public), listing-side changes (TTL,
publish, delete), expiry, signed download URLs, and copies."""

import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tinkerd.api.service_base import (
    ServiceBase,
    expired,
)
from tinkerd.api.service_types import ApiError, not_found
from tinkerd.checkpoints import downloads
from tinkerd.checkpoints.paths import TinkerPath
from tinkerd.checkpoints.peft_format import (
    copy_checkpoint,
    delete_checkpoint,
    read_adapter_info,
)
from tinkerd.store.records import (
    CheckpointRecord,
    TrainingRunRecord,
)

# Tinker bounds ttl_seconds at 10 years (the lower bound of 1 hour is not enforced here).
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# How long signed external-weights download URLs stay valid.
DOWNLOAD_URL_SECONDS = 3600

log = logging.getLogger(__name__)


class CheckpointService(ServiceBase):
    def resolve_checkpoint(self, user: str, path: str) -> tuple[TinkerPath, CheckpointRecord]:
        """A tinker:// path the user may read (own or public), with its record."""
        try:
            tpath = TinkerPath.parse(path)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        rec = self.store.get_checkpoint(tpath.run_id, tpath.checkpoint_id)
        if rec is not None and expired(rec):
            self._remove_checkpoint(rec)
            rec = None
        if rec is None or (rec.user != user and not rec.public):
            raise not_found(f"checkpoint {path!r}")
        return tpath, rec

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
        if rec is not None and expired(rec):
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
        # Not the merged model a REST export caches beside the adapter (merge.MERGED_DIR).
        for relpath in downloads.checkpoint_files(directory, skip_dirs=("merged",)):
            grant = downloads.DownloadGrant(run_id, rec.checkpoint_id, relpath, expires)
            urls[relpath] = f"{base_url}/api/v1/downloads/{downloads.sign(secret, grant)}"
        return {"urls": urls, "expires": datetime.fromtimestamp(expires, UTC).isoformat()}

    def export_merged(self, user: str, path: str, base_url: str) -> dict[str, Any]:
        """Signed download URLs (as `external_weights_urls`) for a readable checkpoint's base
        model with the adapter merged, in Hugging Face format. Merged once, on CPU, into
        `<checkpoint>/merged/` (checkpoints never change; it goes when the checkpoint goes)."""
        from tinkerd.checkpoints import merge

        tpath, _ = self.resolve_checkpoint(user, path)
        directory = tpath.storage_dir(self.checkpoint_root)
        target = directory / merge.MERGED_DIR
        if not merge.is_merged_export(target):
            info = read_adapter_info(directory)
            scheduler = self.schedulers.get(info.base_model)
            if scheduler is None:
                raise ApiError(400, f"base model {info.base_model!r} is not served here")
            source = scheduler.front.source
            try:
                merge.export_merged(directory, source, target, checkpoint=str(tpath))
            except FileExistsError:
                pass  # written by a concurrent request meanwhile
            except ValueError as exc:
                raise ApiError(400, f"cannot merge {tpath}: {exc}") from exc
        report = json.loads((target / merge.REPORT_FILE).read_text(encoding="utf-8"))
        expires = int(time.time()) + DOWNLOAD_URL_SECONDS
        secret = self.download_secret()
        urls = {}
        for relpath in downloads.checkpoint_files(target):
            inner = f"{merge.MERGED_DIR}/{relpath}"
            grant = downloads.DownloadGrant(tpath.run_id, tpath.checkpoint_id, inner, expires)
            urls[relpath] = f"{base_url}/api/v1/downloads/{downloads.sign(secret, grant)}"
        return {
            "tinker_path": str(tpath),
            "urls": urls,
            "expires": datetime.fromtimestamp(expires, UTC).isoformat(),
            "untied_lm_head": bool(report.get("untied")),
            "notes": list(report.get("notes") or []),
        }

    def download(self, token: str) -> Path:
        """The file a signed token names: 403 if tampered with or expired, 404 if gone."""
        try:
            grant = downloads.verify(self.download_secret(), token)
        except downloads.TokenError as exc:
            raise ApiError(403, str(exc)) from exc
        rec = self.store.get_checkpoint(grant.run_id, grant.checkpoint_id)
        if rec is None or expired(rec):
            raise not_found("checkpoint")
        tpath = TinkerPath.from_checkpoint_id(grant.run_id, grant.checkpoint_id)
        try:
            return downloads.resolve_file(tpath.storage_dir(self.checkpoint_root), grant.relpath)
        except FileNotFoundError as exc:
            raise not_found(f"file {grant.relpath!r}") from exc

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
