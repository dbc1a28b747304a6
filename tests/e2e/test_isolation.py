"""Per-user isolation: user B can reach none of user A's sessions, training runs, futures,
sampling sessions or checkpoints through any route, and the answer is exactly the one for an
id that does not exist.

User A builds one of everything (a session, a trained run, weights, sampler weights, an
external export with its download URL, a sampling session, a snapshot sampler and a future).
Each case below calls one route as B with A's ids, and again with "ghost" ids of the same
shape that exist nowhere; both must answer the same status and, ids aside, the same body.
`test_every_route_with_an_id_is_covered` enumerates the app's routes and fails when a route
that takes an id or a path (in the URL or the body) has no case, so new routes can't slip by.
"""

import inspect
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import httpx
import pytest
import tinker
from e2e_helpers import Server, adam, sft_datum
from fastapi.routing import APIRoute
from pydantic import BaseModel

from tinkerd.api import console, proto
from tinkerd.api.routes import router
from tinkerd.checkpoints import downloads

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

KEY_A, KEY_B = "tml-iso-owner", "tml-iso-intruder"
SEQ = [105, 115, 111, 108, 97, 116, 101, 100]  # "isolated"
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": SEQ[:3]}]}
SAMPLING = {"max_tokens": 2}


@dataclass(frozen=True)
class World:
    """One user's objects (or ghosts of the same shape that exist nowhere)."""

    session_id: str
    model_id: str
    request_id: str
    sampler_id: str  # created from model_path=sampler_weights
    snapshot_sampler_id: str  # save_weights_and_get_sampling_client
    weights: str
    sampler_weights: str
    external: str
    download_token: str  # signed for `external`'s adapter_config.json

    def checkpoint_id(self, path: str) -> str:
        return path.removeprefix(f"tinker://{self.model_id}/")

    def normalize(self, text: str) -> str:
        """`text` with this world's ids replaced by their field names (longest first, since
        paths contain the model id, which contains the session id)."""
        values = [(getattr(self, f.name), f.name) for f in fields(self)]
        for value, name in sorted(values, key=lambda v: -len(v[0])):
            text = text.replace(value, f"<{name}>")
        return text


def http(server: Server, api_key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": api_key}, timeout=60
    )


def build_world(server: Server, sc: tinker.ServiceClient, api_key: str) -> World:
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=5).result()
    tc.forward_backward([sft_datum(SEQ)], "cross_entropy").result()
    tc.optim_step(adam(1e-2)).result()
    weights = tc.save_state("iso").result().path
    sampler_weights = tc.save_weights_for_sampler("iso").result().path
    external = tc.save_weights_external("iso").result().path
    tc.save_weights_and_get_sampling_client().result()
    session_id = tc.model_id.split(":train:")[0]
    rest = tinker.RestClient(base_url=server.base_url, api_key=api_key)
    (snapshot_sampler_id,) = rest.get_session(session_id).result().sampler_ids
    url = rest.get_external_weights_urls(external).result().urls["adapter_config.json"]
    with http(server, api_key) as client:
        sampler = client.post(
            "/create_sampling_session",
            json={
                "session_id": session_id,
                "sampling_session_seq_id": 900,
                "model_path": sampler_weights,
            },
        )
        assert sampler.status_code == 200, sampler.text
        future = client.post(
            "/create_model",
            json={"session_id": session_id, "model_seq_id": 901, "base_model": server.model},
        )
        assert future.status_code == 200, future.text
    return World(
        session_id=session_id,
        model_id=tc.model_id,
        request_id=future.json()["request_id"],
        sampler_id=sampler.json()["sampling_session_id"],
        snapshot_sampler_id=snapshot_sampler_id,
        weights=weights,
        sampler_weights=sampler_weights,
        external=external,
        download_token=url.rsplit("/", 1)[1],
    )


def ghost_world(like: World) -> World:
    """Ids of the same shape as `like`'s that name nothing; the download token is signed with
    a secret other than the server's, as B would have to."""
    session = str(uuid.uuid4())
    model = f"{session}:train:0"
    external = f"tinker://{model}/external_weights/iso"
    return World(
        session_id=session,
        model_id=model,
        request_id=str(uuid.uuid4()),
        sampler_id=f"{session}:sample:900",
        snapshot_sampler_id=f"{session}:sample:0",
        weights=f"tinker://{model}/weights/iso",
        sampler_weights=f"tinker://{model}/sampler_weights/iso",
        external=external,
        download_token=forge_token(model, "external_weights/iso"),
    )


