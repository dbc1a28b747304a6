"""The FastAPI application: wiring of store, engine and routes, and the error contract.

Errors follow the SDK's retry rules (`tinker-protocol.md` §1.5): caller errors are 4xx with a
JSON body `{"detail": ...}` saying what is wrong (never a bare 400, which the SDK retries as
a proxy glitch); unexpected failures are 500, which the SDK retries.
"""

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd import logs
from tinkerd.api import anthropic_compat, console, openai_compat, replicas
from tinkerd.api.auth import authenticator, bearer_key
from tinkerd.api.body_limit import BodySizeLimit
from tinkerd.api.custom_losses import CustomLosses
from tinkerd.api.futures import FutureHub
from tinkerd.api.metrics import (
    EngineMetrics,
    Metrics,
    MetricsMiddleware,
    ServiceMetrics,
    metrics_endpoint,
)
from tinkerd.api.recovery import replay_moved_run, start_recovery
from tinkerd.api.routes import router, skip_rejected_seq, validation_detail
from tinkerd.api.service import ApiError, Service
from tinkerd.api.traces import TraceRecorder
from tinkerd.checkpoints.atomic import cleanup_leftovers
from tinkerd.config import ModelSpec, ReplicaCount, Settings
from tinkerd.engine.replicas import ReplicaRouter, Scheduler
from tinkerd.engine.run_state import RunStates
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.engine.telemetry import Fanout
from tinkerd.engine.threads import single_threaded
from tinkerd.engine.worker_handle import WorkerHandle
from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.worker import ModelWorker
from tinkerd.store.store import Store

if TYPE_CHECKING:
    from tinkerd.engine.ray_worker import RayCluster

log = logging.getLogger("tinkerd")
request_log = logging.getLogger("tinkerd.requests")


