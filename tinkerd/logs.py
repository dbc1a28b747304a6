"""Server logs: plain text (the default) or JSON, one object per line.

`configure(fmt)` sets up the root logger once, for `tinkerd serve` (`--log-format`,
`TINKERD_LOG_FORMAT`). A JSON line holds `time` (UTC, ISO 8601), `level`, `logger`, `message`,
the request context fields that are set (`request_id`, `user`, `model`, `seq_id`, `kind`),
the structured fields a caller passes with `extra=fields(...)`, and `exc_info` (the
traceback) when there is one.

The request context lives in a contextvar: the HTTP request-log middleware (api/app.py) opens
one per request with `context(request_id=..., user=...)`, so every line logged while that
request is handled (in its task, or in a thread it started with the context copied, as
FastAPI's thread pool does) carries them; `bind(...)` adds fields to the context in place
(e.g. the model and seq_id once a future is created), and the request's own log line reports
them too. Never put request bodies or API keys in a context or a log line.
"""

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

CONTEXT_FIELDS = ("request_id", "user", "model", "seq_id", "kind")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS_ATTR = "tinkerd_fields"

_context: ContextVar[dict[str, Any] | None] = ContextVar("tinkerd_log_context", default=None)
_format: LogFormat = "text"


@contextmanager
def context(**values: Any) -> Iterator[dict[str, Any]]:
    """Log lines emitted inside carry these fields (None values are left out), on top of any
    outer context. Yields the context's dict: what `bind` adds inside shows up there."""
    merged = {**(_context.get() or {}), **{k: v for k, v in values.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


def bind(**values: Any) -> None:
    """Add fields to the current context in place (no-op outside one); threads that copied
    the context share the same dict, so the enclosing request's log line sees them."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in values.items() if v is not None})


def current() -> dict[str, Any]:
    """The current context's fields (a copy)."""
    return dict(_context.get() or {})


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields a JSON line carries as its own keys."""
    return {_FIELDS_ATTR: values}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if ctx.get(name) is not None:
                line[name] = ctx[name]
        for name, value in (getattr(record, _FIELDS_ATTR, None) or {}).items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    """Root logger to stderr in `fmt` ("text": `TEXT_FORMAT`; "json": `JsonFormatter`)."""
    global _format
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r}: expected text or json")
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if fmt == "json":
        _quiet_library_bars()


def _quiet_library_bars() -> None:
    """transformers and huggingface_hub draw their own tqdm bars (GGUF dequantisation, weight
    loading, downloads); in a JSON log they would be garbage between the lines."""
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies of tinkerd
        pass


def is_json() -> bool:
    """Whether `configure` chose JSON (then progress is logged as lines, not drawn as bars)."""
    return _format == "json"


class Progress:
    """Progress of a long step-by-step job: a tqdm bar in text mode; in JSON mode, one log
    line per step (a bar's redraws would be garbage in a JSON log)."""

    def __init__(self, total: int, desc: str, logger: logging.Logger, unit: str = "step") -> None:
        self.total, self.desc, self.log, self.done = total, desc, logger, 0
        self.bar = None
        if not is_json():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, what: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            return
        self.log.info(
            "%s: %d/%d%s",
            self.desc,
            self.done,
            self.total,
            f" ({what})" if what else "",
            extra=fields(progress=self.done, total=self.total),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
