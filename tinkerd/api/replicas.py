"""`GET /api/v1/tinkerd/replicas`: each served model's workers, for operators and tests.

One entry per replica (engine/replicas.py `ReplicaRouter.listing`): model, pid of the worker
process (a gang: its rank-0 process), node address, devices, state (ready / lost / restarting),
how many runs are placed on it, queue depth and resident memory. An in-process worker is one
entry with the server's own pid. Any accepted API key may read it: it holds counts, no ids.
"""

import os
from typing import Any

import psutil
from fastapi import APIRouter
from pydantic import BaseModel

from tinkerd.api.routes import Svc, User
from tinkerd.engine.replicas import ReplicaRouter, Scheduler

router = APIRouter(prefix="/api/v1/tinkerd")


class ReplicaInfo(BaseModel):
    model: str
    replica: int
    pid: int | None  # None: the worker did not answer yet (restarting, or busy at startup)
    node: str | None
    devices: str
    state: str  # ready | lost | restarting
    epoch: int
    runs: int
    queue_depth: int
    memory_bytes: int | None


class ReplicaList(BaseModel):
    replicas: list[ReplicaInfo]


def replica_listing(schedulers: dict[str, Scheduler]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, scheduler in schedulers.items():
        if isinstance(scheduler, ReplicaRouter):
            out.extend(scheduler.listing())
            continue
        out.append(
            {
                "model": name,
                "replica": 0,
                "pid": os.getpid(),
                "node": "local",
                "devices": "in-process",
                "state": "ready",
                "epoch": scheduler.epoch,
                "runs": len(scheduler.runs()),
                "queue_depth": scheduler.queued(),
                "memory_bytes": psutil.Process().memory_info().rss,
            }
        )
    return out


@router.get("/replicas")
def replicas(user: User, svc: Svc) -> ReplicaList:
    """Blocking (it asks each Ray worker for its pid and memory): FastAPI runs it off the loop."""
    del user  # any accepted key
    return ReplicaList(replicas=[ReplicaInfo(**r) for r in replica_listing(svc.schedulers)])
