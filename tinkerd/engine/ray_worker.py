"""A worker replica in a Ray actor, and the proxy the scheduler drives it through.

The actor loads its base model itself (from the model spec: weights never cross the control
plane link) and holds a `LocalWorker`, so checkpoint and run-state files are written where the
replica runs; the paths must name a filesystem every replica reaches. Tensors cross as numpy
arrays (3-5x cheaper than torch tensors through Ray, docs/scale-out.md §5.2). Exceptions raised
by the worker come back as themselves; anything Ray raises (the actor's process or node died, or
is unreachable) becomes `ReplicaLost`. Actors restart (`max_restarts`) but never re-run a task
(`max_task_retries=0`): a retried call would run on the new, empty actor.

Ray is imported lazily: the default server path never imports this module.
"""

import contextlib
import copy
import dataclasses
import os
import pickle
import signal
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinkerd.engine.worker_handle import ModelFront, ReplicaLost
from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams, OptimStepResult
from tinkerd.model.sample_engine import DEFAULT_PREFILL_CHUNK
from tinkerd.model.types import (
    ForwardBackwardInput,
    ForwardBackwardOutput,
    SampleInput,
    SampleOutput,
)
from tinkerd.model.vision import VisionSupport

CLOSE_TIMEOUT_S = 10.0
RAY_MISSING = "serving replicas needs Ray: pip install 'tinkerd[ray]'"


def import_ray() -> Any:
    """Ray, or a clear error saying what to install."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(RAY_MISSING) from exc
    return ray


@dataclass(frozen=True)
class ReplicaSpec:
    """What an actor needs to load its replica of a base model."""

    name: str  # the served name
    source: str  # hub name or local directory (on the replica's machine)
    data_dir: Path
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    threads: int | None = None  # torch threads in the actor (None: its CPU share)
    prefix_cache_bytes: int | None = None  # the sampler's prefix cache (None: its default)
    own_decoder: bool = True  # tinkerd's decode step where the model allows (model/decoder.py)
    decode_kernels: bool = True  # its fused CPU kernels (model/kernels)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens prefilled per decode step


# -- numpy transport -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Array:
    """A tensor in transit: numpy data (bfloat16 travels as its int16 bits)."""

    data: np.ndarray
    bfloat16: bool = False

    def tensor(self) -> torch.Tensor:
        data = self.data if self.data.flags.writeable else self.data.copy()  # Ray's are read-only
        t = torch.from_numpy(data)
        return t.view(torch.bfloat16) if self.bfloat16 else t


def pack(obj: Any) -> Any:
    """A copy of `obj` with every tensor inside (dataclasses, lists, tuples, dicts) as numpy."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            return _Array(t.contiguous().view(torch.int16).numpy(), bfloat16=True)
        return _Array(t.contiguous().numpy())
    return _walk(obj, pack)


def unpack(obj: Any) -> Any:
    """The inverse of `pack`."""
    if isinstance(obj, _Array):
        return obj.tensor()
    return _walk(obj, unpack)


