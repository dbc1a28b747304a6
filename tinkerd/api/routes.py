"""The HTTP endpoints of the Tinker protocol (`tinker-protocol.md` §3).

Handlers are thin: authenticate, parse, call the Service, shape the JSON. Plain `def`
handlers run in FastAPI's threadpool (they do blocking database work); `retrieve_future` and
`retrieve_futures` are `async` because they long-poll.
"""

import asyncio
import contextlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel

from tinkerd.api import auth, schemas, traces
from tinkerd.api.futures import completion_queue_key
from tinkerd.api.service import ApiError, Service, not_found
from tinkerd.checkpoints import downloads
from tinkerd.checkpoints.peft_format import read_adapter_info
from tinkerd.store.records import CheckpointRecord, FutureRecord, TrainingRunRecord

# Every caller error is one of these, with a JSON body `{"detail": ...}` (422s: FastAPI's list
# of {loc, msg, type}); documented so the OpenAPI schema (and schemathesis) know them.
_ERROR = {"model": schemas.ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Malformed or invalid request"},
    401: {**_ERROR, "description": "Missing or unknown API key"},
    403: {**_ERROR, "description": "Not allowed"},
    404: {**_ERROR, "description": "Unknown id, path or model, or not available here"},
    413: {**_ERROR, "description": "Request body over the server's size limit"},
}

router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)

# Training requests addressed by (model_id, seq_id) in a JSON body (see skip_rejected_seq).
_SEQUENCED_ENDPOINTS = frozenset(
    {"optim_step", "save_weights", "save_weights_for_sampler", "save_weights_external"}
    | {"load_weights"}
)


def plain(request_body: BaseModel) -> dict[str, Any]:
    """A validated request as a plain dict for the service (fields the caller left out stay
    out, so defaults live in one place)."""
    return request_body.model_dump(exclude_none=True)


def service(request: Request) -> Service:
    return request.app.state.service


