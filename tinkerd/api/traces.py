"""Session traces: a Chrome trace-event JSON of everything a session asked for (opens in
ui.perfetto.dev), served to `RestClient.export_session_trace` / `tinker session export-trace`.

What is recorded, and where:

- Each future's request, queue wait and compute come from the futures table: `created_at`
  (queued), `started_at` (the engine began executing it) and `completed_at` (finished), so
  they survive restarts.
- While a request runs, `TraceRecorder` (an engine `Telemetry` observer) keeps its start time
  and the micro-batches / sampling batches it took part in, in memory; they are written with
  the future's outcome (`timings`), in the same update. A batch span names only counts of
  what it shared: rows and tokens of the whole batch, other requests, other tenants (distinct
  other users), never their ids.

The trace: one process per training run or sampling session of the session, each request a
complete event ("X") named by its kind, with "queue" and "compute" nested inside it, and the
batch spans nested inside "compute". Requests that overlap in time go to separate lanes
(threads), so events on one lane always nest.
"""

import time
from collections import OrderedDict
from datetime import UTC, datetime
from threading import Lock
from typing import Any

from tinkerd.checkpoints import downloads
from tinkerd.engine.telemetry import BatchPart, Telemetry
from tinkerd.store.records import FutureRecord, SessionRecord
from tinkerd.store.store import Store

# How long a trace URL stays valid, and the grant marker that tells trace tokens from
# checkpoint download tokens (checkpoint ids always contain a '/').
TRACE_URL_SECONDS = 3600
TRACE_GRANT = "session_trace"
# Requests tracked in memory at most (queued or running); the oldest are dropped beyond it.
MAX_TRACKED = 100_000
# Batch spans kept per request at most (a huge forward_backward has many micro-batches).
MAX_SPANS = 256


class _Live:
    __slots__ = ("kind", "spans", "started", "user")

    def __init__(self, user: str, kind: str) -> None:
        self.user = user
        self.kind = kind
        self.started: float | None = None
        self.spans: list[dict[str, Any]] = []


class TraceRecorder(Telemetry):
    """Per-request engine timings from queueing until the future's outcome is stored."""

    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self._live: OrderedDict[str, _Live] = OrderedDict()
        self._lock = Lock()
        self.max_tracked = max_tracked

    def track(self, request_id: str, user: str, kind: str) -> None:
        with self._lock:
            self._live[request_id] = _Live(user, kind)
            while len(self._live) > self.max_tracked:
                self._live.popitem(last=False)

    def take(self, request_id: str) -> tuple[str | None, dict[str, Any]]:
        """Forget a finished request: (its kind, the timing fields to store with it)."""
        with self._lock:
            live = self._live.pop(request_id, None)
        if live is None:
            return None, {}
        timing: dict[str, Any] = {}
        if live.started is not None:
            timing["started_at"] = datetime.fromtimestamp(live.started, UTC)
        if live.spans:
            timing["timings"] = live.spans
        return live.kind, timing

    def op_started(self, model: str, request_id: str, at: float) -> None:
        with self._lock:
            live = self._live.get(request_id)
            if live is not None and live.started is None:
                live.started = at

    def micro_batch(
        self,
        model: str,
        start: float,
        end: float,
        parts: list[BatchPart],
        padded_tokens: int,
        trained_tokens: int,
    ) -> None:
        extra = {"batch_padded_tokens": padded_tokens}
        self._batch("micro_batch", start, end, parts, extra)

    def sample_batch(self, model: str, start: float, end: float, parts: list[BatchPart]) -> None:
        self._batch("sample_batch", start, end, parts, {})

    def _batch(
        self, name: str, start: float, end: float, parts: list[BatchPart], extra: dict[str, Any]
    ) -> None:
        with self._lock:
            users = {
                p.request_id: self._live[p.request_id].user
                for p in parts
                if p.request_id in self._live
            }
            batch_rows = sum(p.rows for p in parts)
            batch_tokens = sum(p.tokens for p in parts)
            for p in parts:
                live = self._live.get(p.request_id)
                if live is None or len(live.spans) >= MAX_SPANS:
                    continue
                others = [q for q in parts if q.request_id != p.request_id]
                args = {
                    "rows": p.rows,
                    "tokens": p.tokens,
                    "batch_rows": batch_rows,
                    "batch_tokens": batch_tokens,
                    "other_requests": len(others),
                    "other_tenants": len(
                        {users.get(q.request_id, q.request_id) for q in others} - {live.user}
                    ),
                    **extra,
                }
                if name == "sample_batch":
                    args["sampled_tokens"] = p.sampled
                live.spans.append({"name": name, "start": start, "end": end, "args": args})


