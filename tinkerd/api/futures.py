"""Long-poll support: `retrieve_future` waits for a wake-up that the engine's thread sends.

The store is the source of truth; the hub only wakes waiters early, handing them the finished
record so they need not read it back. A waiter registers *before* reading the store, so a
completion between the read and the wait is not missed. Keys are request ids, or
`completion_queue_key(sampling_session_id)` for `retrieve_futures` pollers of a session.
"""

import asyncio
import threading
from dataclasses import dataclass, field

from tinkerd.store.records import FutureRecord


def completion_queue_key(sampling_session_id: str) -> str:
    """The hub key woken when a sample of the session finishes (request ids are uuids)."""
    return f"completion_queue:{sampling_session_id}"


@dataclass
class Waiter:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    record: FutureRecord | None = None  # set, with the event, when the future finishes
    pollers: int = 0  # how many pollers share it: the last one to leave removes it


class FutureHub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def waiter(self, request_id: str) -> Waiter:
        """The waiter that `notify(request_id, ...)` will wake (shared by all its pollers)."""
        with self._lock:
            waiter = self._waiters.setdefault(request_id, Waiter())
            waiter.pollers += 1
            return waiter

    def forget(self, request_id: str, waiter: Waiter) -> None:
        """A poller leaves; the waiter stays registered while other pollers still wait on it."""
        with self._lock:
            waiter.pollers -= 1
            if waiter.pollers <= 0 and self._waiters.get(request_id) is waiter:
                del self._waiters[request_id]

    def notify(self, request_id: str, record: FutureRecord) -> None:
        """Thread-safe: wake every poller of `request_id` with its finished (stored) record."""
        with self._lock:
            waiter = self._waiters.pop(request_id, None)
        if waiter is not None and self._loop is not None and not self._loop.is_closed():

            def wake() -> None:
                waiter.record = record
                waiter.event.set()

            self._loop.call_soon_threadsafe(wake)
