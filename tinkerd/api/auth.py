"""Who is calling: the X-API-Key → user id rule, and registered keys.

Two modes, decided by the `api_keys` table (written by `tinkerd keys ...`):

* **zero-setup** (no key was ever registered): any key starting with `tml-` is accepted and
  each distinct key is its own user, `sha256(key)[:32]` (32 hex characters);
* **registered** (at least one key registered, even if all are revoked since): only
  registered, unrevoked keys are accepted, and the user is `key:<name>`, so keys with the same
  name share runs and checkpoints (rotation). The `key:` prefix can never be a zero-setup id.
  Revoking the last key locks the server instead of reopening it to any key.

The table is cached whole for `CACHE_SECONDS`, so keys created or revoked by the CLI while the
server runs take effect within that time without a database read per request.
"""

import hashlib
import ipaddress
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinkerd.store.records import ApiKeyRecord
from tinkerd.store.store import Store

KEY_PREFIX = "tml-"
REGISTERED_USER_PREFIX = "key:"
CACHE_SECONDS = 1.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


class AuthError(Exception):
    """Why a request's key is refused (answered 401 with this message)."""


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def zero_setup_user(api_key: str) -> str:
    """The user id of an unregistered key (unchanged from before keys could be registered, so
    existing data stays reachable)."""
    return hash_key(api_key)[:32]


def registered_user(name: str) -> str:
    return REGISTERED_USER_PREFIX + name


def check_key_name(name: str) -> str:
    """A key name is a user name: printable, no spaces, at most 128 characters."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid key name {name!r}: use 1-128 letters, digits and . _ @ + - "
            "(starting with a letter or digit)"
        )
    return name


def register_key(store: Store, name: str) -> tuple[ApiKeyRecord, str]:
    """Create and store a new key for user `name`; returns (its record, the key itself), the
    only time the key exists in clear."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    rec = ApiKeyRecord(
        key_id=secrets.token_hex(4), name=check_key_name(name), key_hash=hash_key(api_key)
    )
    store.create_api_key(rec)
    return rec, api_key


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and `localhost`.
    Any other name counts as reachable from outside."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Keys:
    by_hash: dict[str, ApiKeyRecord]
    loaded_at: float


class Authenticator:
    """Maps X-API-Key values to user ids with the rule above (thread-safe)."""

    def __init__(
        self,
        store: Store,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: _Keys | None = None

    def _current(self) -> _Keys:
        keys = self._keys
        if keys is not None and self._clock() - keys.loaded_at < self._cache_seconds:
            return keys
        with self._lock:  # one reload at a time; the others use what it loaded
            keys = self._keys
            if keys is None or self._clock() - keys.loaded_at >= self._cache_seconds:
                records = self._store.list_api_keys()
                keys = _Keys({r.key_hash: r for r in records}, self._clock())
                self._keys = keys
            return keys

    def user(self, api_key: str | None) -> str:
        """The user id of `api_key`, or AuthError saying why it is refused."""
        if not api_key:
            raise AuthError("missing X-API-Key header")
        keys = self._current()
        if not keys.by_hash:
            if not api_key.startswith(KEY_PREFIX):
                raise AuthError(f"malformed X-API-Key: expected a key starting with {KEY_PREFIX}")
            return zero_setup_user(api_key)
        rec = keys.by_hash.get(hash_key(api_key))
        if rec is None:
            raise AuthError("unknown API key: use a key made by `tinkerd keys create`")
        if rec.revoked_at is not None:
            raise AuthError(f"API key {rec.key_id} has been revoked")
        return registered_user(rec.name)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, else None. OpenAI-style clients
    (and Claude Code with ANTHROPIC_AUTH_TOKEN) send their key this way, not as X-API-Key."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def authenticator(state: Any) -> Authenticator:
    """The app's Authenticator, made on first use from the service's store (`state` is
    `app.state`)."""
    auth = getattr(state, "authenticator", None)
    if auth is None:
        auth = state.authenticator = Authenticator(state.service.store)
    return auth