# -- signed URLs -------------------------------------------------------------------------


def sign_url(secret: bytes, base_url: str, session_id: str, user: str) -> str:
    """A URL that serves the session's trace to whoever holds it, for an hour."""
    expires = int(time.time()) + TRACE_URL_SECONDS
    grant = downloads.DownloadGrant(session_id, TRACE_GRANT, user, expires)
    token = downloads.sign(secret, grant)
    return f"{base_url}/api/v1/sessions/{session_id}/trace_export?token={token}"


def verify_token(secret: bytes, session_id: str, token: str) -> str:
    """The user a trace token was signed for; TokenError if it is invalid, expired or for
    another session (or is a checkpoint download token)."""
    if not token.isascii():
        raise downloads.TokenError("invalid download token")
    grant = downloads.verify(secret, token)
    if grant.checkpoint_id != TRACE_GRANT or grant.run_id != session_id:
        raise downloads.TokenError("invalid download token")
    return grant.relpath


# -- the trace ---------------------------------------------------------------------------


def _us(t: datetime | float) -> float:
    seconds = t if isinstance(t, float | int) else t.timestamp()
    return round(seconds * 1e6, 3)


def build_trace(
    store: Store, session: SessionRecord, now: datetime | None = None
) -> dict[str, Any]:
    """The session's Chrome trace-event JSON (`{"traceEvents": [...]}`)."""
    now = now or datetime.now(UTC)
    runs, samplers = store.session_children(session.session_id)
    owners = runs + samplers
    futures = [f for f in store.session_futures(owners) if f.user == session.user]
    events: list[dict[str, Any]] = [
        {
            "name": "process_name",
            "ph": "M",
            "pid": 0,
            "tid": 0,
            "args": {"name": f"session {session.session_id}"},
        },
    ]
    pids = {owner: i + 1 for i, owner in enumerate(owners)}
    for owner, pid in pids.items():
        label = "training run" if owner in runs else "sampling session"
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"name": f"{label} {owner}"},
            }
        )
        events.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"sort_index": pid},
            }
        )
    lanes: dict[int, list[float]] = {}  # pid -> end time (us) of the last request on each lane
    for rec in futures:
        pid = pids[rec.model_id]  # type: ignore[index]
        events.extend(_request_events(rec, pid, lanes.setdefault(pid, []), now))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"session_id": session.session_id, "exported_at": now.isoformat()},
    }


def _request_events(
    rec: FutureRecord, pid: int, lanes: list[float], now: datetime
) -> list[dict[str, Any]]:
    assert rec.created_at is not None
    start = _us(rec.created_at)
    end = max(start, _us(rec.completed_at or now))
    for tid, busy_until in enumerate(lanes):  # the first lane free by then
        if busy_until <= start:
            lanes[tid] = end
            break
    else:
        lanes.append(end)
        tid = len(lanes) - 1
    tid += 1

    def span(
        name: str, a: float, b: float, args: dict[str, Any], lo: float, hi: float
    ) -> dict[str, Any]:
        a = min(max(a, lo), hi)  # clock rounding never breaks nesting
        b = min(max(b, a), hi)
        return {
            "name": name,
            "cat": "tinkerd",
            "ph": "X",
            "ts": a,
            "dur": round(b - a, 3),
            "pid": pid,
            "tid": tid,
            "args": args,
        }

    args: dict[str, Any] = {"request_id": rec.request_id, "status": rec.status}
    if rec.seq_id is not None:
        args["seq_id"] = rec.seq_id
    if rec.category:
        args["error_category"] = rec.category
    events = [span(rec.kind, start, end, args, start, end)]
    if rec.started_at is not None:
        started = _us(rec.started_at)
        events.append(span("queue", start, started, {}, start, end))
        events.append(span("compute", started, end, {}, start, end))
        lo = events[-1]["ts"]
        for s in rec.timings or []:
            events.append(
                span(s["name"], _us(float(s["start"])), _us(float(s["end"])), s["args"], lo, end)
            )
    return events
