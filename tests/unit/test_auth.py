"""The X-API-Key rule (tinkerd/api/auth.py) against a real SQLite store, with a fake clock for
the cache."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tinkerd.api.auth import (
    REGISTERED_USER_PREFIX,
    Authenticator,
    AuthError,
    check_key_name,
    hash_key,
    is_loopback,
    register_key,
    zero_setup_user,
)
from tinkerd.config import Settings
from tinkerd.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(f"sqlite:///{tmp_path / 'tinkerd.db'}") as s:
        yield s


def test_zero_setup_each_tml_key_is_its_own_user(store: Store) -> None:
    auth = Authenticator(store)
    a, b = auth.user("tml-a"), auth.user("tml-b")
    assert a != b and a == zero_setup_user("tml-a") == hash_key("tml-a")[:32]
    assert not a.startswith(REGISTERED_USER_PREFIX)
    with pytest.raises(AuthError, match="missing"):
        auth.user(None)
    with pytest.raises(AuthError, match="missing"):
        auth.user("")
    with pytest.raises(AuthError, match="malformed"):
        auth.user("sk-abc")


def test_registered_keys_replace_zero_setup_and_share_a_user_by_name(store: Store) -> None:
    clock = Clock()
    auth = Authenticator(store, cache_seconds=1.0, clock=clock)
    assert auth.user("tml-anyone")  # zero-setup, and cached
    rec1, key1 = register_key(store, "alice")
    _, key2 = register_key(store, "alice")
    _, key3 = register_key(store, "bob")
    assert key1.startswith("tml-") and len(key1) > 40 and key1 != key2
    assert store.get_api_key(rec1.key_id).key_hash == hash_key(key1)  # type: ignore[union-attr]
    assert auth.user("tml-anyone")  # the cache is still fresh
    clock.now = 1.0
    with pytest.raises(AuthError, match="unknown API key"):
        auth.user("tml-anyone")
    assert auth.user(key1) == auth.user(key2) == "key:alice"
    assert auth.user(key3) == "key:bob"
    with pytest.raises(AuthError, match="missing"):
        auth.user(None)

    store.revoke_api_key(rec1.key_id)
    assert auth.user(key1) == "key:alice"  # until the cache expires
    clock.now = 2.5
    with pytest.raises(AuthError, match=f"API key {rec1.key_id} has been revoked"):
        auth.user(key1)
    assert auth.user(key2) == "key:alice"


def test_revoking_every_key_locks_instead_of_reopening(store: Store) -> None:
    auth = Authenticator(store, cache_seconds=0.0)
    rec, key = register_key(store, "alice")
    store.revoke_api_key(rec.key_id)
    with pytest.raises(AuthError, match="revoked"):
        auth.user(key)
    with pytest.raises(AuthError, match="unknown"):
        auth.user("tml-anyone")


@pytest.mark.parametrize("name", ["alice", "a.b-c_d@example.com", "x" * 128, "7+1"])
def test_good_key_names(name: str) -> None:
    assert check_key_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "-lead", "x" * 129, "tab\t", "é"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid key name"):
        check_key_name(name)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_insecure_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINKERD_INSECURE", raising=False)
    assert Settings().insecure is False
    monkeypatch.setenv("TINKERD_INSECURE", "1")
    assert Settings().insecure is True
