"""Long-poll support: `retrieve_future` waits on an asyncio event that the engine's thread sets.

The store is the source of truth; the hub only wakes waiters early. A waiter registers its
event *before* reading the store, so a completion between the read and the wait is not missed.
"""

import asyncio
import threading


class FutureHub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def event(self, request_id: str) -> asyncio.Event:
        """The event that `notify(request_id)` will set (shared by all its waiters)."""
        with self._lock:
            return self._events.setdefault(request_id, asyncio.Event())

    def forget(self, request_id: str, event: asyncio.Event) -> None:
        with self._lock:
            if self._events.get(request_id) is event:
                del self._events[request_id]

    def notify(self, request_id: str) -> None:
        """Thread-safe: wake every waiter of `request_id`."""
        with self._lock:
            event = self._events.pop(request_id, None)
        if event is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(event.set)
