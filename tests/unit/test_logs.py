"""Structured logs (tinkerd/logs.py), the request-log middleware, recovery replay progress."""

import contextvars
import io
import json
import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tinkerd import logs
from tinkerd.api.app import RequestLog
from tinkerd.api.recovery import RecoveryReport, replay_progress
from tinkerd.config import Settings

KEY = "tml-secret-key-never-logged"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged under `tinkerd` as JSON lines, in a string buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tinkerd")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def parsed(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_the_basic_fields(json_lines: io.StringIO) -> None:
    logging.getLogger("tinkerd.test").warning("hello %s", "world")
    [line] = parsed(json_lines)
    assert line["level"] == "WARNING"
    assert line["logger"] == "tinkerd.test"
    assert line["message"] == "hello world"
    assert line["time"].endswith("Z") and line["time"][10] == "T"
    assert not set(logs.CONTEXT_FIELDS) & set(line)


def test_context_fields_extra_fields_and_exceptions(json_lines: io.StringIO) -> None:
    log = logging.getLogger("tinkerd.test")
    with logs.context(request_id="r1", user="alice", kind=None) as ctx:
        logs.bind(model="run-1", seq_id=3, kind="forward_backward")
        log.info("inside", extra=logs.fields(status=200, latency_ms=1.5))
        assert ctx["model"] == "run-1"
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.info("outside")
    inside, failed, outside = parsed(json_lines)
    assert inside["request_id"] == "r1" and inside["user"] == "alice"
    assert inside["model"] == "run-1" and inside["seq_id"] == 3
    assert inside["kind"] == "forward_backward"
    assert inside["status"] == 200 and inside["latency_ms"] == 1.5
    assert "ValueError: boom" in failed["exc_info"] and failed["request_id"] == "r1"
    assert "request_id" not in outside and "status" not in outside


def test_context_nests_and_follows_copied_contexts(json_lines: io.StringIO) -> None:
    log = logging.getLogger("tinkerd.test")
    logs.bind(user="nobody")  # outside any context: nothing happens
    assert logs.current() == {}
    with logs.context(request_id="outer", user="u"):
        with logs.context(request_id="inner"):
            assert logs.current() == {"request_id": "inner", "user": "u"}
        # A thread started with the context copied (FastAPI's thread pool does this)
        # logs with it, and what it binds is seen by the request.
        ctx = contextvars.copy_context()
        thread = threading.Thread(
            target=ctx.run, args=(lambda: (logs.bind(seq_id=7), log.info("in thread")),)
        )
        thread.start()
        thread.join()
        assert logs.current()["seq_id"] == 7
    [line] = parsed(json_lines)
    assert line["request_id"] == "outer" and line["seq_id"] == 7


def test_configure_sets_the_root_handler_and_mode() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("json")
        assert logs.is_json()
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
        from transformers.utils import logging as transformers_logging

        assert are_progress_bars_disabled()  # library bars would garble a JSON log
        assert not transformers_logging.is_progress_bar_enabled()
        enable_progress_bars()
        transformers_logging.enable_progress_bar()
        assert isinstance(root.handlers[-1].formatter, logs.JsonFormatter)
        logs.configure("text")
        assert not logs.is_json()
        assert not isinstance(root.handlers[-1].formatter, logs.JsonFormatter)
        with pytest.raises(ValueError):
            logs.configure("xml")  # type: ignore[arg-type]
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_setting_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().log_format == "text"
    monkeypatch.setenv("TINKERD_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("TINKERD_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError):
        Settings()