class RequestLog:
    """One INFO line per HTTP request, once its answer is fully sent: request id, user,
    method, route, status, latency. The route is the template (`/api/v1/training_runs/{run_id}`),
    never the raw path (download URLs carry signed tokens), and nothing of the body or the
    headers is logged; the user is the id the API key maps to, never the key. Every line
    logged while the request is handled carries its `request_id` and `user` (tinkerd/logs.py).
    The id is sent back as `X-Request-ID`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with logs.context(request_id=request_id, user=await _user(scope)) as ctx:
            try:
                await self.app(scope, receive, sending)
            finally:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                method = scope.get("method", "")
                latency_ms = round((time.perf_counter() - start) * 1000, 1)
                version = scope.get("http_version", "1.1")
                client = scope.get("client")
                request_log.info(
                    'request %s user=%s "%s %s HTTP/%s" %d %.1f ms',
                    request_id,
                    ctx.get("user", "-"),
                    method,
                    route,
                    version,
                    status,
                    latency_ms,
                    extra=logs.fields(
                        method=method,
                        route=route,
                        status=status,
                        latency_ms=latency_ms,
                        client=client[0] if client else None,
                    ),
                )


async def _user(scope: Scope) -> str | None:
    """The user the request's API key maps to (as the routes authenticate it), or None: no
    key, a refused key, or a server still starting."""
    headers = dict(scope.get("headers") or [])
    raw = headers.get(b"x-api-key") or b""
    key = raw.decode("latin-1") or bearer_key(headers.get(b"authorization", b"").decode("latin-1"))
    app = scope.get("app")
    if not key or app is None or not hasattr(app.state, "service"):
        return None
    try:
        # The key table is cached for a second; a reload reads the database, off the loop.
        return await asyncio.to_thread(authenticator(app.state).user, key)
    except Exception:
        return None


def load_served_model(settings: Settings, spec: ModelSpec) -> BaseModel:
    """One `--model` entry loaded as the settings say: its served name, dtype, device, and
    remote code only if the operator allowed it for that name."""
    return load_base_model(
        spec.source,
        data_dir=settings.data_dir,
        dtype=settings.dtype,
        device=settings.device,
        served_name=spec.name,
        trust_remote_code=spec.name in settings.trust_remote_code,
    )


def build_schedulers(settings: Settings, threads: int | None = None) -> dict[str, Scheduler]:
    """Load each served model once and give it a worker and a scheduler thread (or, with
    `--replicas`, several workers on Ray behind a router: `build_router`). `threads`: intra-op
    threads each in-process scheduler thread takes (engine/threads.py)."""
    autocast = torch.bfloat16 if settings.dtype == "bfloat16" else None
    run_states = RunStates(settings.data_dir / "runs")
    cleanup_leftovers(run_states.root)
    counts = settings.replica_counts()
    schedulers: dict[str, Scheduler] = {}
    for spec in settings.model_specs():
        if spec.name in counts:
            schedulers[spec.name] = build_router(settings, spec, counts[spec.name], run_states)
            continue
        base = load_served_model(settings, spec)
        worker = ModelWorker(
            base,
            autocast_dtype=autocast,
            prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20),
            own_decoder=settings.decoder == "tinkerd",
            decode_kernels=settings.decode_kernels,
            prefill_chunk=settings.prefill_chunk_tokens,
        )
        budget = train_token_budget(worker, settings)
        schedulers[base.info.name] = ModelScheduler(
            worker,
            token_budget=budget,
            sample_slice_seconds=settings.sample_slice_ms / 1000,
            run_states=run_states,
            state_every=settings.state_every,
            snapshot_memory_bytes=int(settings.sampler_memory_gb * 2**30),
            threads=threads,
        )
    return schedulers


def build_router(
    settings: Settings, spec: ModelSpec, count: ReplicaCount, run_states: RunStates
) -> Scheduler:
    """`count.replicas` workers of one model on Ray (actors, or gangs of `count.devices`),
    each driven by its own scheduler thread, behind one router. Run states and checkpoints
    are paths under the data dir: every replica's machine must reach them (shared storage)."""
    from tinkerd.engine.ray_worker import RayWorker, ReplicaSpec

    cuda = settings.device.startswith("cuda")
    replica = ReplicaSpec(
        name=spec.name,
        source=spec.source,
        data_dir=settings.data_dir,
        dtype=settings.dtype,
        device="cuda" if cuda else settings.device,
        trust_remote_code=spec.name in settings.trust_remote_code,
        threads=settings.threads,
        prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20),
        own_decoder=settings.decoder == "tinkerd",
        decode_kernels=settings.decode_kernels,
        prefill_chunk=settings.prefill_chunk_tokens,
    )
    num_gpus = 1.0 if cuda else 0.0
    handles: list[WorkerHandle] = []
    for _ in range(count.replicas):
        if count.devices > 1:
            from tinkerd.engine.gang import GangWorker

            handles.append(
                GangWorker.create(
                    replica, ranks=count.devices, num_cpus=settings.replica_cpus, num_gpus=num_gpus
                )
            )
        else:
            handles.append(
                RayWorker.create(replica, num_cpus=settings.replica_cpus, num_gpus=num_gpus)
            )
    first: Any = handles[0]
    gpu_memory = getattr(first, "activation_memory_gb", lambda: None)()
    per_token = first.activation_bytes_per_token()
    budget = _token_budget(settings, per_token, None, spec.name, gpu_memory)
    schedulers = [
        ModelScheduler(
            handle,
            token_budget=budget,
            sample_slice_seconds=settings.sample_slice_ms / 1000,
            run_states=run_states,
            state_every=settings.state_every,
            snapshot_memory_bytes=int(settings.sampler_memory_gb * 2**30),
        )
        for handle in handles
    ]
    log.info("%s: %d replicas on Ray (%s each)", spec.name, count.replicas, first.devices)
    return ReplicaRouter(schedulers, max_runs=settings.replica_max_runs)