def forge_token(run_id: str, checkpoint_id: str) -> str:
    grant = downloads.DownloadGrant(run_id, checkpoint_id, "adapter_config.json", 2**40)
    return downloads.sign(b"not the server's secret, 32 bytes!", grant)


@dataclass(frozen=True)
class Worlds:
    a: World  # the owner's
    b: World  # the intruder's own, for the fields a case does not aim at A
    a_forged: World  # A's ids, with a token B forged for A's export


@pytest.fixture(scope="module")
def worlds(server: Server, clients: Callable[[str], tinker.ServiceClient]) -> Worlds:
    a = build_world(server, clients(KEY_A), KEY_A)
    b = build_world(server, clients(KEY_B), KEY_B)
    a_forged = World(
        **{
            **{f.name: getattr(a, f.name) for f in fields(a)},
            "download_token": forge_token(a.model_id, a.checkpoint_id(a.external)),
        }
    )
    return Worlds(a, b, a_forged)


@pytest.fixture(scope="module")
def intruder(server: Server) -> Iterator[httpx.Client]:
    with http(server, KEY_B) as client:
        yield client


# -- one case per (route, id fields) -------------------------------------------------------

# call(target, own, client, server): B's request aimed at `target`'s objects.
Call = Callable[[World, World, httpx.Client, Server], httpx.Response]


@dataclass(frozen=True)
class Case:
    method: str
    route: str  # as in the router, e.g. /api/v1/training_runs/{run_id}
    fields: frozenset[str]  # the id fields (path or body) aimed at the target
    call: Call
    status: int = 404

    @property
    def name(self) -> str:
        return f"{self.method} {self.route} [{','.join(sorted(self.fields))}]"


CASES: list[Case] = []


def case(method: str, route: str, *id_fields: str, status: int = 404) -> Callable[[Call], Call]:
    def register(call: Call) -> Call:
        CASES.append(Case(method, f"/api/v1{route}", frozenset(id_fields), call, status))
        return call

    return register


def _ckpt(t: World, path: str) -> str:
    return f"/training_runs/{t.model_id}/checkpoints/{t.checkpoint_id(path)}"


