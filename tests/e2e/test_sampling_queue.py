"""The sampling flags of /client/config and /client/dynamic_config, with the official SDK:
`sample_use_retrieve_futures` (one /retrieve_futures long-poll per sampling client, on the
session's completion queue), `sample_join_sampling_session` (unpickled clients get their clone
id from the server) and `sample_cancel_enabled` (abandoned samples are cancelled with
/cancel_future). Results must equal those of a server with the flags off, which polls each
sample with /retrieve_future; the queue's cursor must survive a restart.
"""

import asyncio
import contextlib
import pickle
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from e2e_helpers import Server, free_port, run_server
from tinker import types

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

KEY = "tml-queue"
FLAGS_OFF = {
    "TINKERD_SAMPLE_USE_RETRIEVE_FUTURES": "0",
    "TINKERD_SAMPLE_JOIN_SAMPLING_SESSION": "0",
    "TINKERD_SAMPLE_CANCEL_ENABLED": "0",
}
RETRIEVE_FUTURES_POST = '"POST /api/v1/retrieve_futures HTTP/1.1" 200'
CANCEL_POST = '"POST /api/v1/cancel_future HTTP/1.1" 200'


@pytest.fixture(scope="module")
def plain_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with the three flags off."""
    with run_server(tiny_model_dir, tmp_path_factory.mktemp("plain"), **FLAGS_OFF) as srv:
        yield srv


@pytest.fixture(scope="module")
def clients_of() -> Iterator[Callable[[Server], tinker.ServiceClient]]:
    made: list[tinker.ServiceClient] = []

    def make(server: Server) -> tinker.ServiceClient:
        sc = server.client(KEY)
        made.append(sc)
        return sc

    yield make
    for sc in made:
        with contextlib.suppress(Exception):
            sc.close("success").result(timeout=10)


def http(server: Server, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": key})


def params(seed: int, max_tokens: int = 8) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop=[])


def prompt(i: int) -> types.ModelInput:
    return types.ModelInput.from_ints([40 + i % 7, 50 + i % 5, 60, 70 + i % 3])


def sample_many(client: tinker.SamplingClient, n: int) -> list[types.SampleResponse]:
    """`n` concurrent samples (two sequences each), seeded by their index."""

    async def run() -> list[types.SampleResponse]:
        return await asyncio.gather(
            *(client.sample(prompt(i), num_samples=2, sampling_params=params(i)) for i in range(n))
        )

    return asyncio.run(run())


def sequences(responses: list[types.SampleResponse]) -> list[list[tuple[list[int], list[float]]]]:
    return [[(s.tokens, s.logprobs or []) for s in r.sequences] for r in responses]


def assert_same(got: list[types.SampleResponse], want: list[types.SampleResponse]) -> None:
    for g, w in zip(sequences(got), sequences(want), strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        for (_, lg), (_, lw) in zip(g, w, strict=True):
            assert lg == pytest.approx(lw, rel=1e-4, abs=1e-5)


def test_flags_are_announced(server: Server, plain_server: Server) -> None:
    for srv, on in ((server, True), (plain_server, False)):
        config = httpx.post(f"{srv.base_url}/api/v1/client/config", json={}).json()
        dynamic = httpx.post(f"{srv.base_url}/api/v1/client/dynamic_config", json={}).json()
        assert config["sample_use_retrieve_futures"] is on
        assert config["sample_join_sampling_session"] is on
        assert dynamic["sample_cancel_enabled"] is on
        assert config["custom_loss_server_side"] is True  # its own switch (test_custom_loss.py)


def test_concurrent_samples_match_per_request_polling(
    server: Server, plain_server: Server, clients_of: Callable[[Server], tinker.ServiceClient]
) -> None:
    on = clients_of(server).create_sampling_client(base_model=server.model).result()
    off = clients_of(plain_server).create_sampling_client(base_model=plain_server.model).result()
    polls_before = server.count_in_log(RETRIEVE_FUTURES_POST)
    got, want = sample_many(on, 48), sample_many(off, 48)
    assert_same(got, want)
    assert on._futures_poller is not None and off._futures_poller is None
    assert server.count_in_log(RETRIEVE_FUTURES_POST) > polls_before
    assert plain_server.count_in_log(RETRIEVE_FUTURES_POST) == 0


def test_unpickled_clients_join_with_fresh_clone_ids(
    server: Server, plain_server: Server, clients_of: Callable[[Server], tinker.ServiceClient]
) -> None:
    original = clients_of(server).create_sampling_client(base_model=server.model).result()
    first = sample_many(original, 4)
    clones = [pickle.loads(pickle.dumps(original)) for _ in range(3)]
    results = [sample_many(c, 4) for c in clones]
    assert sorted(c._cloned_sampler_id for c in clones) == [1, 2, 3]  # type: ignore[misc]
    for r in results:
        assert_same(r, first)
    with http(server) as client:
        joined = client.post(
            "/join_sampling_session",
            json={"sampling_session_id": original._sampling_session_id},
        )
        assert joined.json() == {"type": "join_sampling_session", "client_counter": 4}
    # With joining off the SDK picks a random clone id; its samples still come back.
    plain = clients_of(plain_server).create_sampling_client(base_model=plain_server.model).result()
    clone = pickle.loads(pickle.dumps(plain))
    assert clone._cloned_sampler_id not in (None, 0)
    assert_same(sample_many(clone, 4), first)


def _session_futures(server: Server, sampler_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{server.data_dir / 'tinkerd.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT request_id, status FROM futures WHERE model_id = ? ORDER BY seq_id",
            (sampler_id,),
        )
        return list(rows)


def test_cancelled_queued_samples_fail_and_others_complete(
    server: Server, clients_of: Callable[[Server], tinker.ServiceClient]
) -> None:
    """A long sample occupies the sampler; the samples queued behind it are abandoned by
    their callers (the SDK then sends /cancel_future) except a few, which complete."""
    sampler = clients_of(server).create_sampling_client(base_model=server.model).result()
    sid = sampler._sampling_session_id
    long = types.SamplingParams(max_tokens=500, temperature=1.0, seed=1, stop=[])
    blocker = sampler.sample(prompt(0), num_samples=256, sampling_params=long)
    deadline = time.monotonic() + 30
    while not _session_futures(server, sid) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the scheduler has taken the blocker
    victims = [sampler.sample(prompt(i), 1, params(i)) for i in range(24)]
    keepers = [sampler.sample(prompt(i), 1, params(100 + i)) for i in range(4)]
    while len(_session_futures(server, sid)) < 1 + 24 + 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the SDK has read every request id
    cancels_before = server.count_in_log(CANCEL_POST)
    for v in victims:
        v.future().cancel()
    while server.count_in_log(CANCEL_POST) - cancels_before < 24 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not blocker.future().done(), "the blocker ended before the cancellations arrived"
    assert len(blocker.result(timeout=120).sequences) == 256
    for k in keepers:
        assert len(k.result(timeout=60).sequences[0].tokens) == 8
    states = dict(_session_futures(server, sid))
    assert sorted(states.values()).count("failed") == 24
    assert sorted(states.values()).count("complete") == 5
    with http(server) as client:
        failed = [rid for rid, status in states.items() if status == "failed"]
        for rid in failed:
            body = client.post("/retrieve_future", json={"request_id": rid}).json()
            assert body["category"] == "user" and "cancelled" in body["error"]
        # Again, or for a finished sample: nothing happens.
        assert client.post("/cancel_future", json={"request_id": failed[0]}).json() == {
            "cancelled": False
        }
        done = next(rid for rid, status in states.items() if status == "complete")
        r = client.post("/cancel_future", json={"request_id": done})
        assert r.status_code == 200 and r.json() == {"cancelled": False}
    # Each finished or failed request took one place in the session's queue.
    with sqlite3.connect(f"file:{server.data_dir / 'tinkerd.db'}?mode=ro", uri=True) as db:
        places = db.execute("SELECT completion_seq FROM futures WHERE model_id = ?", (sid,))
        assert sorted(p for (p,) in places) == list(range(1, 30))


def test_training_requests_are_not_cancellable(server: Server) -> None:
    with http(server) as client:
        session = client.post(
            "/create_session", json={"tags": [], "sdk_version": "0.38.0", "user_metadata": {}}
        ).json()["session_id"]
        create = client.post(
            "/create_model",
            json={"session_id": session, "model_seq_id": 0, "base_model": server.model},
        ).json()
        r = client.post("/cancel_future", json={"request_id": create["request_id"]})
        assert r.status_code == 400
        assert "only sample requests can be cancelled" in r.json()["detail"]


CLONE = 7  # a client id the raw requests below use (the SDK's clients use 0 and 1)


def raw_sample(client: httpx.Client, sid: str, n: int) -> str:
    body = {
        "sampling_session_id": sid,
        "seq_id": CLONE * 1_000_000_000 + n,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [41, 42, 43]}]},
        "sampling_params": {"max_tokens": 4, "seed": n},
    }
    r = client.post("/asample", json=body)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def poll(client: httpx.Client, sid: str, cursor: int, timeout: float | None = None) -> dict:
    body: dict = {"target": {"sampling_session_id": sid, "cloned_sampler_id": CLONE}}
    body |= {"prev_cursor": cursor, "timeout": timeout}
    r = client.post("/retrieve_futures", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def poll_until(client: httpx.Client, sid: str, cursor: int, n: int) -> tuple[list[str], int]:
    """Long-poll from `cursor` until `n` completions came; (their request ids, the cursor)."""
    ids: list[str] = []
    while len(ids) < n:
        answer = poll(client, sid, cursor)
        ids += [c["request_id"] for c in answer["completions"]]
        cursor = answer["cursor"]
    return ids, cursor


def test_cursor_survives_a_restart(
    tiny_model_dir: Path, tmp_path: Path, clients_of: Callable[[Server], tinker.ServiceClient]
) -> None:
    port = free_port()
    with run_server(tiny_model_dir, tmp_path, port=port) as srv:
        sampler = clients_of(srv).create_sampling_client(base_model=srv.model).result()
        before = sample_many(sampler, 6)
        sid = sampler._sampling_session_id
        sample_many(pickle.loads(pickle.dumps(sampler)), 1)  # joins as client 1
        with http(srv) as client:
            sent = [raw_sample(client, sid, n) for n in range(3)]
            got, cursor = poll_until(client, sid, 0, 3)
            assert sorted(got) == sorted(sent)
    with run_server(tiny_model_dir, tmp_path, port=port) as srv:
        # The same SDK client carries on: its poller's cursor is still valid.
        assert_same(sample_many(sampler, 6), before)
        with http(srv) as client:
            assert poll(client, sid, cursor, timeout=0) == {"completions": [], "cursor": cursor}
            new = raw_sample(client, sid, 3)
            got, after = poll_until(client, sid, cursor, 1)
            assert got == [new] and after > cursor
            # A fresh poller (cursor 0) of this client starts after what was acknowledged
            # (`cursor`, sent above), not from the session's beginning.
            assert [c["request_id"] for c in poll(client, sid, 0, 0)["completions"]] == [new]
            # Client ids handed out (or used) before the restart are not handed out again.
            joined = client.post("/join_sampling_session", json={"sampling_session_id": sid})
            assert joined.json()["client_counter"] == CLONE + 1
