"""Sampling sessions' completion queues (/retrieve_futures), clone ids (/join_sampling_session)
and queued-sample cancellation, below HTTP: the store on SQLite and PostgreSQL (the fixtures of
test_store.py), the hub's shared waiters, the scheduler's queue."""

import asyncio
import threading

from sqlalchemy import create_engine, inspect
from test_store import postgres_url, store, url  # noqa: F401  (fixtures)

from tinkerd.api.futures import FutureHub
from tinkerd.engine.ops import Op, Sample
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.engine.worker_handle import ModelFront
from tinkerd.store import FutureRecord, SamplingSessionRecord, Store
from tinkerd.store.store import CLIENT_SEQ_BLOCK

SID = "s1:sample:0"


def _sampler(db: Store, sid: str = SID) -> None:
    db.create_sampling_session(
        SamplingSessionRecord(sampling_session_id=sid, session_id="s1", user="u", base_model="m")
    )


def _sample(db: Store, rid: str, seq: int, sid: str | None = SID) -> None:
    db.create_future(
        FutureRecord(
            request_id=rid, user="u", kind="sample", request=b"{}", model_id=sid, seq_id=seq
        )
    )


def test_queue_numbers_finished_samples_in_order(store: Store) -> None:  # noqa: F811
    _sampler(store)
    for i in range(4):
        _sample(store, f"r{i}", i)
    _sample(store, "loose", 0, sid=None)  # a sample of no sampling session: in no queue
    assert store.complete_future("r2", b"abc", "proto")
    assert store.fail_future("r0", "boom", "user")
    assert store.complete_future("loose", b"x", "proto")
    assert not store.complete_future("r2", b"again", "proto")  # first outcome wins
    got = store.completions(SID, 0, 0, 100)
    assert [(c.request_id, c.status, c.cursor, c.payload_size) for c in got] == [
        ("r2", "complete", 1, 3),
        ("r0", "failed", 2, None),
    ]
    assert store.completions(SID, 0, 1, 100)[0].request_id == "r0"
    assert store.completions(SID, 0, 2, 100) == []
    store.complete_future("r1", b"", "proto")
    store.complete_future("r3", b"", "proto")
    assert [c.cursor for c in store.completions(SID, 0, 0, 1)] == [1]  # limit


def test_queue_is_per_client_block(store: Store) -> None:  # noqa: F811
    _sampler(store)
    _sample(store, "orig", 5)
    _sample(store, "clone", 3 * CLIENT_SEQ_BLOCK + 5)
    store.complete_future("clone", b"c", "proto")
    store.complete_future("orig", b"o", "proto")
    assert [c.request_id for c in store.completions(SID, 0, 0, 10)] == ["orig"]
    assert [(c.request_id, c.cursor) for c in store.completions(SID, 3, 0, 10)] == [("clone", 1)]


def test_join_hands_out_fresh_ids_above_used_blocks(store: Store) -> None:  # noqa: F811
    _sampler(store)
    _sampler(store, "s1:sample:1")
    assert store.join_sampling_session(SID) == 1
    assert store.join_sampling_session(SID) == 2
    assert store.join_sampling_session("s1:sample:1") == 1
    _sample(store, "random-clone", 40 * CLIENT_SEQ_BLOCK + 7)  # an id the SDK picked itself
    assert store.join_sampling_session(SID) == 41


def test_acks_never_move_back(store: Store) -> None:  # noqa: F811
    _sampler(store)
    assert store.acked_cursor(SID, 0) == 0
    store.ack_cursor(SID, 0, 5)
    store.ack_cursor(SID, 0, 3)
    assert store.acked_cursor(SID, 0) == 5
    assert store.acked_cursor(SID, 1) == 0


def test_concurrent_finishes_get_distinct_places(store: Store) -> None:  # noqa: F811
    _sampler(store)
    for i in range(40):
        _sample(store, f"r{i}", i)
    threads = [
        threading.Thread(target=store.complete_future, args=(f"r{i}", b"x", "proto"))
        for i in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.cursor for c in store.completions(SID, 0, 0, 100)) == list(range(1, 41))


def test_database_without_the_column_is_upgraded(url: str) -> None:  # noqa: F811
    with Store(url) as s:
        _sampler(s)
        _sample(s, "old", 0)
    engine = create_engine(url)
    with engine.begin() as conn:  # as a database made before completion queues existed
        conn.exec_driver_sql("DROP INDEX ix_futures_completion")
        conn.exec_driver_sql("ALTER TABLE futures DROP COLUMN completion_seq")
        conn.exec_driver_sql("DROP TABLE sampling_clients")
    engine.dispose()
    with Store(url) as s:
        columns = {c["name"] for c in inspect(s.engine).get_columns("futures")}
        indexes = {i["name"] for i in inspect(s.engine).get_indexes("futures")}
        assert "completion_seq" in columns and "ix_futures_completion" in indexes
        assert s.complete_future("old", b"r", "proto")
        assert [c.cursor for c in s.completions(SID, 0, 0, 10)] == [1]
        assert s.join_sampling_session(SID) == 1
    with Store(url) as s:  # opening an up-to-date database changes nothing
        assert [c.request_id for c in s.completions(SID, 0, 0, 10)] == ["old"]


def test_hub_waiter_stays_while_another_poller_waits() -> None:
    async def run() -> bool:
        hub = FutureHub()
        hub.bind(asyncio.get_running_loop())
        first, second = hub.waiter("q"), hub.waiter("q")
        assert first is second
        hub.forget("q", first)  # one poller leaves; the other still waits
        hub.notify("q", FutureRecord(request_id="x", user="", kind="", request=b""))
        await asyncio.wait_for(second.event.wait(), 1)
        hub.forget("q", second)
        return hub.waiter("q") is not second

    assert asyncio.run(run())


class _Worker:
    """Enough of a worker handle for a scheduler that is never started."""

    class info:
        name = "fake"

    def front(self) -> ModelFront:
        return ModelFront(self.info, None, None, "fake")  # type: ignore[arg-type]


def test_cancel_takes_only_queued_samples() -> None:
    scheduler = ModelScheduler(_Worker())  # type: ignore[arg-type]
    failed: list[str] = []

    def op(rid: str) -> Op:
        return Op(rid, Sample(None), lambda _: None, lambda e: failed.append(rid))  # type: ignore[arg-type]

    for rid in ("a", "b", "c"):
        scheduler.submit(op(rid))
    taken = scheduler.cancel_sample("b")
    assert taken is not None and taken.request_id == "b"
    assert scheduler.cancel_sample("b") is None
    assert scheduler.cancel_sample("unknown") is None
    assert [o.request_id for o in scheduler._samples] == ["a", "c"]
    assert failed == []  # the caller fails it