@case("POST", "/session_heartbeat", "session_id")
def _heartbeat(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/session_heartbeat", json={"session_id": t.session_id})


@case("POST", "/sessions/{session_id}/finish", "session_id")
def _finish(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post(f"/sessions/{t.session_id}/finish")


@case("GET", "/sessions/{session_id}", "session_id")
def _get_session(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/sessions/{t.session_id}")


@case("PUT", "/sessions/{session_id}/project", "session_id")
def _session_project(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.put(f"/sessions/{t.session_id}/project", json={"project_id": "p"})


@case("GET", "/sessions/{session_id}/trace_export", "session_id")
def _trace_export(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/sessions/{t.session_id}/trace_export")


@case("GET", "/sessions/{session_id}/trace_export", "session_id", status=403)
def _trace_download_forged(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    """B cannot sign a trace URL for A's session: refused as for a session that doesn't exist."""
    grant = downloads.DownloadGrant(t.session_id, "session_trace", "tml-iso-a", 2**40)
    token = downloads.sign(b"not the server's secret, 32 bytes!", grant)
    url = f"{s.base_url}/api/v1/sessions/{t.session_id}/trace_export"
    return httpx.get(url, params={"token": token})


@case("GET", "/billing/{rest}", "rest")
def _billing_get(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/billing/{t.session_id}")


@case("POST", "/billing/{rest}", "rest")
def _billing_post(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post(f"/billing/{t.model_id}")


@case("POST", "/create_model", "session_id")
def _create_model(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"session_id": t.session_id, "model_seq_id": 7, "base_model": s.model}
    return c.post("/create_model", json=body)


@case("POST", "/get_info", "model_id")
def _get_info(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/get_info", json={"model_id": t.model_id})


@case("POST", "/forward_backward", "model_id")
def _forward_backward(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    msg = proto.ForwardBackwardRequest(model_id=t.model_id, seq_id=1000, loss_fn="cross_entropy")
    headers = {"Content-Type": "application/x-protobuf"}
    return c.post("/forward_backward", content=msg.SerializeToString(), headers=headers)


@case("POST", "/optim_step", "model_id")
def _optim_step(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"model_id": t.model_id, "seq_id": 1000, "adam_params": {"learning_rate": 1.0}}
    return c.post("/optim_step", json=body)


@case("POST", "/save_weights", "model_id", "path")
def _save_weights(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"model_id": t.model_id, "seq_id": 1000, "path": "iso", "overwrite": True}
    return c.post("/save_weights", json=body)


@case("POST", "/save_weights_for_sampler", "model_id", "path")
def _save_for_sampler(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post(
        "/save_weights_for_sampler", json={"model_id": t.model_id, "seq_id": 1000, "path": "iso"}
    )


@case("POST", "/save_weights_for_sampler", "model_id")
def _snapshot(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"model_id": t.model_id, "seq_id": 1000, "sampling_session_seq_id": 77}
    return c.post("/save_weights_for_sampler", json=body)


@case("POST", "/save_weights_external", "model_id", "path")
def _save_external(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"model_id": t.model_id, "seq_id": 1000, "path": "iso"}
    return c.post("/save_weights_external", json=body)


@case("POST", "/load_weights", "path")
def _load_into_new_run(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"session_id": o.session_id, "model_seq_id": 40, "path": t.weights, "optimizer": True}
    return c.post("/load_weights", json=body)


@case("POST", "/load_weights", "session_id")
def _load_into_their_session(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"session_id": t.session_id, "model_seq_id": 41, "path": o.weights}
    return c.post("/load_weights", json=body)


@case("POST", "/load_weights", "model_id")
def _load_into_their_run(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/load_weights", json={"model_id": t.model_id, "seq_id": 1000, "path": o.weights})


@case("POST", "/create_sampling_session", "session_id")
def _sampler_in_their_session(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"session_id": t.session_id, "sampling_session_seq_id": 50, "base_model": s.model}
    return c.post("/create_sampling_session", json=body)


@case("POST", "/create_sampling_session", "model_path")
def _sampler_of_their_weights(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"session_id": o.session_id, "sampling_session_seq_id": 51, "model_path": t.weights}
    return c.post("/create_sampling_session", json=body)


@case("GET", "/samplers/{sampler_id}", "sampler_id")
def _get_sampler(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/samplers/{t.sampler_id}")


@case("GET", "/samplers/{sampler_id}", "sampler_id")
def _get_snapshot_sampler(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/samplers/{t.snapshot_sampler_id}")


@case("POST", "/asample", "sampling_session_id")
def _sample_their_sampler(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"sampling_session_id": t.sampler_id, "prompt": PROMPT, "sampling_params": SAMPLING}
    return c.post("/asample", json=body)


@case("POST", "/asample", "sampling_session_id")
def _sample_their_snapshot(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"sampling_session_id": t.snapshot_sampler_id, "prompt": PROMPT, "seq_id": 5}
    return c.post("/asample", json={**body, "sampling_params": SAMPLING})


@case("POST", "/asample", "model_path")
def _sample_their_weights(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"model_path": t.sampler_weights, "prompt": PROMPT, "sampling_params": SAMPLING}
    return c.post("/asample", json={**body, "base_model": s.model})


@case("POST", "/retrieve_future", "request_id")
def _retrieve_future(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/retrieve_future", json={"request_id": t.request_id})


@case("POST", "/retrieve_futures", "sampling_session_id")
def _retrieve_futures(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"target": {"sampling_session_id": t.sampler_id}, "prev_cursor": 0, "timeout": 0}
    return c.post("/retrieve_futures", json=body)


@case("POST", "/retrieve_futures", "sampling_session_id")
def _retrieve_snapshot_futures(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    target = {"sampling_session_id": t.snapshot_sampler_id, "cloned_sampler_id": 1}
    return c.post("/retrieve_futures", json={"target": target, "prev_cursor": 5})


@case("POST", "/cancel_future", "request_id")
def _cancel_future(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/cancel_future", json={"request_id": t.request_id})


@case("POST", "/join_sampling_session", "sampling_session_id")
def _join_sampling_session(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/join_sampling_session", json={"sampling_session_id": t.snapshot_sampler_id})


@case("GET", "/training_runs/{run_id}", "run_id")
def _get_run(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/training_runs/{t.model_id}")


@case("GET", "/training_runs/{run_id}/checkpoints", "run_id")
def _run_checkpoints(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/training_runs/{t.model_id}/checkpoints")


@case(
    "POST", "/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish", "run_id", "checkpoint_id"
)
def _publish(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post(f"{_ckpt(t, t.weights)}/publish")


@case(
    "DELETE",
    "/training_runs/{run_id}/checkpoints/{checkpoint_id}/publish",
    "run_id",
    "checkpoint_id",
)
def _unpublish(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.delete(f"{_ckpt(t, t.sampler_weights)}/publish")


@case("PUT", "/training_runs/{run_id}/checkpoints/{checkpoint_id}/ttl", "run_id", "checkpoint_id")
def _ttl(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.put(f"{_ckpt(t, t.weights)}/ttl", json={"ttl_seconds": 1})


@case(
    "GET",
    "/training_runs/{run_id}/checkpoints/{checkpoint_id}/external_weights_urls",
    "run_id",
    "checkpoint_id",
)
def _external_urls(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"{_ckpt(t, t.external)}/external_weights_urls")


@case("GET", "/downloads/{token}", "token", status=403)
def _download(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    """B cannot sign a token for A's export: refused exactly as for a file that doesn't exist
    (the signature is checked before anything is looked up)."""
    return httpx.get(f"{s.base_url}/api/v1/downloads/{t.download_token}")


@case("DELETE", "/training_runs/{run_id}/checkpoints/{checkpoint_id}", "run_id", "checkpoint_id")
def _delete_weights(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.delete(_ckpt(t, t.weights))


@case("DELETE", "/training_runs/{run_id}/checkpoints/{checkpoint_id}", "run_id", "checkpoint_id")
def _delete_external(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.delete(_ckpt(t, t.external))


@case("POST", "/weights_info", "tinker_path")
def _weights_info(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/weights_info", json={"tinker_path": t.weights})


@case("POST", "/export_merged", "path")
def _export_merged(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.post("/export_merged", json={"path": t.weights})


@case("POST", "/copy_weights", "source_path")
def _copy_theirs(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"source_path": t.weights, "destination_project_id": "mine"}
    return c.post("/copy_weights", json=body, headers={"X-Idempotency-Key": str(uuid.uuid4())})


@case("POST", "/copy_weights", "session_id")
def _copy_into_their_session(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    body = {"source_path": o.weights, "session_id": t.session_id, "model_seq_id": 60}
    return c.post("/copy_weights", json=body)


@case("POST", "/create_custom_loss", "session_id")
def _custom_loss_in_their_session(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    out = {"tuple": [{"ref": "logprobs"}, {"dict": {}}]}
    nodes = [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
        {"op": "output", "name": "output", "target": "output", "args": [out]},
    ]
    body = {
        "session_id": t.session_id,
        "custom_loss_seq_id": 0,
        "name": "iso",
        "inputs": [{"name": "logprobs", "rank": 1}],
        "graph": {"format": 1, "nodes": nodes},
    }
    return c.post("/create_custom_loss", json=body)


@case("GET", "/console/training_runs/{run_id}/metrics", "run_id")
def _console_run_metrics(t: World, o: World, c: httpx.Client, s: Server) -> httpx.Response:
    return c.get(f"/console/training_runs/{t.model_id}/metrics")


# Raw (protobuf) bodies the router can't describe: their id fields, by route.
RAW_BODY_ID_FIELDS = {("POST", "/api/v1/forward_backward"): {"model_id"}}
# Field names that are counters or labels, not ids of a user's objects.
NOT_IDS = {"seq_id", "model_seq_id", "sampling_session_seq_id", "project_id"}
NOT_IDS |= {"destination_project_id", "custom_loss_seq_id"}


def is_id_field(name: str) -> bool:
    return name not in NOT_IDS and (
        name.endswith("_id") or name.endswith("path") or name in {"token", "rest"}
    )


def route_id_fields(route: APIRoute) -> set[str]:
    """Every id the route takes: path parameters, id fields of its pydantic body, and the
    declared ids of raw bodies (a route that reads a raw body must be declared)."""
    found = {p for p in _path_params(route.path) if is_id_field(p)}
    for param in inspect.signature(route.endpoint).parameters.values():
        annotation = param.annotation
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            found |= {f for f in annotation.model_fields if is_id_field(f)}
    if "request.body()" in inspect.getsource(route.endpoint):
        for method in route.methods:
            key = (method, _template(route.path))
            assert key in RAW_BODY_ID_FIELDS, f"{key} reads a raw body: declare its id fields"
            found |= RAW_BODY_ID_FIELDS[key]
    return found


def _path_params(path: str) -> list[str]:
    return re.findall(r"\{(\w+)", path)


def _template(path: str) -> str:
    """A route path without converters: /x/{checkpoint_id:path} -> /x/{checkpoint_id}."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def test_every_route_with_an_id_is_covered() -> None:
    covered: dict[tuple[str, str], set[str]] = {}
    for c in CASES:
        covered.setdefault((c.method, c.route), set()).update(c.fields)
    missing = []
    all_routes = [*router.routes, *console.router.routes]  # the console's JSON too
    routes = [r for r in all_routes if isinstance(r, APIRoute)]
    for route in routes:
        wanted = route_id_fields(route)
        for method in sorted(route.methods):
            uncovered = wanted - covered.get((method, _template(route.path)), set())
            if uncovered:
                missing.append(f"{method} {route.path}: {sorted(uncovered)}")
    assert not missing, "routes taking ids with no isolation case:\n" + "\n".join(missing)
    known = {(m, _template(r.path)) for r in routes for m in r.methods}
    assert not {(c.method, c.route) for c in CASES} - known, "a case names a route that is gone"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_other_users_ids_answer_as_if_they_did_not_exist(
    c: Case, worlds: Worlds, intruder: httpx.Client, server: Server
) -> None:
    a = worlds.a_forged if c.route.startswith("/api/v1/downloads/") else worlds.a
    ghost = ghost_world(a)
    at_a = c.call(a, worlds.b, intruder, server)
    at_ghost = c.call(ghost, worlds.b, intruder, server)
    assert at_a.status_code == c.status, at_a.text
    assert at_ghost.status_code == c.status, at_ghost.text
    detail_a, detail_ghost = at_a.json()["detail"], at_ghost.json()["detail"]
    assert any(w in detail_a for w in ("not found", "not available", "invalid download token"))
    assert a.normalize(detail_a) == ghost.normalize(detail_ghost)


def test_list_endpoints_show_only_own_items(worlds: Worlds, intruder: httpx.Client) -> None:
    a, b = worlds.a, worlds.b
    sessions = intruder.get("/sessions", params={"limit": 1000}).json()["sessions"]
    assert b.session_id in sessions and a.session_id not in sessions
    runs = intruder.get("/training_runs", params={"limit": 1000}).json()
    run_ids = {r["training_run_id"] for r in runs["training_runs"]}
    assert b.model_id in run_ids and not any(r.startswith(a.session_id) for r in run_ids)
    assert runs["cursor"]["total_count"] == len(run_ids)
    assert len({r["model_owner"] for r in runs["training_runs"]}) == 1
    checkpoints = intruder.get("/checkpoints", params={"limit": 1000}).json()
    paths = {c["tinker_path"] for c in checkpoints["checkpoints"]}
    assert b.weights in paths and not any(a.model_id in p for p in paths)
    assert checkpoints["cursor"]["total_count"] == len(paths)
    children = intruder.get(f"/sessions/{b.session_id}").json()
    assert not any(
        a.session_id in i for i in children["training_run_ids"] + children["sampler_ids"]
    )


def test_console_lists_show_only_own_items(worlds: Worlds, intruder: httpx.Client) -> None:
    a, b = worlds.a, worlds.b
    samplers = intruder.get("/console/samplers").json()["samplers"]
    ids = {s["sampling_session_id"] for s in samplers}
    assert b.sampler_id in ids and not any(a.session_id in i for i in ids)
    status = intruder.get("/console/status").json()
    assert status["user"] != a.session_id
    for failed in status["recent_errors"]:
        assert a.session_id not in (failed["model_id"] or "")


def test_sdk_calls_on_other_users_objects_raise_not_found(
    worlds: Worlds, server: Server, clients: Callable[[str], tinker.ServiceClient]
) -> None:
    a = worlds.a
    sc = clients(KEY_B)
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY_B)
    calls: dict[str, Callable[[], Any]] = {
        "from_state": lambda: sc.create_training_client_from_state(a.weights),
        "from_state_with_optimizer": lambda: sc.create_training_client_from_state_with_optimizer(
            a.weights
        ),
        "sampling_client": lambda: sc.create_sampling_client(model_path=a.sampler_weights),
        "get_training_run": lambda: rest.get_training_run(a.model_id).result(),
        "run_by_path": lambda: rest.get_training_run_by_tinker_path(a.weights).result(),
        "weights_info": lambda: rest.get_weights_info_by_tinker_path(a.weights).result(),
        "list_checkpoints": lambda: rest.list_checkpoints(a.model_id).result(),
        "external_urls": lambda: rest.get_external_weights_urls(a.external).result(),
        "delete": lambda: rest.delete_checkpoint_from_tinker_path(a.weights).result(),
        "publish": lambda: rest.publish_checkpoint_from_tinker_path(a.weights).result(),
        "unpublish": lambda: rest.unpublish_checkpoint_from_tinker_path(a.weights).result(),
        "ttl": lambda: rest.set_checkpoint_ttl_from_tinker_path(a.weights, 3600).result(),
        "copy": lambda: rest.copy_weights(a.weights, "mine").result(),
        "get_session": lambda: rest.get_session(a.session_id).result(),
        "get_sampler": lambda: rest.get_sampler(a.sampler_id).result(),
        "get_snapshot": lambda: rest.get_sampler(a.snapshot_sampler_id).result(),
    }
    succeeded = []
    for name, call in calls.items():
        try:
            result = call()
            if hasattr(result, "result"):
                result.result()
            succeeded.append(name)
        except tinker.NotFoundError:
            pass
    assert not succeeded


def test_owner_keeps_everything_and_published_checkpoints_are_readable(
    worlds: Worlds, server: Server, clients: Callable[[str], tinker.ServiceClient]
) -> None:
    """After all of B's attempts A's objects are intact; then A publishes, and B may load and
    sample it (Tinker's publish semantics) but still not list, change or delete it."""
    a = worlds.a
    with http(server, KEY_A) as owner:
        assert (
            owner.post("/session_heartbeat", json={"session_id": a.session_id}).status_code == 200
        )
        listed = owner.get(f"/training_runs/{a.model_id}/checkpoints").json()["checkpoints"]
        by_path = {c["tinker_path"]: c for c in listed}
        assert {a.weights, a.sampler_weights, a.external} <= set(by_path)
        assert not any(c["public"] or c["expires_at"] for c in listed)
        assert owner.get(f"/samplers/{a.sampler_id}").status_code == 200
        done = owner.post("/retrieve_future", json={"request_id": a.request_id})
        assert done.status_code == 200 and "error" not in done.text
        got = httpx.get(f"{server.base_url}/api/v1/downloads/{a.download_token}")
        assert got.status_code == 200
        assert owner.post(f"{_ckpt(a, a.weights)}/publish").status_code == 200
        assert owner.post(f"{_ckpt(a, a.sampler_weights)}/publish").status_code == 200

    b = clients(KEY_B)
    b.create_training_client_from_state(a.weights).result()
    b.create_sampling_client(model_path=a.sampler_weights).result()
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY_B)
    copied = rest.copy_weights(a.weights, "mine").result()
    assert copied.startswith("tinker://copy-")
    with http(server, KEY_B) as intruder:
        sample = {"model_path": a.sampler_weights, "prompt": PROMPT, "sampling_params": SAMPLING}
        assert intruder.post("/asample", json=sample).status_code == 200
        for response in (
            intruder.get(f"/training_runs/{a.model_id}/checkpoints"),
            intruder.delete(_ckpt(a, a.weights)),
            intruder.delete(f"{_ckpt(a, a.weights)}/publish"),
            intruder.put(f"{_ckpt(a, a.weights)}/ttl", json={"ttl_seconds": 1}),
            intruder.get(f"{_ckpt(a, a.external)}/external_weights_urls"),
        ):
            assert response.status_code == 404, response.text
        paths = {c["tinker_path"] for c in intruder.get("/checkpoints").json()["checkpoints"]}
        assert a.weights not in paths
