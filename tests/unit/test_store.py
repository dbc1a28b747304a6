"""The durable store, on SQLite (a file) and on a real PostgreSQL server started by the tests.

Every behaviour test runs on both backends through the parametrized `url` fixture. The
PostgreSQL server comes from the Debian binaries (`apt-get install postgresql`); without them
those cases are skipped.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError

from tinkerd.store import (
    ApiKeyRecord,
    CheckpointRecord,
    FutureRecord,
    SamplingSessionRecord,
    SessionRecord,
    Store,
    TrainingRunRecord,
)
from tinkerd.store.db import (
    ApiKeyRow,
    Base,
    CheckpointRow,
    FutureRow,
    SamplingSessionRow,
    SessionRow,
    TrainingRunRow,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


# PostgreSQL server (one per test session)


def _pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin dir, or the one holding `initdb` on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(workdir: Path) -> Callable[[list[str]], list[str]]:
    """PostgreSQL refuses to run as root: when we are root, run its commands as `postgres`
    (created if missing) and give that user the work dir."""
    if os.geteuid() != 0:
        return lambda cmd: cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", "postgres"],
            check=True,
            capture_output=True,
        )
    shutil.chown(workdir, "postgres", "postgres")
    if shutil.which("runuser"):
        return lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]
    return lambda cmd: ["su", "postgres", "-s", "/bin/sh", "-c", subprocess.list2cmdline(cmd)]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Start a throwaway PostgreSQL server on a free local port; yield a database URL."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed: pip install -e .[dev]")
    # Not pytest's tmp_path: its parents are private to root, and the server user must enter it.
    workdir = Path(tempfile.mkdtemp(prefix="tinkerd-pg-"))
    data, log = workdir / "data", workdir / "server.log"
    as_user = _as_server_user(workdir)
    port = _free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run(as_user(list(cmd)), capture_output=True, text=True, cwd=workdir)
        if proc.returncode != 0:
            detail = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout}{proc.stderr}{detail}")

    try:
        run(
            str(bindir / "initdb"),
            "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -F"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
            ) as conn:
                conn.execute("CREATE DATABASE tinkerd_test")
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/tinkerd_test"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# Stores under test


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with empty tables, per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tinkerd.db'}"
        return
    pg_url = request.getfixturevalue("postgres_url")
    yield pg_url
    engine = create_engine(pg_url)
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store(url) as s:
        yield s


def _session(sid: str = "s1", user: str = "alice", **kw: object) -> SessionRecord:
    return SessionRecord(session_id=sid, user=user, **kw)  # type: ignore[arg-type]


def _run(model_id: str = "s1:train:0", user: str = "alice", **kw: object) -> TrainingRunRecord:
    rec = TrainingRunRecord(
        model_id=model_id,
        session_id=model_id.split(":")[0],
        user=user,
        base_model="tiny",
        lora_rank=8,
        lora_config={"rank": 8, "train_mlp": True, "train_attn": True, "train_unembed": False},
    )
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def _future(
    request_id: str, seq_id: int | None = None, model_id: str | None = "m", **kw: object
) -> FutureRecord:
    values: dict[str, object] = {"kind": "forward_backward", "request": b"\x00\x01payload", **kw}
    return FutureRecord(
        request_id=request_id,
        user="alice",
        model_id=model_id,
        seq_id=seq_id,
        **values,  # type: ignore[arg-type]
    )


def _ckpt(name: str, run: str = "m", user: str = "alice", **kw: object) -> CheckpointRecord:
    return CheckpointRecord(
        training_run_id=run,
        checkpoint_id=f"weights/{name}",
        checkpoint_type="training",
        tinker_path=f"tinker://{run}/weights/{name}",
        user=user,
        **kw,  # type: ignore[arg-type]
    )


def _is_utc(dt: datetime | None) -> bool:
    return dt is not None and dt.utcoffset() == timedelta(0)


# sessions


def test_session_roundtrip_sets_utc_timestamps(store: Store) -> None:
    store.create_session(
        _session(tags=["a", "b"], user_metadata={"k": [1, {"x": None}]}, sdk_version="0.38.0")
    )
    got = store.get_session("s1", "alice")
    assert got is not None
    assert got.tags == ["a", "b"] and got.user_metadata == {"k": [1, {"x": None}]}
    assert got.sdk_version == "0.38.0" and not got.finished
    assert _is_utc(got.created_at) and _is_utc(got.last_heartbeat)
    assert abs(datetime.now(UTC) - got.created_at) < timedelta(minutes=1)  # type: ignore[operator]
    assert store.get_session("nope", "alice") is None


def test_session_isolation(store: Store) -> None:
    store.create_session(_session())
    assert store.get_session("s1", "mallory") is None
    assert store.list_sessions("mallory", 10, 0) == []


def test_heartbeat_and_finish(store: Store) -> None:
    store.create_session(_session(created_at=T0, last_heartbeat=T0))
    assert store.heartbeat("s1") is True
    assert store.heartbeat("unknown") is False
    got = store.get_session("s1", "alice")
    assert got is not None and got.last_heartbeat > T0 and got.created_at == T0  # type: ignore[operator]
    assert store.finish_session("s1") is True
    assert store.get_session("s1", "alice").finished is True  # type: ignore[union-attr]


def test_list_sessions_newest_first_with_paging(store: Store) -> None:
    for i in range(5):
        store.create_session(_session(f"s{i}", created_at=T0 + timedelta(seconds=i)))
    store.create_session(_session("other", user="bob"))
    assert [s.session_id for s in store.list_sessions("alice", 10, 0)] == [
        "s4", "s3", "s2", "s1", "s0",
    ]  # fmt: skip
    assert [s.session_id for s in store.list_sessions("alice", 2, 1)] == ["s3", "s2"]


def test_session_children(store: Store) -> None:
    store.create_session(_session())
    store.create_training_run(_run("s1:train:0", created_at=T0))
    store.create_training_run(_run("s1:train:1", created_at=T0 + timedelta(seconds=1)))
    store.create_training_run(_run("s2:train:0"))
    store.create_sampling_session(SamplingSessionRecord("s1:sample:0", "s1", "alice", "tiny"))
    assert store.session_children("s1") == (["s1:train:0", "s1:train:1"], ["s1:sample:0"])
    assert store.session_children("none") == ([], [])


# training runs


def test_training_run_roundtrip_and_isolation(store: Store) -> None:
    store.create_training_run(_run(user_metadata={"note": "hi"}))
    got = store.get_training_run("s1:train:0", "alice")
    assert got is not None
    assert got.lora_config == _run().lora_config and got.user_metadata == {"note": "hi"}
    assert got.last_seq_id == 0 and _is_utc(got.created_at) and _is_utc(got.last_request_time)
    assert store.get_training_run("s1:train:0", "mallory") is None
    assert store.get_training_run("s1:train:0") == got  # internal: no ownership check
    assert store.get_training_run("missing") is None


def test_list_training_runs_page_and_total(store: Store) -> None:
    for i in range(5):
        store.create_training_run(_run(f"s1:train:{i}", created_at=T0 + timedelta(seconds=i)))
    store.create_training_run(_run("s9:train:0", user="bob"))
    page, total = store.list_training_runs("alice", 2, 1)
    assert [r.model_id for r in page] == ["s1:train:3", "s1:train:2"] and total == 5
    assert store.list_training_runs("mallory", 10, 0) == ([], 0)


def test_set_last_seq_id_and_touch(store: Store) -> None:
    store.create_training_run(_run(last_request_time=T0))
    assert store.set_last_seq_id("s1:train:0", 7) is True
    assert store.touch_training_run("s1:train:0") is True
    got = store.get_training_run("s1:train:0")
    assert got is not None and got.last_seq_id == 7 and got.last_request_time > T0  # type: ignore[operator]
    assert store.set_last_seq_id("missing", 1) is False
    assert store.touch_training_run("missing") is False


# futures


def test_future_roundtrip(store: Store) -> None:
    created = store.create_future(_future("r1", seq_id=1))
    assert created.status == "pending" and _is_utc(created.created_at)
    got = store.get_future("r1")
    assert got == created
    assert isinstance(got.request, bytes) and got.request == b"\x00\x01payload"
    assert store.get_future("missing") is None


def test_future_repeat_of_model_seq_returns_existing(store: Store) -> None:
    first = store.create_future(_future("r1", seq_id=1))
    again = store.create_future(_future("r2", seq_id=1, kind="optim_step"))
    assert again == first and again.request_id == "r1" and again.kind == "forward_backward"
    assert store.get_future("r2") is None
    store.complete_future("r1", b"done", "json")  # a retry after completion sees the result
    assert store.create_future(_future("r3", seq_id=1)).result == b"done"
    assert store.create_future(_future("r4", seq_id=2)).request_id == "r4"
    assert store.create_future(_future("r5", seq_id=1, model_id="other")).request_id == "r5"


def test_future_dedupe_under_concurrency(store: Store) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list[str] = []
    errors: list[BaseException] = []

    def submit(i: int) -> None:
        try:
            barrier.wait()
            results.append(store.create_future(_future(f"r{i}", seq_id=5)).request_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == n and len(set(results)) == 1
    assert [f.request_id for f in store.futures_for_model("m", 0)] == results[:1]


def test_future_without_seq_is_never_deduped(store: Store) -> None:
    store.create_future(_future("a", model_id=None))
    store.create_future(_future("b", model_id=None))
    store.create_future(_future("c", model_id="m", seq_id=None))
    store.create_future(_future("d", model_id="m", seq_id=None))
    assert {f.request_id for f in store.unfinished_futures()} == {"a", "b", "c", "d"}
    with pytest.raises(IntegrityError):  # a reused request_id is a bug, not a retry
        store.create_future(_future("a", model_id=None))
    with pytest.raises(IntegrityError):
        store.create_future(_future("a", seq_id=9))


def test_complete_and_fail_future_first_outcome_wins(store: Store) -> None:
    store.create_future(_future("ok", seq_id=1))
    store.create_future(_future("bad", seq_id=2))
    assert store.complete_future("ok", b"\x08\x01", "proto") is True
    assert store.fail_future("bad", "boom", "user") is True
    ok, bad = store.get_future("ok"), store.get_future("bad")
    assert ok is not None and bad is not None
    assert (ok.status, ok.result, ok.result_type, ok.error) == (
        "complete",
        b"\x08\x01",
        "proto",
        None,
    )
    assert (bad.status, bad.error, bad.category, bad.result) == ("failed", "boom", "user", None)
    assert _is_utc(ok.completed_at) and _is_utc(bad.completed_at)
    assert store.fail_future("ok", "late", "server") is False
    assert store.complete_future("bad", b"late", "json") is False
    assert store.get_future("ok") == ok and store.get_future("bad") == bad
    assert store.complete_future("missing", b"", "json") is False


def test_unfinished_futures_oldest_first(store: Store) -> None:
    store.create_future(_future("late", seq_id=2, created_at=T0 + timedelta(seconds=2)))
    store.create_future(_future("early", seq_id=1, created_at=T0))
    store.create_future(_future("done", seq_id=3, created_at=T0 + timedelta(seconds=1)))
    store.complete_future("done", b"{}", "json")
    assert [f.request_id for f in store.unfinished_futures()] == ["early", "late"]


def test_futures_for_model_in_seq_order(store: Store) -> None:
    for seq in (3, 1, 4, 2):
        store.create_future(_future(f"r{seq}", seq_id=seq))
    store.create_future(_future("x", seq_id=2, model_id="other"))
    assert [f.seq_id for f in store.futures_for_model("m", 2)] == [2, 3, 4]
    assert store.futures_for_model("nobody", 0) == []


def test_seq_ids_beyond_2_pow_53(store: Store) -> None:
    big = 7 * 1_000_000_000 * 1_000_000_000 + 3  # a cloned sampling client's seq ids, > 2^53
    store.create_future(_future("big", seq_id=big))
    assert store.get_future("big").seq_id == big  # type: ignore[union-attr]
    assert store.create_future(_future("again", seq_id=big)).request_id == "big"


def test_concurrent_writers_and_readers(store: Store) -> None:
    """Threads like the API threadpool and the engine: no lock errors, nothing lost."""
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(15):
                rid = f"t{t}-{i}"
                store.create_future(_future(rid, seq_id=i, model_id=f"m{t}"))
                assert store.get_future(rid) is not None
                store.complete_future(rid, b"r", "json")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.unfinished_futures() == []
    assert all(len(store.futures_for_model(f"m{t}", 0)) == 15 for t in range(6))


# checkpoints


def test_checkpoint_add_get_and_replace(store: Store) -> None:
    store.add_checkpoint(_ckpt("a", size_bytes=10, user_metadata={"step": 1}))
    got = store.get_checkpoint("m", "weights/a")
    assert got is not None and got.size_bytes == 10 and got.user_metadata == {"step": 1}
    assert _is_utc(got.created_at) and got.public is False and got.expires_at is None
    store.add_checkpoint(_ckpt("a", size_bytes=20))
    again = store.get_checkpoint("m", "weights/a")
    assert again is not None and again.size_bytes == 20 and again.user_metadata == {}
    assert store.list_checkpoints("alice")[1] == 1
    assert store.get_checkpoint("m", "weights/b") is None


def test_list_checkpoints_filter_paging_isolation(store: Store) -> None:
    for i in range(4):
        store.add_checkpoint(_ckpt(f"c{i}", created_at=T0 + timedelta(seconds=i)))
    store.add_checkpoint(_ckpt("x", run="m2", created_at=T0 + timedelta(seconds=10)))
    store.add_checkpoint(_ckpt("bobs", run="b", user="bob"))
    page, total = store.list_checkpoints("alice")
    assert [c.checkpoint_id for c in page][:2] == ["weights/x", "weights/c3"] and total == 5
    page, total = store.list_checkpoints("alice", "m", limit=2, offset=1)
    assert [c.checkpoint_id for c in page] == ["weights/c2", "weights/c1"] and total == 4
    assert store.list_checkpoints("mallory") == ([], 0)
    assert store.list_checkpoints("alice", "b") == ([], 0)  # bob's run: not alice's


def test_delete_checkpoint(store: Store) -> None:
    store.add_checkpoint(_ckpt("a"))
    assert store.delete_checkpoint("m", "weights/a") is True
    assert store.get_checkpoint("m", "weights/a") is None
    assert store.delete_checkpoint("m", "weights/a") is False


def test_checkpoint_ttl_public_and_expiry(store: Store) -> None:
    store.add_checkpoint(_ckpt("soon"))
    store.add_checkpoint(_ckpt("later"))
    store.add_checkpoint(_ckpt("never"))
    assert store.set_checkpoint_ttl("m", "weights/soon", T0 + timedelta(hours=1)) is True
    # Any timezone goes in; UTC comes out and comparisons are by instant.
    plus2 = datetime(2025, 1, 1, 7, tzinfo=timezone(timedelta(hours=2)))  # 05:00 UTC
    assert store.set_checkpoint_ttl("m", "weights/later", plus2) is True
    assert store.get_checkpoint("m", "weights/later").expires_at == T0 + timedelta(hours=5)  # type: ignore[union-attr]
    assert store.expired_checkpoints(T0) == []
    expired = store.expired_checkpoints(T0 + timedelta(hours=6))
    assert [c.checkpoint_id for c in expired] == ["weights/soon", "weights/later"]
    assert store.set_checkpoint_ttl("m", "weights/soon", None) is True
    assert [c.checkpoint_id for c in store.expired_checkpoints(T0 + timedelta(days=9))] == [
        "weights/later"
    ]
    assert store.set_checkpoint_public("m", "weights/never", True) is True
    assert store.get_checkpoint("m", "weights/never").public is True  # type: ignore[union-attr]
    assert store.set_checkpoint_public("m", "weights/missing", True) is False
    assert store.set_checkpoint_ttl("m", "weights/missing", None) is False


def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        store.create_session(_session(created_at=datetime(2025, 1, 1)))


# sampling sessions


def test_sampling_session_roundtrip_and_isolation(store: Store) -> None:
    rec = SamplingSessionRecord(
        "s1:sample:0", "s1", "alice", "tiny", model_path="tinker://m/x/y", snapshot_of="s1:train:0"
    )
    store.create_sampling_session(rec)
    got = store.get_sampling_session("s1:sample:0", "alice")
    assert got is not None and got.model_path == "tinker://m/x/y" and _is_utc(got.created_at)
    assert got.snapshot_of == "s1:train:0"
    assert store.get_sampling_session("s1:sample:0") == got
    assert store.get_sampling_session("s1:sample:0", "mallory") is None
    assert store.get_sampling_session("missing") is None


# durability and configuration


def test_acknowledged_future_survives_reopen(url: str) -> None:
    with Store(url) as first:
        first.create_session(_session())
        acked = first.create_future(_future("r1", seq_id=1))
        first.add_checkpoint(_ckpt("a"))
    with Store(url) as second:
        assert second.get_future("r1") == acked
        assert second.unfinished_futures() == [acked]
        assert second.get_session("s1", "alice") is not None
        assert second.get_checkpoint("m", "weights/a") is not None
        assert second.create_future(_future("retry", seq_id=1)).request_id == "r1"


def test_sqlite_is_wal_with_full_sync(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


@pytest.mark.parametrize(
    ("record", "row"),
    [
        (SessionRecord, SessionRow),
        (TrainingRunRecord, TrainingRunRow),
        (FutureRecord, FutureRow),
        (CheckpointRecord, CheckpointRow),
        (SamplingSessionRecord, SamplingSessionRow),
    ],
)
def test_every_record_field_has_a_column(record: type, row: type[Base]) -> None:
    """The store copies records to rows by field name: a new record field needs a column."""
    assert {f.name for f in fields(record)} == set(row.__table__.columns.keys())


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        Store("mysql://localhost/db")


# API keys


def _key(key_id: str, name: str = "alice", **kw: object) -> ApiKeyRecord:
    return ApiKeyRecord(key_id=key_id, name=name, key_hash=f"hash-{key_id}", **kw)  # type: ignore[arg-type]


def test_api_key_roundtrip_list_and_revoke(store: Store) -> None:
    assert store.list_api_keys() == []
    store.create_api_key(_key("k1", created_at=T0))
    store.create_api_key(_key("k2", name="bob", created_at=T0 + timedelta(seconds=1)))
    first = store.get_api_key("k1")
    assert first is not None and first.name == "alice" and first.key_hash == "hash-k1"
    assert first.created_at == T0 and first.revoked_at is None
    assert [k.key_id for k in store.list_api_keys()] == ["k1", "k2"]
    assert store.get_api_key("missing") is None

    assert store.revoke_api_key("k1") is True
    revoked = store.get_api_key("k1")
    assert revoked is not None and _is_utc(revoked.revoked_at)
    assert store.revoke_api_key("k1") is False  # already revoked: the first time stays
    assert store.get_api_key("k1") == revoked
    assert store.revoke_api_key("missing") is False
    assert store.get_api_key("k2").revoked_at is None  # type: ignore[union-attr]


def test_api_key_hash_and_id_are_unique(store: Store) -> None:
    store.create_api_key(_key("k1"))
    duplicate_hash = ApiKeyRecord(key_id="k2", name="bob", key_hash="hash-k1")
    with pytest.raises(IntegrityError):
        store.create_api_key(duplicate_hash)
    with pytest.raises(IntegrityError):
        store.create_api_key(_key("k1", name="carol"))
    assert [k.key_id for k in store.list_api_keys()] == ["k1"]


def test_api_key_record_fields_have_columns() -> None:
    assert {f.name for f in fields(ApiKeyRecord)} == set(ApiKeyRow.__table__.columns.keys())
