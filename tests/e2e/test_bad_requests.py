"""Malformed requests get a 4xx whose JSON body says what is wrong; the server keeps serving."""

import httpx
import pytest
from e2e_helpers import Server


@pytest.fixture
def http(server: Server) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": "tml-bad-requests"}
    )


def session_id(http: httpx.Client) -> str:
    return http.post("/create_session", json={"sdk_version": "0.38.0"}).json()["session_id"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/create_model", {"model_seq_id": 0, "lora_config": {"rank": 8}}, "base_model"),
        ("/create_model", {"base_model": "x", "lora_config": {"rank": 0}}, "rank"),
        ("/create_model", {"base_model": "x", "lora_config": {"rank": "eight"}}, "rank"),
        ("/optim_step", {"model_id": "m", "seq_id": 1, "adam_params": {"beta1": 2}}, "beta1"),
        ("/asample", {"num_samples": 1, "sampling_session_id": "s", "seq_id": 0}, "prompt"),
        ("/retrieve_future", {}, "request_id"),
    ],
)
def test_invalid_json_names_the_field(
    http: httpx.Client, path: str, body: dict, field: str
) -> None:
    body = {"session_id": session_id(http), **body}
    response = http.post(path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert field in response.text


def test_unparseable_bodies_and_missing_key(http: httpx.Client, server: Server) -> None:
    bad_json = http.post(
        "/create_session", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 422 and bad_json.json()["detail"]
    bad_proto = http.post(
        "/forward_backward",
        content=b"\xff\xff\xff",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert bad_proto.status_code == 400 and bad_proto.json()["detail"]
    no_key = httpx.post(f"{server.base_url}/api/v1/create_session", json={})
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
    unknown = http.post("/retrieve_future", json={"request_id": "no-such-request"})
    assert unknown.status_code == 404 and "no-such-request" in unknown.json()["detail"]
    # The server is still serving.
    assert http.get("/healthz").json() == {"status": "ok"}
    assert session_id(http)
