"""What every service module answers: a caller error (a 4xx with a JSON body), or the future a
future-returning endpoint hands back."""

from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """A caller error: HTTP `status` with a JSON body `{"detail": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


@dataclass
class Future:
    """What a future-returning endpoint answers (UntypedAPIFuture)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id}
        if self.model_id is not None:
            out["model_id"] = self.model_id
        if self.sample_sequence_ids is not None:
            out["sample_sequence_ids"] = self.sample_sequence_ids
        return out
