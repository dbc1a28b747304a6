"""Signed, expiring download tokens for checkpoint files (external weights URLs).

`GET /api/v1/training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls`
answers one URL per file, served by tinkerd itself. The URL carries no API key (the SDK's CLI
fetches it with plain urllib), so it is authorised by its token alone: the file it names and
an expiry time, signed with HMAC-SHA256 under a server secret kept in the data dir. A token
that was altered, or has expired, is refused.
"""

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE = "download_secret.key"


class TokenError(ValueError):
    """The token is malformed, tampered with (`expired` False) or expired (`expired` True)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class DownloadGrant:
    """What a valid token allows: one file of one checkpoint, until `expires` (unix time)."""

    run_id: str
    checkpoint_id: str
    relpath: str
    expires: int


def load_secret(data_dir: Path) -> bytes:
    """The server's signing secret, created (mode 0600) on first use."""
    path = Path(data_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"{path}: the download secret is too short") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def sign(secret: bytes, grant: DownloadGrant) -> str:
    """A URL-safe token (`<payload>.<signature>`, no '/') for `grant`."""
    body = [grant.run_id, grant.checkpoint_id, grant.relpath, grant.expires]
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_mac(secret, payload)}"


def verify(secret: bytes, token: str, now: float | None = None) -> DownloadGrant:
    """The grant a token carries; TokenError if it is malformed, tampered with or expired."""
    payload, sep, signature = token.partition(".")
    if not sep or not hmac.compare_digest(_mac(secret, payload), signature):
        raise TokenError("invalid download token")
    try:
        run_id, checkpoint_id, relpath, expires = json.loads(_unb64(payload))
        grant = DownloadGrant(str(run_id), str(checkpoint_id), str(relpath), int(expires))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise TokenError("invalid download token") from exc
    if (time.time() if now is None else now) >= grant.expires:
        raise TokenError("download token expired", expired=True)
    return grant


def checkpoint_files(directory: Path, skip_dirs: tuple[str, ...] = ()) -> list[str]:
    """Every file of a checkpoint directory, as sorted '/'-separated relative paths, except
    those under the top-level folders `skip_dirs`."""
    directory = Path(directory)
    files = (p.relative_to(directory) for p in directory.rglob("*") if p.is_file())
    return sorted(f.as_posix() for f in files if f.parts[0] not in skip_dirs)


def resolve_file(directory: Path, relpath: str) -> Path:
    """`directory/relpath` if it is a file inside `directory`, else FileNotFoundError."""
    base = Path(directory).resolve()
    target = (base / relpath).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise FileNotFoundError(relpath)
    return target
