"""Prometheus `/metrics` (tinkerd/api/metrics.py): counters move with an SDK loop, access is
controlled, and the Grafana dashboard only queries metrics that exist."""

import json
import re
from pathlib import Path

import httpx
import pytest
from e2e_helpers import adam, sft_datum
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from tinkerd.api.app import create_app
from tinkerd.config import Settings

KEY = "tml-metrics"
SEQ = [115, 117, 114, 102, 97, 99, 101, 32, 116, 101, 115, 116]
DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
# Names a series can carry beyond its family's name.
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def scrape(base_url: str) -> tuple[str, dict[tuple[str, frozenset], float]]:
    got = httpx.get(f"{base_url}/metrics", timeout=30)
    assert got.status_code == 200, got.text
    values = {}
    for family in text_string_to_metric_families(got.text):
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return got.text, values


def total(values: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def scrapes(clients, server) -> tuple[dict, dict, str]:
    """/metrics before and after an SDK loop (forward_backward, optim_step, sample)."""
    _, before = scrape(server.base_url)
    sc = clients(KEY)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=3).result()
    tc.forward_backward([sft_datum(SEQ)], "cross_entropy").result()
    tc.optim_step(adam(1e-2)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=3, temperature=0.0)
    sampler.sample(types.ModelInput.from_ints(SEQ[:5]), 2, params).result()
    text, after = scrape(server.base_url)
    return before, after, text


def test_counters_move_with_an_sdk_loop(scrapes, server) -> None:
    before, after, _ = scrapes

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = "/api/v1/forward_backward"
    assert moved("tinkerd_http_requests_total", route=route, status="200") >= 1
    assert moved("tinkerd_http_request_duration_seconds_count", route=route) >= 1
    assert moved("tinkerd_tokens_trained_total", model=server.model) == len(SEQ) - 1
    assert moved("tinkerd_tokens_sampled_total", model=server.model) >= 2
    for kind in ("create_model", "forward_backward", "optim_step", "sample"):
        assert moved("tinkerd_futures_created_total", kind=kind) >= 1, kind
        assert moved("tinkerd_futures_completed_total", kind=kind) >= 1, kind
    assert moved("tinkerd_queue_wait_seconds_count", model=server.model) >= 4
    assert moved("tinkerd_micro_batch_rows_count", model=server.model) >= 1
    assert moved("tinkerd_micro_batch_padding_ratio_count", model=server.model) >= 1
    assert moved("tinkerd_sample_batch_requests_count", model=server.model) >= 1
    # Gauges read at scrape time.
    assert total(after, "tinkerd_runs_in_memory", model=server.model) >= 1
    assert total(after, "tinkerd_run_memory_bytes", model=server.model) > 0
    assert total(after, "tinkerd_snapshots_in_memory", model=server.model) >= 1
    assert ("tinkerd_queue_depth", frozenset({("model", server.model)})) in after
    assert ("tinkerd_futures_pending", frozenset()) in after
    # One in-process worker, ready, never lost (Ray replicas: tests/ray/).
    assert total(after, "tinkerd_replicas", model=server.model, state="ready") == 1
    assert total(after, "tinkerd_replicas", model=server.model, state="restarting") == 0
    assert total(after, "tinkerd_replica_losses_total", model=server.model) == 0
    # Route templates, never raw paths with ids.
    routes = {dict(ls).get("route") for n, ls in after if n == "tinkerd_http_requests_total"}
    assert not any(KEY in r or ":train:" in r for r in routes if r)


def test_metrics_access_control(tmp_path: Path) -> None:
    """In-process apps (no lifespan): the test client is not a loopback client."""
    settings = {"data_dir": tmp_path, "models": []}
    with_token = TestClient(create_app(Settings(**settings, metrics_token="s3cret")))
    missing = with_token.get("/metrics")
    assert missing.status_code == 401 and "detail" in missing.json()
    wrong = with_token.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and "detail" in wrong.json()
    ok = with_token.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and "tinkerd_http_requests" in ok.text

    no_token = TestClient(create_app(Settings(**settings)))
    refused = no_token.get("/metrics")
    assert refused.status_code == 403 and "loopback" in refused.json()["detail"]

    off = TestClient(create_app(Settings(**settings, metrics_enabled=False)))
    assert off.get("/metrics").status_code == 404

    # Each app has its own registry: the 401 and 403 above are counted in their app alone.
    own = with_token.app.state.metrics.exposition().decode()
    others = no_token.app.state.metrics.exposition().decode()
    assert 'status="401"' in own and 'status="401"' not in others


def test_grafana_dashboard_queries_only_exported_metrics(scrapes) -> None:
    _, after, text = scrapes
    families = set(re.findall(r"^# TYPE (\w+)", text, flags=re.M))
    samples = {name for name, _ in after}
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict]) -> list[dict]:
        return [q for p in items for q in [p, *panels(p.get("panels", []))]]

    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        names = set(re.findall(r"\btinkerd_\w+", expr))
        assert names, expr
        for name in names:
            family = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
            assert name in samples or name in families or family in families, (name, expr)