def _walk(obj: Any, f: Any) -> Any:
    if isinstance(obj, list):
        return [f(x) for x in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(f(x) for x in obj)
    if isinstance(obj, dict):
        return {k: f(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for fld in dataclasses.fields(obj):
            object.__setattr__(new, fld.name, f(getattr(obj, fld.name)))
        return new
    return obj


# -- the actor -----------------------------------------------------------------------------


class WorkerActor:
    """The Ray actor's class: one replica's `LocalWorker`, called by name."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from tinkerd.engine.local_worker import LocalWorker
        from tinkerd.model.loading import load_base_model
        from tinkerd.model.worker import ModelWorker

        if spec.threads:
            torch.set_num_threads(spec.threads)
        base = load_base_model(
            spec.source,
            data_dir=spec.data_dir,
            dtype=spec.dtype,
            device=spec.device,
            served_name=spec.name,
            trust_remote_code=spec.trust_remote_code,
        )
        autocast = torch.bfloat16 if spec.dtype == "bfloat16" else None
        extra = (
            {}
            if spec.prefix_cache_bytes is None
            else {"prefix_cache_bytes": spec.prefix_cache_bytes}
        )
        self.model = ModelWorker(
            base,
            autocast_dtype=autocast,
            own_decoder=spec.own_decoder,
            decode_kernels=spec.decode_kernels,
            prefill_chunk=spec.prefill_chunk,
            **extra,
        )
        self.local = LocalWorker(self.model)

    def call(self, name: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """(True, result) or (False, the exception the worker raised)."""
        try:
            return True, pack(getattr(self.local, name)(*unpack(args), **unpack(kwargs)))
        except Exception as exc:
            return False, _portable(exc)

    def front_parts(self) -> tuple[BaseModelInfo, Any, Any, str]:
        """The model's description, tokenizer, vision config (None: text only) and source:
        the control plane builds its `ModelFront` from them (a VisionSupport holds a lock)."""
        front = self.local.front()
        config = self.model.base.model.config if front.vision is not None else None
        return front.info, front.tokenizer, config, front.source

    def activation_bytes_per_token(self) -> int:
        return self.model.activation_bytes_per_token()

    def activation_memory_gb(self) -> float | None:
        """Half the free memory of the replica's GPU (None on CPU: the control plane's rule)."""
        device = self.model.base.device
        if device.type != "cuda":
            return None
        return torch.cuda.mem_get_info(device)[0] / 2 / 2**30

    def describe(self) -> dict[str, Any]:
        """pid, node address and resident memory, for the replica listing."""
        import psutil
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "memory_bytes": psutil.Process().memory_info().rss,
        }

    def ping(self) -> bool:
        return True


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling (Ray would report a failed unpickle as a lost actor),
    else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class RayCluster:
    """The Ray cluster replicas run on: an existing one (`address`), or a local one started
    here and ended by `shutdown` (Ray ends the processes it started by their ids)."""

    def __init__(
        self, address: str | None, *, num_cpus: float, object_store_bytes: int = 512 << 20
    ) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None:
            # One node on loopback: otherwise Ray advertises the machine's outward address.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.ray = import_ray()
        self.address = address
        # ray.init installs its own SIGTERM handler (sys.exit): the server's must stay.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if address is None:
                self.ray.init(
                    num_cpus=max(float(os.cpu_count() or 1), num_cpus),
                    include_dashboard=False,
                    object_store_memory=object_store_bytes,
                    namespace="tinkerd",
                )
            else:
                host = address.rsplit(":", 1)[0]
                # A head on a loopback address (tests, one machine): this driver is on it too.
                local = {"_node_ip_address": host} if host.startswith("127.") else {}
                self.ray.init(address=address, namespace="tinkerd", **local)
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)

    def shutdown(self) -> None:
        self.ray.shutdown()


def actor_class(ray: Any) -> Any:
    return ray.remote(WorkerActor)


class ForwardingHandle:
    """The `WorkerHandle` operations, each forwarded by name to `_call`: a Ray actor
    (`RayWorker`) or a gang of them (engine/gang.py). File writes go through `_write`."""

    _front: ModelFront

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A checkpoint or run-state write (a gang writes on rank 0 only)."""
        return self._call(name, *args, **kwargs)

    @property
    def info(self) -> BaseModelInfo:
        return self._front.info

    def front(self) -> ModelFront:
        return self._front

    def add_adapter(self, adapter_id: str, config: LoraConfig) -> None:
        self._call("add_adapter", adapter_id, config)

    def remove_adapter(self, adapter_id: str) -> None:
        self._call("remove_adapter", adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return bool(self._call("has_adapter", adapter_id))

    def snapshot_adapter(self, source_id: str, snapshot_id: str) -> None:
        self._call("snapshot_adapter", source_id, snapshot_id)

    def forward_backward(self, inputs: list[ForwardBackwardInput]) -> list[ForwardBackwardOutput]:
        return self._call("forward_backward", inputs)

    def optim_step(self, adapter_id: str, params: AdamParams) -> OptimStepResult:
        return self._call("optim_step", adapter_id, params)

    def sample(self, inputs: list[SampleInput]) -> list[SampleOutput]:
        # A per-token hook cannot cross processes: its caller gets the whole result at the end.
        sent = [dataclasses.replace(i, on_token=None) if i.on_token else i for i in inputs]
        return self._call("sample", sent)

    def has_pending_grads(self, adapter_id: str) -> bool:
        return bool(self._call("has_pending_grads", adapter_id))

    def adapter_bytes(self, adapter_id: str) -> int:
        return int(self._call("adapter_bytes", adapter_id))

    def save_adapter(
        self,
        adapter_id: str,
        directory: Path,
        base_model: str,
        *,
        with_optimizer: bool,
        overwrite: bool = False,
    ) -> int:
        return int(
            self._write(
                "save_adapter",
                adapter_id,
                directory,
                base_model,
                with_optimizer=with_optimizer,
                overwrite=overwrite,
            )
        )

    def load_adapter(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> None:
        self._call("load_adapter", adapter_id, directory, with_optimizer=with_optimizer)

    def load_snapshot(self, snapshot_id: str, directory: Path) -> None:
        self._call("load_snapshot", snapshot_id, directory)

    def write_state(
        self, model_id: str, root: Path, base_model: str, seq_id: int, *, wait: bool = True
    ) -> None:
        self._write("write_state", model_id, root, base_model, seq_id, wait=wait)

    def read_state(self, model_id: str, root: Path) -> bool:
        return bool(self._call("read_state", model_id, root))


class RayWorker(ForwardingHandle):
    """Implements `WorkerHandle` on a `WorkerActor`. Not thread-safe (one scheduler thread)."""

    def __init__(self, actor: Any, *, devices: str) -> None:
        self.ray = import_ray()
        self.actor = actor
        self.devices = devices  # what the replica holds, for the listing ("cpu:1", "gpu:1")
        self.dead = False
        info, tokenizer, config, source = self._ray_get(self.actor.front_parts.remote())
        vision = VisionSupport(config, source, info.name) if config is not None else None
        self._front = ModelFront(info, tokenizer, vision, source)

    @classmethod
    def create(
        cls, spec: ReplicaSpec, *, num_cpus: float, num_gpus: float, max_restarts: int = -1
    ) -> "RayWorker":
        """Start an actor for `spec`, holding `num_cpus`/`num_gpus` of the cluster."""
        ray = import_ray()
        threads = spec.threads or max(1, int(num_cpus))
        actor = (
            actor_class(ray)
            .options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=max_restarts,
                max_task_retries=0,
                max_concurrency=1,
            )
            .remote(dataclasses.replace(spec, threads=threads))
        )
        devices = f"gpu:{num_gpus:g}" if num_gpus else f"cpu:{num_cpus:g}"
        return cls(actor, devices=devices)

    def _ray_get(self, ref: Any, timeout: float | None = None) -> Any:
        try:
            return self.ray.get(ref, timeout=timeout)
        except self.ray.exceptions.RayError as exc:
            # Dead for good (killed, or out of restarts); a restarting actor is "unavailable".
            self.dead = isinstance(exc, self.ray.exceptions.ActorDiedError)
            raise ReplicaLost(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        ok, value = self._ray_get(self.actor.call.remote(name, pack(args), pack(kwargs)))
        if not ok:
            raise value
        return unpack(value)

    # Continuous batching: one call per admission and per decode slice; the token deltas
    # come back as data and the scheduler calls the requests' `on_token` hooks itself.

    def sample_admit(self, keys: list[Hashable], inputs: list[SampleInput]) -> None:
        self._call("sample_admit", keys, inputs)  # the scheduler strips the on_token hooks

    def sample_step(self, max_seconds: float | None) -> tuple[dict[Hashable, SampleOutput], Any]:
        return self._call("sample_step", max_seconds)

    def sample_active(self) -> int:
        return int(self._call("sample_active"))

    def sample_cancel(self, keys: list[Hashable]) -> None:
        self._call("sample_cancel", keys)

    def sample_abort(self) -> list[Hashable]:
        return self._call("sample_abort")

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self._call("prefix_cache_stats")

    def close(self) -> None:
        """Finish the actor's state writes; bounded, as a restarting actor may never answer."""
        with contextlib.suppress(ReplicaLost):
            self._ray_get(self.actor.call.remote("close", (), {}), timeout=CLOSE_TIMEOUT_S)

    # -- beyond the protocol ----------------------------------------------------------------

    def activation_bytes_per_token(self) -> int:
        return int(self._ray_get(self.actor.activation_bytes_per_token.remote()))

    def activation_memory_gb(self) -> float | None:
        return self._ray_get(self.actor.activation_memory_gb.remote())

    def alive(self, timeout: float) -> bool:
        """Whether the actor answers within `timeout` seconds (False while it restarts)."""
        try:
            return bool(self._ray_get(self.actor.ping.remote(), timeout))
        except ReplicaLost:
            return False

    def describe(self, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            return self._ray_get(self.actor.describe.remote(), timeout)
        except ReplicaLost:
            return None

    def kill(self) -> None:
        """End the actor for good (no restart)."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor, no_restart=True)
