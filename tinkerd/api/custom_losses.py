"""Server-side custom losses: `/create_custom_loss` and the `loss_id` of forward_backward.

`create` checks the uploaded graph (tinkerd/model/custom_loss.py), stores it durably with its
future in one transaction (the future is complete from the start: there is no model work),
and answers the request_id; `/retrieve_future` then returns `{"loss_id", "type"}` as the SDK's
`CreateCustomLossResponse`. The loss id is `<session_id>:loss:<custom_loss_seq_id>`; a retry
of the same seq id (the SDK retries) gets the same future. `resolve` turns a forward_backward
request's `loss_fn_config.loss_id` into the rebuilt loss for the run's session and user,
from a bounded in-memory cache or the store (so replays after a restart find it too). A
loss of another session or user answers exactly like an unknown one.
"""

import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from tinkerd.api.service_types import ApiError, Future, not_found
from tinkerd.model.custom_loss import CustomLoss, CustomLossError, build
from tinkerd.store.records import CustomLossRecord, FutureRecord
from tinkerd.store.store import Store

# Rebuilt losses kept in memory (a rebuild is cheap; this only saves it per request).
CACHE_SIZE = 256

DISABLED = (
    "create_custom_loss is turned off on this server (TINKERD_CUSTOM_LOSS_SERVER_SIDE=false); "
    "its /client/config says custom_loss_server_side=false, so the SDK runs custom losses "
    "on the client"
)


class CustomLosses:
    def __init__(self, store: Store, *, enabled: bool = True, cache_size: int = CACHE_SIZE) -> None:
        self.store = store
        self.enabled = enabled
        self._cache: OrderedDict[str, tuple[str, str, CustomLoss]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def create(self, user: str, body: dict[str, Any]) -> Future:
        if not self.enabled:
            raise ApiError(404, DISABLED)
        session_id = body["session_id"]
        if self.store.get_session(session_id, user) is None:
            raise not_found(f"session {session_id!r}")
        seq_id = int(body["custom_loss_seq_id"])
        name, inputs, graph = body["name"], body["inputs"], body["graph"]
        try:
            loss = build(name, inputs, graph)
        except CustomLossError as exc:
            raise ApiError(400, f"create_custom_loss {name!r}: {exc}") from exc
        canonical = json.dumps({"inputs": inputs, "graph": graph}, sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        loss_id = f"{session_id}:loss:{seq_id}"
        request_id = str(uuid.uuid4())
        summary = {"session_id": session_id, "custom_loss_seq_id": seq_id, "name": name}
        future = FutureRecord(
            request_id=request_id,
            user=user,
            kind="create_custom_loss",
            request=json.dumps(summary).encode(),
            status="complete",
            result=json.dumps({"loss_id": loss_id, "type": "create_custom_loss"}).encode(),
            result_type="json",
            completed_at=datetime.now(UTC),
        )
        stored = self.store.add_custom_loss(
            CustomLossRecord(
                loss_id=loss_id,
                session_id=session_id,
                user=user,
                seq_id=seq_id,
                name=name,
                inputs=inputs,
                graph=graph,
                sha256=digest,
                request_id=request_id,
            ),
            future,
        )
        if stored.sha256 != digest or stored.user != user:
            raise ApiError(
                400,
                f"custom_loss_seq_id {seq_id} of this session was used for another loss; "
                "each create_custom_loss takes the session's next seq id",
            )
        self._remember(stored.loss_id, session_id, user, loss)
        return Future(stored.request_id)

    def resolve(self, user: str, session_id: str, loss_id: object) -> CustomLoss:
        """The rebuilt loss `loss_id` of this session and user, or a 400 naming
        `loss_fn_config.loss_id` (the same for unknown ids and other sessions' or users')."""
        if not isinstance(loss_id, str) or not loss_id:
            raise ApiError(
                400,
                "loss_fn_config.loss_id is required with loss_fn 'custom': the loss_id that "
                "create_custom_loss returned in this session",
            )
        unknown = ApiError(
            400, f"loss_fn_config.loss_id {loss_id[:600]!r}: no such custom loss in this session"
        )
        with self._lock:
            cached = self._cache.get(loss_id)
            if cached is not None and cached[:2] == (session_id, user):
                self._cache.move_to_end(loss_id)
                return cached[2]
        rec = self.store.get_custom_loss(loss_id, session_id, user)
        if rec is None:
            raise unknown
        try:
            loss = build(rec.name, rec.inputs, rec.graph)
        except CustomLossError as exc:  # stored by a tinkerd with a larger allowlist
            raise ApiError(400, f"loss_fn_config.loss_id {loss_id!r}: {exc}") from exc
        self._remember(loss_id, session_id, user, loss)
        return loss

    def _remember(self, loss_id: str, session_id: str, user: str, loss: CustomLoss) -> None:
        with self._lock:
            self._cache[loss_id] = (session_id, user, loss)
            self._cache.move_to_end(loss_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