def attach_vllm(settings: Settings, schedulers: dict[str, Scheduler]) -> None:
    """A vLLM sampler pool (its own venv's runner process) beside each in-process model's
    scheduler (docs/vllm.md); models on Ray replicas keep tinkerd's own sampler."""
    from tinkerd.engine.vllm_sampler import IDENTITY, VllmConfig, VllmSamplerPool
    from tinkerd.model.lora import LoraConfig

    assert settings.vllm_python is not None
    for name, scheduler in schedulers.items():
        if not isinstance(scheduler, ModelScheduler):
            log.warning("%s: runs on replicas; the vLLM sampler pool is not used for it", name)
            continue
        config = VllmConfig(
            python=settings.vllm_python,
            model_dir=Path(scheduler.front.source),
            dtype=settings.dtype,
        )
        work_dir = settings.data_dir / "vllm" / name.replace("/", "--")
        # A zero adapter for base-model requests (see VllmSampler): B is zero at creation.
        identity = work_dir / IDENTITY
        scheduler.handle.add_adapter(IDENTITY, LoraConfig(rank=1, seed=0))
        try:
            scheduler.handle.save_adapter(
                IDENTITY, identity, name, with_optimizer=False, overwrite=True
            )
        finally:
            scheduler.handle.remove_adapter(IDENTITY)
        log.info("%s: starting the vLLM sampler pool (%s)", name, settings.vllm_python)
        pool = VllmSamplerPool.start(config, scheduler.front.info, work_dir, identity_dir=identity)
        scheduler.attach_vllm(pool)


def start_ray(settings: Settings) -> "RayCluster | None":
    """The Ray cluster `--replicas` run on (None without replicas)."""
    counts = settings.replica_counts()
    if not counts:
        return None
    from tinkerd.engine.ray_worker import RayCluster

    cpus = sum(c.replicas * c.devices * settings.replica_cpus for c in counts.values())
    return RayCluster(settings.ray_address, num_cpus=cpus)


def train_token_budget(worker: ModelWorker, settings: Settings) -> int:
    """Padded tokens per forward_backward micro-batch: what fits the activation memory."""
    cuda = worker.base.device if worker.base.device.type == "cuda" else None
    return _token_budget(settings, worker.activation_bytes_per_token(), cuda, worker.info.name)


