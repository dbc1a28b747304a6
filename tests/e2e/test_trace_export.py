"""Session traces: `RestClient.export_session_trace` and `tinker session export-trace` return a
signed URL serving a Chrome trace-event JSON of the session (tinkerd/api/traces.py)."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from e2e_helpers import adam, sft_datum
from tinker import types

KEY = "tml-trace-export"
OTHER = "tml-trace-other"
SEQ = [115, 117, 114, 102, 97, 99, 101, 32, 116, 101, 115, 116]


@pytest.fixture(scope="module")
def session(clients, server) -> dict[str, Any]:
    """A short SDK loop (and another user's concurrent one); the session id and its trace."""
    sc, other = clients(KEY), clients(OTHER)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=1).result()
    otc = other.create_lora_training_client(base_model=server.model, rank=4, seed=2).result()
    fbs = [tc.forward_backward([sft_datum(SEQ)] * 2, "cross_entropy")]
    fbs.append(otc.forward_backward([sft_datum(SEQ[:8])], "cross_entropy"))
    for fb in fbs:
        fb.result()
    tc.optim_step(adam(1e-2)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=3, temperature=0.0)
    sampler.sample(types.ModelInput.from_ints(SEQ[:5]), 2, params).result()
    session_id = tc.model_id.split(":train:")[0]
    url = tinker.RestClient(base_url=server.base_url, api_key=KEY).export_session_trace(session_id)
    url = url.result(timeout=60)
    got = httpx.get(url, timeout=60)  # no API key: the signed URL alone
    assert got.status_code == 200, got.text
    return {"id": session_id, "url": url, "trace": json.loads(got.content), "text": got.text}


def requests_of(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and "request_id" in e["args"]]


def inside(child: dict[str, Any], parent: dict[str, Any]) -> bool:
    return (
        child["pid"] == parent["pid"]
        and child["tid"] == parent["tid"]
        and parent["ts"] <= child["ts"]
        and child["ts"] + child["dur"] <= parent["ts"] + parent["dur"] + 1e-3
    )


def test_trace_is_valid_and_matches_the_requests(session) -> None:
    trace = session["trace"]
    assert isinstance(trace["traceEvents"], list)
    for e in trace["traceEvents"]:
        assert {"name", "ph", "pid", "tid"} <= e.keys()
        if e["ph"] == "X":
            assert isinstance(e["ts"], int | float) and e["dur"] >= 0
    names = Counter(e["name"] for e in requests_of(trace))
    assert names == {
        "create_model": 1,
        "forward_backward": 1,
        "optim_step": 1,
        "save_weights_for_sampler": 1,
        "sample": 1,
    }, names
    assert all(e["args"]["status"] == "complete" for e in requests_of(trace))


def test_queue_compute_and_batches_nest_in_their_request(session) -> None:
    events = [e for e in session["trace"]["traceEvents"] if e["ph"] == "X"]
    for req in requests_of(session["trace"]):
        queue = [e for e in events if e["name"] == "queue" and inside(e, req)]
        compute = [e for e in events if e["name"] == "compute" and inside(e, req)]
        assert len(queue) == 1 and len(compute) == 1, req
        assert queue[0]["ts"] + queue[0]["dur"] <= compute[0]["ts"] + 1e-3
        batches = [e for e in events if e["name"].endswith("_batch") and inside(e, req)]
        assert all(inside(b, compute[0]) for b in batches)
        if req["name"] == "forward_backward":
            assert batches and all(b["name"] == "micro_batch" for b in batches)
            args = batches[0]["args"]
            assert args["rows"] == 2 and args["tokens"] == 2 * (len(SEQ) - 1)
            assert args["batch_rows"] >= 2 and args["other_tenants"] >= 0
        if req["name"] == "sample":
            assert [b["name"] for b in batches] == ["sample_batch"]
            assert batches[0]["args"]["rows"] == 2 and batches[0]["args"]["sampled_tokens"] >= 2


def test_trace_names_no_other_user(session) -> None:
    text = session["text"]
    assert KEY not in text and OTHER not in text
    assert "tml-" not in text


def test_signed_url_is_bound_to_its_session(session, server) -> None:
    tampered = session["url"].replace("token=", "token=x")
    assert httpx.get(tampered).status_code == 403
    token = session["url"].split("token=", 1)[1]
    other = f"{server.base_url}/api/v1/sessions/00000000-0000-0000-0000-000000000000/trace_export"
    got = httpx.get(other, params={"token": token})
    assert got.status_code == 403 and "detail" in got.json()
    # Without a token the route needs the owner's API key; another user sees a 404.
    got = httpx.get(
        f"{server.base_url}/api/v1/sessions/{session['id']}/trace_export",
        headers={"X-API-Key": OTHER},
    )
    assert got.status_code == 404


def test_cli_export_trace_downloads_it(session, server, tmp_path: Path) -> None:
    out = tmp_path / "session.pftrace"
    env = {**os.environ, "TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": KEY}
    tinker_cli = Path(sys.executable).parent / "tinker"
    done = subprocess.run(
        [str(tinker_cli), "session", "export-trace", session["id"], "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    trace = json.loads(out.read_text())
    assert Counter(e["name"] for e in requests_of(trace)) == Counter(
        e["name"] for e in requests_of(session["trace"])
    )
