"""The web console: a static page (tinkerd/console/static/, plain HTML + JS + CSS, no build
step) and the few JSON endpoints it needs beyond the REST API (docs/console.md).

The page signs in with an API key kept in the browser's sessionStorage and sends it as
X-API-Key, so every call (these and the REST API's) shows only that user's objects; another
user's run answers exactly as an unknown one (404).
"""

import json
from importlib import resources
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from tinkerd.api import proto
from tinkerd.api.routes import ERROR_RESPONSES, Svc, User
from tinkerd.api.service import ApiError

router = APIRouter(responses=ERROR_RESPONSES)

STATIC = resources.files("tinkerd.console") / "static"
_MEDIA = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
RECENT_ERRORS = 20
MAX_SESSIONS = 50  # the sampler sessions listed are those of the newest sessions


# -- the page --------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    if "/" in name or name.startswith(".") or not any(name.endswith(s) for s in _MEDIA):
        raise ApiError(404, f"console file {name!r} not found")
    path = STATIC / name
    if not path.is_file():
        raise ApiError(404, f"console file {name!r} not found")
    return path.read_bytes()


@router.get("/console", include_in_schema=False)
def console_page() -> HTMLResponse:
    return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/console/static/{name}", include_in_schema=False)
def console_static(name: str) -> Response:
    suffix = name[name.rfind(".") :]
    body = _static(name)
    return Response(body, media_type=_MEDIA[suffix], headers={"Cache-Control": "no-cache"})


# -- JSON ------------------------------------------------------------------------------------


class MetricPoint(BaseModel):
    """One stored result of a run: a forward_backward's metrics or an optim_step's
    grad_norm. `step` is the number of optim_steps completed before it (by seq_id)."""

    step: int
    seq_id: int
    kind: str  # forward_backward | forward | optim_step
    metrics: dict[str, float]


class RunMetrics(BaseModel):
    training_run_id: str
    base_model: str
    steps: int  # optim_steps completed
    points: list[MetricPoint]


class QueueState(BaseModel):
    model: str
    queue_depth: int


class FailedFuture(BaseModel):
    request_id: str
    kind: str
    model_id: str | None
    seq_id: int | None
    error: str | None
    category: str | None
    time: str | None


class SamplerInfo(BaseModel):
    sampling_session_id: str
    session_id: str
    base_model: str
    model_path: str | None
    snapshot_of: str | None
    time: str | None


class ConsoleStatus(BaseModel):
    user: str
    models: list[QueueState]
    recent_errors: list[FailedFuture]


class SamplerList(BaseModel):
    samplers: list[SamplerInfo]


def _metrics_of(kind: str, result: bytes | None, result_type: str | None) -> dict[str, float]:
    """The metrics of a stored forward_backward (protobuf, or JSON for custom losses) or
    optim_step (JSON `{"metrics": {"grad_norm:max": ...}}`) result; {} if unreadable."""
    if not result:
        return {}
    try:
        if result_type == "proto":
            msg = proto.ForwardBackwardOutput()
            msg.ParseFromString(result)
            metrics: dict[str, Any] = dict(msg.metrics)
        else:
            metrics = json.loads(result).get("metrics") or {}
    except Exception:  # a result this version cannot read: no points rather than a 500
        return {}
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    if kind == "optim_step" and "grad_norm:max" in out:
        out["grad_norm"] = out.pop("grad_norm:max")
    return out


@router.get("/api/v1/console/training_runs/{run_id}/metrics")
def run_metrics(run_id: str, user: User, svc: Svc) -> RunMetrics:
    """Loss and metric curves of a run, from its stored forward_backward / optim_step results."""
    run = svc.run(run_id, user)  # 404 for another user's run, as for none
    rows = svc.store.completed_results(run.model_id, ("forward_backward", "forward", "optim_step"))
    points, steps = [], 0
    for r in rows:
        metrics = _metrics_of(r.kind, r.result, r.result_type)
        points.append(MetricPoint(step=steps, seq_id=r.seq_id or 0, kind=r.kind, metrics=metrics))
        if r.kind == "optim_step":
            steps += 1
    return RunMetrics(
        training_run_id=run.model_id, base_model=run.base_model, steps=steps, points=points
    )


@router.get("/api/v1/console/status")
def status(user: User, svc: Svc) -> ConsoleStatus:
    """Live state: queue depth per served model, and the caller's last failed requests."""
    models = [
        QueueState(model=name, queue_depth=scheduler.queued())
        for name, scheduler in svc.schedulers.items()
    ]
    rows = svc.store.recent_failures(user, RECENT_ERRORS)
    errors = [
        FailedFuture(
            request_id=r.request_id,
            kind=r.kind,
            model_id=r.model_id,
            seq_id=r.seq_id,
            error=r.error,
            category=r.category,
            time=r.completed_at.isoformat() if r.completed_at else None,
        )
        for r in rows
    ]
    return ConsoleStatus(user=user, models=models, recent_errors=errors)


@router.get("/api/v1/console/samplers")
def samplers(user: User, svc: Svc) -> SamplerList:
    """The caller's sampling sessions (those of their newest sessions), newest first."""
    found: list[SamplerInfo] = []
    for session in svc.store.list_sessions(user, MAX_SESSIONS, 0):
        _, sampler_ids = svc.store.session_children(session.session_id)
        for sampler_id in reversed(sampler_ids):
            rec = svc.store.get_sampling_session(sampler_id, user)
            if rec is None:
                continue
            found.append(
                SamplerInfo(
                    sampling_session_id=rec.sampling_session_id,
                    session_id=rec.session_id,
                    base_model=rec.base_model,
                    model_path=rec.model_path,
                    snapshot_of=rec.snapshot_of,
                    time=rec.created_at.isoformat() if rec.created_at else None,
                )
            )
    return SamplerList(samplers=found)