def _token_budget(
    settings: Settings,
    per_token: int,
    cuda: torch.device | None,
    name: str,
    gpu_memory_gb: float | None = None,
) -> int:
    """`per_token`: activation bytes per training token, measured on the worker; `cuda`: the
    worker's device if it is a GPU this process can ask for its free memory; `gpu_memory_gb`:
    what a remote GPU worker reported instead."""
    memory = settings.train_memory_gb
    if memory is None:
        if gpu_memory_gb is not None:
            memory = gpu_memory_gb
        elif cuda is not None:
            memory = torch.cuda.mem_get_info(cuda)[0] / 2 / 2**30
        else:
            memory = min(8.0, max(1.0, psutil.virtual_memory().total / 4 / 2**30))
    budget = max(1, min(settings.token_budget, int(memory * 2**30) // per_token))
    log.info(
        "%s: %.2f MB of activations per training token; micro-batches of up to %d tokens "
        "(%.1f GiB)",
        name,
        per_token / 2**20,
        budget,
        memory,
    )
    return budget


async def every(seconds: float, what: str, job: Callable[[], int]) -> None:
    """Run `job` off the event loop every `seconds` (checkpoint expiry, idle runs), so it
    happens even when no request would trigger it; log what it did."""
    while True:
        await asyncio.sleep(seconds)
        try:
            count = await asyncio.to_thread(job)
        except Exception:
            log.exception("%s failed", what)
            continue
        if count:
            log.info("%s: %d", what, count)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Torch runs single-threaded here and in request handlers; each in-process
        # scheduler thread takes `threads` (engine/threads.py: one OpenMP pool).
        threads = settings.threads or torch.get_num_threads()
        single_threaded()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_root = settings.data_dir / "checkpoints"
        checkpoint_root.mkdir(exist_ok=True)
        cleanup_leftovers(checkpoint_root)
        store = Store(settings.resolved_database_url())
        ray_cluster = start_ray(settings)
        try:
            schedulers = build_schedulers(settings, threads)
        except BaseException:
            if ray_cluster is not None:
                ray_cluster.shutdown()
            raise
        hub = FutureHub()
        hub.bind(asyncio.get_running_loop())
        service = Service(
            store,
            schedulers,
            checkpoint_root,
            hub,
            stability_max_bytes=int(settings.stability_records_max_mb * 2**20),
            custom_losses=CustomLosses(store, enabled=settings.custom_loss_server_side),
        )
        # Metrics and session-trace timings, before recovery queues anything.
        traces = TraceRecorder()
        service.hooks = ServiceMetrics(metrics, traces)
        engine_observer = Fanout(EngineMetrics(metrics), traces)
        for scheduler in schedulers.values():
            scheduler.telemetry = engine_observer
        if settings.vllm_python is not None:
            attach_vllm(settings, schedulers)
        metrics.watch(schedulers)
        for scheduler in schedulers.values():
            if isinstance(scheduler, ReplicaRouter):  # a lost replica's runs replay like this
                scheduler.replay = functools.partial(replay_moved_run, service)
        start_recovery(service)
        for scheduler in schedulers.values():
            scheduler.start()
        app.state.service = service
        app.state.long_poll_seconds = settings.long_poll_seconds
        app.state.fwdbwd_max_chunk_len = settings.fwdbwd_max_chunk_len
        app.state.sample_use_retrieve_futures = settings.sample_use_retrieve_futures
        app.state.sample_join_sampling_session = settings.sample_join_sampling_session
        app.state.sample_cancel_enabled = settings.sample_cancel_enabled
        app.state.custom_loss_server_side = settings.custom_loss_server_side
        idle = settings.idle_release_seconds
        sweepers = [
            asyncio.create_task(every(60.0, "expired checkpoints deleted", service.sweep_expired)),
            asyncio.create_task(
                every(60.0, "sequence records deleted", service.sweep_stability_records)
            ),
            asyncio.create_task(
                every(
                    min(60.0, idle / 2),
                    "idle runs asked to leave memory",
                    lambda: service.release_idle_runs(idle),
                )
            ),
        ]
        log.info("tinkerd ready: serving %s", ", ".join(schedulers))
        yield
        for sweeper in sweepers:
            sweeper.cancel()
        for scheduler in schedulers.values():
            scheduler.stop()
        if ray_cluster is not None:
            ray_cluster.shutdown()
        store.close()

    app = FastAPI(title="tinkerd", version="0.1.0", lifespan=lifespan)
    metrics = Metrics()  # this app's own registry
    app.state.metrics = metrics
    app.state.metrics_enabled = settings.metrics_enabled
    app.state.metrics_token = settings.metrics_token
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.include_router(router)
    app.include_router(replicas.router)  # GET /api/v1/tinkerd/replicas
    app.include_router(openai_compat.router)  # OpenAI-/Anthropic-compatible inference
    app.include_router(anthropic_compat.router)
    app.include_router(console.router)  # the web console at /console (docs/console.md)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # sees every answer
    app.add_middleware(RequestLog)  # outermost: one log line per request, with its context

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers a body it could not read with 400; when that is because the client
        # went away mid-request (an SDK poller cancelled at shutdown), nobody gets an error:
        # 499 (client closed request) keeps it out of the 4xx the caller caused.
        if exc.status_code == 400 and await request.is_disconnected():
            return JSONResponse({"detail": "the client closed the request"}, status_code=499)
        return await http_exception_handler(request, exc)

    @app.exception_handler(KeyError)
    async def missing_field(request: Request, exc: KeyError) -> JSONResponse:
        # Meant for a payload's missing key; logged with its traceback, since a KeyError
        # from the server's own state would also end here.
        log.info("%s %s: KeyError %s", request.method, request.url.path, exc, exc_info=exc)
        return JSONResponse({"detail": f"missing field {exc.args[0]!r}"}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        await skip_rejected_seq(request, exc.body)
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    return app