def test_progress_logs_a_line_per_step_in_json_mode(
    json_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_format", "json")
    steps = logs.Progress(2, "converting", logging.getLogger("tinkerd.test"))
    steps.update("one")
    steps.update()
    steps.close()
    first, second = parsed(json_lines)
    assert first["message"] == "converting: 1/2 (one)"
    assert (first["progress"], first["total"]) == (1, 2)
    assert second["message"] == "converting: 2/2"


def test_progress_draws_a_bar_in_text_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert not logs.is_json()
    steps = logs.Progress(2, "converting", logging.getLogger("tinkerd.test"))
    steps.update()
    steps.update()
    steps.close()
    assert "converting: 100%" in capsys.readouterr().err


def make_app() -> FastAPI:
    app = FastAPI()
    app.state.service = object()  # "started"
    users = {KEY: "user-1"}

    def user(key: str) -> str:
        if key not in users:
            raise RuntimeError("unknown key")
        return users[key]

    app.state.authenticator = SimpleNamespace(user=user)

    @app.get("/api/v1/things/{thing_id}")
    def get_thing(thing_id: str) -> dict:  # a sync route: runs in the thread pool
        logging.getLogger("tinkerd.test").info("handling %s", thing_id)
        logs.bind(model=thing_id)
        return {"id": thing_id}

    @app.post("/api/v1/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    app.add_middleware(RequestLog)
    return app


def test_one_request_line_per_request(json_lines: io.StringIO) -> None:
    client = TestClient(make_app(), raise_server_exceptions=False)
    answer = client.get("/api/v1/things/t1?x=1", headers={"X-API-Key": KEY})
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]
    assert (
        client.post("/api/v1/fail", headers={"Authorization": f"Bearer {KEY}"}).status_code == 500
    )
    assert (
        client.get("/nowhere/secret-token", headers={"X-API-Key": "tml-other"}).status_code == 404
    )
    text = json_lines.getvalue()
    assert KEY not in text and "secret-token" not in text and "x=1" not in text
    handling, ok, failed, missing = [
        line
        for line in parsed(json_lines)
        if line["logger"] in ("tinkerd.test", "tinkerd.requests")
    ]
    assert handling["message"] == "handling t1"
    assert handling["request_id"] == request_id and handling["user"] == "user-1"
    assert ok["logger"] == "tinkerd.requests" and ok["level"] == "INFO"
    assert ok["request_id"] == request_id and ok["user"] == "user-1"
    assert ok["method"] == "GET" and ok["route"] == "/api/v1/things/{thing_id}"
    assert ok["status"] == 200 and ok["latency_ms"] >= 0 and ok["model"] == "t1"
    assert '"GET /api/v1/things/{thing_id} HTTP/1.1" 200' in ok["message"]
    assert failed["route"] == "/api/v1/fail" and failed["status"] == 500
    assert failed["user"] == "user-1" and failed["request_id"] != request_id
    assert missing["route"] == "unmatched" and missing["status"] == 404
    assert "user" not in missing  # a refused key: no user


def test_request_line_text_matches_the_access_log_shape(caplog: pytest.LogCaptureFixture) -> None:
    # bench/load.py and some e2e tests count `"METHOD PATH HTTP/x" STATUS` in the log.
    from tinkerd.bench.load import http_statuses

    client = TestClient(make_app())
    with caplog.at_level(logging.INFO, logger="tinkerd.requests"):
        client.get("/api/v1/things/a")
        client.get("/nowhere")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "tinkerd.requests")
    assert http_statuses(text) == {"200": 1, "404": 1}
    assert "user=-" in text  # no key sent


class FakeScheduler:
    def __init__(self) -> None:
        self.next_seq: dict[str, int] = {}

    def wait_applied(self, model_id: str, seq_id: int, timeout: float | None = None) -> bool:
        assert timeout == 0
        return self.next_seq.get(model_id, 0) > seq_id


def test_replay_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    scheduler = FakeScheduler()
    service = SimpleNamespace(schedulers={"base": scheduler})
    report = RecoveryReport(replayed=5, plan=[("base", "a", [4, 5, 6]), ("base", "b", [0, 1])])
    now = [0.0]

    # Each sleep advances the clock by 1 s and the schedulers by one request of each run.
    def sleep(seconds: float) -> None:
        now[0] += seconds
        scheduler.next_seq["a"] = max(scheduler.next_seq.get("a", 4), 4) + 1
        scheduler.next_seq["b"] = scheduler.next_seq.get("b", 0) + 1

    with caplog.at_level(logging.INFO, logger="tinkerd.api.recovery"):
        replay_progress(service, report, every=2.0, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1].startswith("replaying 5 logged requests: 5/5, done in 3.0 s")
    assert messages[:-1] == ["replaying 5 logged requests: 4/5"]  # at t=2 (not at t=1)


def test_replay_progress_is_silent_without_replays(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        replay_progress(SimpleNamespace(schedulers={}), RecoveryReport())  # type: ignore[arg-type]
    assert not caplog.records