def current_user(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> str:
    """The caller's user id; the rule (zero-setup or registered keys) is in auth.py."""
    try:
        return auth.authenticator(request.app.state).user(x_api_key)
    except auth.AuthError as exc:
        raise ApiError(401, str(exc)) from exc


async def skip_rejected_seq(request: Request, body: Any) -> None:
    """A training request that failed schema validation (422) never reaches the service, yet
    the SDK has used up its seq_id and will not resend it: let the run's sequence move past
    it (as the service does for its own 4xx), or every later request of the run would wait
    for it forever. Only for the caller's own run, and only when the body names both ids."""
    if request.url.path.rsplit("/", 1)[-1] not in _SEQUENCED_ENDPOINTS:
        return
    if not isinstance(body, dict):
        return
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if not isinstance(model_id, str) or type(seq_id) is not int or not 1 <= seq_id < 2**63:
        return
    svc: Service = request.app.state.service

    def skip() -> None:
        try:
            user = current_user(request=request, x_api_key=request.headers.get("x-api-key"))
        except ApiError:
            return
        svc.skip_refused(user, model_id, seq_id, "the request failed validation")

    await run_in_threadpool(skip)


def validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's 422 errors as `{loc, msg, type}`: the field and the problem. The offending
    input is not echoed back (it may be huge, or hold NaN, which JSON cannot carry)."""
    return [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]


User = Annotated[str, Depends(current_user)]
# Page bounds of the list endpoints (the `tinker` CLI pages by up to 1000).
Limit = Annotated[int, Query(ge=0, le=10_000)]
Offset = Annotated[int, Query(ge=0, le=2**62)]
Svc = Annotated[Service, Depends(service)]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/client/config")
def client_config(request: Request) -> dict[str, Any]:
    state = request.app.state
    config: dict[str, Any] = {
        "pjwt_auth_enabled": False,
        "sample_use_retrieve_futures": state.sample_use_retrieve_futures,
        "sample_join_sampling_session": state.sample_join_sampling_session,
        "custom_loss_server_side": state.custom_loss_server_side,
    }
    chunk = state.fwdbwd_max_chunk_len
    if chunk:
        config["fwdbwd_max_chunk_len"] = chunk
    return config


@router.post("/client/dynamic_config")
def dynamic_config(request: Request) -> dict[str, Any]:
    return {"sample_cancel_enabled": request.app.state.sample_cancel_enabled}


@router.post("/create_session")
def create_session(
    request_body: schemas.CreateSessionRequest, user: User, svc: Svc
) -> dict[str, str]:
    body = plain(request_body)
    return {"session_id": svc.create_session(user, body), "type": "create_session"}


@router.post("/session_heartbeat")
def session_heartbeat(
    request_body: schemas.SessionHeartbeatRequest, user: User, svc: Svc
) -> dict[str, str]:
    body = plain(request_body)
    svc.session(body["session_id"], user)
    svc.store.heartbeat(body["session_id"])
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, user: User, svc: Svc) -> dict[str, str]:
    svc.session(session_id, user)
    svc.store.finish_session(session_id)
    return {"status": "ok"}


@router.post("/telemetry")
def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
def capabilities(svc: Svc) -> dict[str, Any]:
    """The SDK's four fields per model, plus `modalities` (ignored by the SDK): `["text",
    "image"]` for a model that takes image chunks (Qwen-VL), else `["text"]`."""
    return {
        "supported_models": [
            {
                "model_name": s.front.info.name,
                "max_context_length": s.front.info.context_length,
                "trainable": True,
                "sampleable": True,
                "modalities": ["text", "image"] if s.front.vision else ["text"],
            }
            for s in svc.schedulers.values()
        ]
    }


@router.post("/create_model")
def create_model(request_body: schemas.CreateModelRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    return svc.create_model(user, body).json()


@router.post("/get_info")
def get_info(request_body: schemas.GetInfoRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    return svc.get_info(user, body["model_id"])


@router.post("/forward_backward")
async def forward_backward(request: Request, user: User, svc: Svc) -> dict[str, Any]:
    body = await request.body()
    encoding = request.headers.get("content-encoding")
    future = await run_in_threadpool(svc.forward_backward, user, body, encoding)
    return future.json()


@router.post("/optim_step")
def optim_step(request_body: schemas.OptimStepRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    return svc.optim_step(user, body).json()


@router.post("/save_weights")
def save_weights(request_body: schemas.SaveWeightsRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    return svc.save_weights(user, body, for_sampler=False).json()


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    request_body: schemas.SaveWeightsForSamplerRequest, user: User, svc: Svc
) -> dict[str, Any]:
    body = plain(request_body)
    return svc.save_weights(user, body, for_sampler=True).json()


@router.post("/save_weights_external")
def save_weights_external(
    request_body: schemas.SaveWeightsExternalRequest, user: User, svc: Svc
) -> dict[str, Any]:
    body = plain(request_body)
    return svc.save_weights_external(user, body).json()


@router.post("/load_weights")
def load_weights(request_body: schemas.LoadWeightsRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    return svc.load_weights(user, body).json()


@router.post("/create_sampling_session")
def create_sampling_session(
    request_body: schemas.CreateSamplingSessionRequest, user: User, svc: Svc
) -> dict[str, str]:
    body = plain(request_body)
    return {
        "sampling_session_id": svc.create_sampling_session(user, body),
        "type": "create_sampling_session",
    }


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, user: User, svc: Svc) -> dict[str, Any]:
    rec = svc.sampler(user, sampler_id)
    return {"sampler_id": sampler_id, "base_model": rec.base_model, "model_path": rec.model_path}


@router.post("/asample")
def asample(request_body: schemas.SampleRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    return svc.sample(user, body).json()


@router.post("/retrieve_future")
async def retrieve_future(
    request_body: schemas.RetrieveFutureRequest, user: User, svc: Svc, request: Request
) -> Response:
    """Long-poll: answer as soon as the future finishes, or `try_again` after the poll time."""
    body = plain(request_body)
    request_id = str(body["request_id"])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.app.state.long_poll_seconds
    while True:
        waiter = svc.hub.waiter(request_id)
        try:
            rec = await run_in_threadpool(svc.get_future, request_id, user)
            if rec.status != "pending":
                return render_future(rec)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return JSONResponse(
                    {"type": "try_again", "request_id": request_id, "queue_state": "active"}
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), remaining)
            if waiter.record is not None:
                return render_future(waiter.record)
        finally:
            svc.hub.forget(request_id, waiter)


# Most completions one /retrieve_futures answer carries (the poller comes back for the rest).
MAX_COMPLETIONS = 1000


@router.post("/retrieve_futures")
async def retrieve_futures(
    request_body: schemas.FuturesRetrieveRequest, user: User, svc: Svc, request: Request
) -> dict[str, Any]:
    """Long-poll one sampling client's part of its session's completion queue: the samples
    that finished or failed after `prev_cursor`, as soon as there are any, else none after
    the poll time (at once for `timeout` 0). The cursor is a place in the queue, stored with
    each future, so it stays valid across restarts. `retrieved_request_ids` is accepted and
    ignored: results stay stored (the database is the request log)."""
    target = request_body.target
    sampler_id, client_id = target.sampling_session_id, target.cloned_sampler_id
    cursor = await run_in_threadpool(
        svc.completion_queue_start, user, sampler_id, client_id, request_body.prev_cursor
    )
    loop = asyncio.get_running_loop()
    wait = request.app.state.long_poll_seconds
    if request_body.timeout is not None:
        wait = min(wait, request_body.timeout)
    deadline = loop.time() + wait
    key = completion_queue_key(sampler_id)
    while True:
        waiter = svc.hub.waiter(key)
        try:
            found = await run_in_threadpool(
                svc.store.completions, sampler_id, client_id, cursor, MAX_COMPLETIONS
            )
            remaining = deadline - loop.time()
            if found or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), remaining)
        finally:
            svc.hub.forget(key, waiter)
    completions = [
        schemas.FutureCompletion(
            state="finished" if c.status == "complete" else "failed",
            request_id=c.request_id,
            response_payload_uncompressed_size=c.payload_size,
        )
        for c in found
    ]
    response = schemas.FuturesRetrieveResponse(
        completions=completions, cursor=found[-1].cursor if found else cursor
    )
    return response.model_dump(mode="json", exclude_none=True)


@router.post("/cancel_future")
def cancel_future(
    request_body: schemas.CancelFutureRequest, user: User, svc: Svc
) -> dict[str, bool]:
    """Cancel a sample that has not started (its future fails); otherwise do nothing."""
    return {"cancelled": svc.cancel_future(user, request_body.request_id)}


@router.post("/join_sampling_session")
def join_sampling_session(
    request_body: schemas.JoinSamplingSessionRequest, user: User, svc: Svc
) -> dict[str, Any]:
    """A clone id, unique within the sampling session, for an unpickled sampling client."""
    client_id = svc.join_sampling_session(user, request_body.sampling_session_id)
    return schemas.JoinSamplingSessionResponse(client_counter=client_id).model_dump(mode="json")


def render_future(rec: FutureRecord) -> Response:
    if rec.status == "failed":
        return JSONResponse({"error": rec.error, "category": rec.category or "unknown"})
    media = "application/x-protobuf" if rec.result_type == "proto" else "application/json"
    return Response(rec.result or b"", media_type=media)


# -- REST management (RestClient, the `tinker` CLI) ------------------------------------


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def checkpoint_json(rec: CheckpointRecord) -> dict[str, Any]:
    return {
        "checkpoint_id": rec.checkpoint_id,
        "checkpoint_type": rec.checkpoint_type,
        "time": _iso(rec.created_at),
        "tinker_path": rec.tinker_path,
        "size_bytes": rec.size_bytes,
        "public": rec.public,
        "user_metadata": rec.user_metadata or None,
        "expires_at": _iso(rec.expires_at),
    }


def str_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """Metadata as the SDK reads it back (`dict[str, str]`), though it may be sent with any
    JSON values: strings as they are, anything else as JSON."""
    if not metadata:
        return None
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def training_run_json(svc: Service, run: TrainingRunRecord) -> dict[str, Any]:
    checkpoints, _ = svc.store.list_checkpoints(run.user, run.model_id)
    latest: dict[str, dict[str, Any]] = {}
    for c in sorted(checkpoints, key=lambda c: c.created_at or datetime.min):
        latest[c.checkpoint_type] = checkpoint_json(c)
    return {
        "training_run_id": run.model_id,
        "base_model": run.base_model,
        "model_owner": run.user,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "last_request_time": _iso(run.last_request_time or run.created_at),
        "last_checkpoint": latest.get("training"),
        "last_sampler_checkpoint": latest.get("sampler"),
        "user_metadata": str_metadata(run.user_metadata),
    }


@router.get("/training_runs")
def list_training_runs(
    user: User, svc: Svc, limit: Limit = 20, offset: Offset = 0
) -> dict[str, Any]:
    svc.sweep_expired()
    runs, total = svc.store.list_training_runs(user, limit, offset)
    return {
        "training_runs": [training_run_json(svc, r) for r in runs],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, user: User, svc: Svc) -> dict[str, Any]:
    svc.sweep_expired()
    return training_run_json(svc, svc.run(run_id, user))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, user: User, svc: Svc) -> dict[str, Any]:
    svc.run(run_id, user)
    svc.sweep_expired()
    checkpoints, _ = svc.store.list_checkpoints(user, run_id)
    return {"checkpoints": [checkpoint_json(c) for c in checkpoints]}


@router.get("/checkpoints")
def list_checkpoints(
    user: User, svc: Svc, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    svc.sweep_expired()
    checkpoints, total = svc.store.list_checkpoints(user, None, limit, offset)
    return {
        "checkpoints": [checkpoint_json(c) for c in checkpoints],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


# These suffixed routes must come before the catch-all DELETE of a checkpoint id (which
# contains a slash and would otherwise swallow ".../publish").


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def publish_checkpoint(run_id: str, checkpoint_id: str, user: User, svc: Svc) -> dict[str, Any]:
    svc.set_checkpoint_public(user, run_id, checkpoint_id, True)
    return {}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def unpublish_checkpoint(run_id: str, checkpoint_id: str, user: User, svc: Svc) -> dict[str, Any]:
    if "/" not in checkpoint_id:  # DELETE of a checkpoint named "publish", e.g. weights/publish
        return delete_checkpoint(run_id, f"{checkpoint_id}/publish", user, svc)
    svc.set_checkpoint_public(user, run_id, checkpoint_id, False)
    return {}


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
def set_checkpoint_ttl(
    run_id: str,
    checkpoint_id: str,
    request_body: schemas.TtlUpdateRequest,
    user: User,
    svc: Svc,
) -> dict[str, Any]:
    svc.set_checkpoint_ttl(user, run_id, checkpoint_id, request_body.ttl_seconds)
    return {}


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(
    run_id: str, checkpoint_id: str, user: User, svc: Svc, request: Request
) -> dict[str, Any]:
    base_url = str(request.base_url).rstrip("/")
    return svc.external_weights_urls(user, run_id, checkpoint_id, base_url)


@router.post("/export_merged")
def export_merged(
    request_body: schemas.ExportMergedRequest, user: User, svc: Svc, request: Request
) -> dict[str, Any]:
    """The checkpoint's base model with the adapter merged (Hugging Face safetensors), as
    signed download URLs per file; own or public checkpoints (merged synchronously, once)."""
    base_url = str(request.base_url).rstrip("/")
    return svc.export_merged(user, request_body.path, base_url)


@router.get("/downloads/{token}")
def download(token: str, svc: Svc) -> FileResponse:
    """A file of a checkpoint, authorised by the signed token alone (no API key)."""
    if not token.isascii():  # tokens are base64url + hex; hmac cannot compare other text
        raise ApiError(403, "invalid download token")
    path = svc.download(token)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(run_id: str, checkpoint_id: str, user: User, svc: Svc) -> dict[str, Any]:
    try:
        svc.delete_checkpoint(user, run_id, checkpoint_id)
    except ValueError as exc:
        raise not_found(f"checkpoint {checkpoint_id!r}") from exc
    return {}


@router.post("/weights_info")
def weights_info(request_body: schemas.WeightsInfoRequest, user: User, svc: Svc) -> dict[str, Any]:
    body = plain(request_body)
    tpath, _ = svc.resolve_checkpoint(user, body["tinker_path"])
    info = read_adapter_info(tpath.storage_dir(svc.checkpoint_root))
    return {
        "base_model": info.base_model,
        "is_lora": True,
        "lora_rank": info.rank,
        "train_unembed": info.train_unembed,
        "train_mlp": info.train_mlp,
        "train_attn": info.train_attn,
    }


@router.post("/copy_weights")
def copy_weights(
    request_body: schemas.CopyWeightsRequest,
    user: User,
    svc: Svc,
    x_idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, str]:
    return svc.copy_weights(user, plain(request_body), x_idempotency_key)


# -- sessions ---------------------------------------------------------------------------


@router.get("/sessions")
def list_sessions(user: User, svc: Svc, limit: Limit = 20, offset: Offset = 0) -> dict[str, Any]:
    sessions = svc.store.list_sessions(user, limit, offset)
    return {"sessions": [s.session_id for s in sessions]}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, user: User, svc: Svc) -> dict[str, Any]:
    rec = svc.session(session_id, user)
    runs, samplers = svc.store.session_children(session_id)
    return {
        "training_run_ids": runs,
        "sampler_ids": samplers,
        "user_metadata": {k: str(v) for k, v in rec.user_metadata.items()} or None,
        "display_name": rec.display_name,
    }


# -- hosted-service features a self-hosted server does not have --------------------------
# A 404 with a clear body: the SDK does not retry it (5xx, 408, 409 and 429 it would).

_NOT_AVAILABLE = "not available in self-hosted tinkerd"


def _not_available(what: str) -> JSONResponse:
    return JSONResponse({"detail": f"{what} is {_NOT_AVAILABLE}"}, status_code=404)


@router.get("/audit")
def audit_log(user: User) -> JSONResponse:
    return _not_available("the audit log")


@router.get("/billing/{rest:path}")
def billing(rest: str, user: User) -> JSONResponse:
    return _not_available("billing")


@router.post("/billing/{rest:path}")
def billing_post(rest: str, user: User) -> JSONResponse:
    return _not_available("billing")


@router.put("/sessions/{session_id}/project")
def assign_session_project(session_id: str, user: User) -> JSONResponse:
    return _not_available("projects")


@router.post("/sessions/search")
def search_sessions(user: User) -> JSONResponse:
    return _not_available("session search")


@router.get("/sessions/{session_id}/trace_export", response_model=None)
def export_session_trace(
    session_id: str,
    svc: Svc,
    request: Request,
    token: Annotated[str | None, Query()] = None,
) -> dict[str, Any] | Response:
    """With an API key: `{"status": "ready", "url"}`, a signed URL (one hour) serving the
    session's trace. With `?token=` (that URL; no API key): the Chrome trace-event JSON
    (api/traces.py), built now."""
    if token is None:
        user = current_user(request, request.headers.get("x-api-key"))
        svc.session(session_id, user)  # 404 for another user's session, as for none
        base_url = str(request.base_url).rstrip("/")
        url = traces.sign_url(svc.download_secret(), base_url, session_id, user)
        return {"status": "ready", "url": url}
    try:
        user = traces.verify_token(svc.download_secret(), session_id, token)
    except downloads.TokenError as exc:
        raise ApiError(403, str(exc)) from exc
    trace = traces.build_trace(svc.store, svc.session(session_id, user))
    headers = {"Content-Disposition": f'attachment; filename="{session_id}.json"'}
    return Response(json.dumps(trace).encode(), media_type="application/json", headers=headers)


# -- server-side custom losses (behind the client-config flag `custom_loss_server_side`) -------


@router.post("/create_custom_loss")
def create_custom_loss(
    request_body: schemas.CreateCustomLossRequest, user: User, svc: Svc
) -> dict[str, Any]:
    """Check and store a traced loss (tinkerd/model/custom_loss.py); the future's result is
    `{"loss_id"}` for `forward_backward(data, "custom", {"loss_id": ...})` in this session.
    404 when TINKERD_CUSTOM_LOSS_SERVER_SIDE is off."""
    return svc.custom_losses.create(user, request_body.model_dump(mode="json")).json()
