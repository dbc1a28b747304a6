"""A cap on request body size, enforced before the body is read into memory.

FastAPI reads a whole body before any handler sees it, so without a cap one oversized request
could take the server's memory from every other tenant. A declared `Content-Length` over the
limit is answered at once; a body without one (chunked) is counted as it streams in and
refused the moment it passes the limit. Either way the answer is a 413 with a JSON `detail`
(the SDK does not retry a 413).
"""

from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(limit: int) -> str:
    return (
        f"request body exceeds the server's limit of {limit} bytes "
        "(TINKERD_MAX_BODY_BYTES); send smaller chunks"
    )


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = JSONResponse({"detail": too_large(self.max_bytes)}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the handler's body read, so the app's exception handling
                    # turns it into the JSON 413 (FastAPI re-raises HTTPExceptions from there).
                    raise HTTPException(413, too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
