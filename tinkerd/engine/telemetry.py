"""What the scheduler reports about its work, as plain numbers, to whoever listens.

The engine knows nothing of Prometheus or HTTP: the api layer (`tinkerd/api/metrics.py`,
`tinkerd/api/traces.py`) implements `Telemetry` and sets it on each scheduler. The default
does nothing. Hooks run on the scheduler thread (`op_queued` on the submitting thread) and
must be quick and never raise.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPart:
    """One request's share of a micro-batch or sampling batch."""

    request_id: str
    rows: int  # datums (training) or samples asked for (sampling)
    tokens: int  # tokens of those rows (training) or of the prompt (sampling)
    sampled: int = 0  # tokens generated (sampling)


class Telemetry:
    """The scheduler's observer; every method is a no-op here. Times are `time.time()`."""

    def op_queued(self, model: str, request_id: str, at: float) -> None:
        """An op was queued."""

    def op_started(self, model: str, request_id: str, at: float) -> None:
        """An op's execution began (its first micro-batch, its batch, or its barrier). May be
        called again for the same op (a batch retried one by one): the first call counts."""

    def micro_batch(
        self,
        model: str,
        start: float,
        end: float,
        parts: list[BatchPart],
        padded_tokens: int,
        trained_tokens: int,
    ) -> None:
        """A forward_backward micro-batch ran: `padded_tokens` = rows x longest row;
        `trained_tokens`: tokens of rows that were not forward-only."""

    def sample_batch(self, model: str, start: float, end: float, parts: list[BatchPart]) -> None:
        """A batch of sample requests ran."""

    def snapshots(self, model: str, count: int, total_bytes: int) -> None:
        """Sampler snapshots now held in memory."""

    def prefix_cache(self, model: str, lookups: int, hits: int) -> None:
        """Prompt prefix-cache lookups and hits since the last call (model/prefix_cache.py)."""


class Fanout(Telemetry):
    """Several observers, called in order."""

    def __init__(self, *observers: Telemetry) -> None:
        self.observers = observers

    def op_queued(self, model: str, request_id: str, at: float) -> None:
        for o in self.observers:
            o.op_queued(model, request_id, at)

    def op_started(self, model: str, request_id: str, at: float) -> None:
        for o in self.observers:
            o.op_started(model, request_id, at)

    def micro_batch(
        self,
        model: str,
        start: float,
        end: float,
        parts: list[BatchPart],
        padded_tokens: int,
        trained_tokens: int,
    ) -> None:
        for o in self.observers:
            o.micro_batch(model, start, end, parts, padded_tokens, trained_tokens)

    def sample_batch(self, model: str, start: float, end: float, parts: list[BatchPart]) -> None:
        for o in self.observers:
            o.sample_batch(model, start, end, parts)

    def snapshots(self, model: str, count: int, total_bytes: int) -> None:
        for o in self.observers:
            o.snapshots(model, count, total_bytes)

    def prefix_cache(self, model: str, lookups: int, hits: int) -> None:
        for o in self.observers:
            o.prefix_cache(model, lookups, hits)
