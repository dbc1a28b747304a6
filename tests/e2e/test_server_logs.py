"""`TINKERD_LOG_FORMAT=json`: the server logs JSON lines, one per HTTP request with its id,
user, route, status and latency, and never the API key."""

import json
from pathlib import Path

from e2e_helpers import adam, run_server, sft_datum

from tinkerd.api.auth import zero_setup_user

KEY = "tml-logs-e2e-secret"
SEQ = [104, 101, 108, 108, 111, 32, 108, 111, 103, 115]


def json_lines(text: str) -> list[dict]:
    lines = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


def test_json_request_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    with run_server(tiny_model_dir, tmp_path, TINKERD_LOG_FORMAT="json") as server:
        tc = (
            server.client(KEY).create_lora_training_client(base_model=server.model, rank=4).result()
        )
        fb = tc.forward_backward([sft_datum(SEQ)], "cross_entropy").result(timeout=120)
        assert fb.metrics["loss:sum"] > 0
        tc.optim_step(adam(1e-3)).result(timeout=120)
        log = server.log()
    assert KEY not in log
    lines = json_lines(log)
    assert lines, log[-3000:]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    # uvicorn's own lines go through the same formatter; its access log is off.
    assert any(line["message"] == "Application startup complete." for line in lines)
    assert not any(line["logger"] == "uvicorn.access" for line in lines)
    requests = [line for line in lines if line["logger"] == "tinkerd.requests"]
    fb_lines = [line for line in requests if line["route"] == "/api/v1/forward_backward"]
    assert len(fb_lines) == 1, requests
    [line] = fb_lines
    assert line["level"] == "INFO" and line["method"] == "POST" and line["status"] == 200
    assert len(line["request_id"]) == 32
    assert line["user"] == zero_setup_user(KEY)
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    # The service binds what the request is about (training run, seq_id, kind).
    assert line["model"] == tc.model_id and line["seq_id"] == 1
    assert line["kind"] == "forward_backward"
    # Every request has its own id; health checks (no key) have no user.
    assert len({r["request_id"] for r in requests}) == len(requests)
    health = [r for r in requests if r["route"] == "/api/v1/healthz"]
    assert health and all("user" not in r for r in health)
