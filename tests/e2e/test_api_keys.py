"""API keys on a live server: zero-setup mode, keys registered with `tinkerd keys`, rotation
(keys with one name share runs), revocation while the server runs, and the refusal to serve a
non-loopback address without keys unless --insecure."""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from e2e_helpers import STARTUP_TIMEOUT_S, TINKERD, Server, free_port, run_server

from tinkerd.api.auth import hash_key

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# A running server must pick up keys created or revoked by the CLI within this time.
PICKUP_S = 3.0


def tinkerd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKERD_THREADS": "1"}
    return subprocess.run(
        [str(TINKERD), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def create_key(data_dir: Path, name: str) -> str:
    done = tinkerd("keys", "create", "--name", name, "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def list_keys(data_dir: Path) -> list[list[str]]:
    done = tinkerd("keys", "list", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "CREATED", "REVOKED"]
    return [row.split() for row in rows]


def answer(server: Server, api_key: str | None) -> httpx.Response:
    headers = {"X-API-Key": api_key} if api_key is not None else {}
    return httpx.get(f"{server.base_url}/api/v1/training_runs", headers=headers, timeout=30)


def eventually(check: Callable[[], bool], within: float = PICKUP_S) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def keyed(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A server with one key (alice's) registered before it starts, bound to 0.0.0.0: with a
    key registered, a non-loopback address needs no --insecure."""
    workdir = tmp_path_factory.mktemp("keyed")
    key = create_key(workdir / "data", "alice")
    with run_server(tiny_model_dir, workdir, TINKERD_HOST="0.0.0.0") as server:
        yield server, key


def test_zero_setup_any_tml_key_is_its_own_user(server: Server) -> None:
    missing = answer(server, None)
    assert missing.status_code == 401 and "missing X-API-Key" in missing.json()["detail"]
    malformed = answer(server, "sk-not-tinker")
    assert malformed.status_code == 401 and "tml-" in malformed.json()["detail"]
    one, two = (
        tinker.RestClient(base_url=server.base_url, api_key=k) for k in ("tml-z1", "tml-z2")
    )
    sc = server.client("tml-z1")
    model_id = sc.create_lora_training_client(base_model=server.model, rank=4).result().model_id
    assert not one.get_training_run(model_id).result().model_owner.startswith("key:")
    with pytest.raises(tinker.NotFoundError):
        two.get_training_run(model_id).result()


def test_registered_keys_rotation_and_revocation(keyed: tuple[Server, str]) -> None:
    server, alice1 = keyed
    data_dir = server.data_dir

    for key, why in ((None, "missing"), ("tml-local", "unknown"), ("nonsense", "unknown")):
        refused = answer(server, key)
        assert refused.status_code == 401, refused.text
        assert why in refused.json()["detail"]
    with pytest.raises(tinker.AuthenticationError):
        server.client("tml-local").create_lora_training_client(base_model=server.model, rank=4)

    sc = server.client(alice1)
    model_id = sc.create_lora_training_client(base_model=server.model, rank=4).result().model_id
    run = tinker.RestClient(base_url=server.base_url, api_key=alice1).get_training_run(model_id)
    assert run.result().model_owner == "key:alice"

    # A second key for alice, made while the server runs: the same user, so the same runs.
    alice2 = create_key(data_dir, "alice")
    assert eventually(lambda: answer(server, alice2).status_code == 200)
    rest2 = tinker.RestClient(base_url=server.base_url, api_key=alice2)
    assert rest2.get_training_run(model_id).result().training_run_id == model_id
    info = httpx.post(
        f"{server.base_url}/api/v1/get_info",
        json={"model_id": model_id},
        headers={"X-API-Key": alice2},
    )
    assert info.status_code == 200, info.text

    bob = create_key(data_dir, "bob")
    assert eventually(lambda: answer(server, bob).status_code == 200)
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=server.base_url, api_key=bob).get_training_run(model_id).result()

    rows = list_keys(data_dir)
    assert [r[1] for r in rows] == ["alice", "alice", "bob"]
    assert all(r[3] == "-" for r in rows)
    listing = tinkerd("keys", "list", "--data-dir", str(data_dir)).stdout
    for key in (alice1, alice2, bob):
        assert key not in listing and hash_key(key) not in listing

    # Revoke alice's first key: refused within seconds; her other key keeps her runs.
    first_id = rows[0][0]
    revoked = tinkerd("keys", "revoke", first_id, "--data-dir", str(data_dir))
    assert revoked.returncode == 0 and first_id in revoked.stdout
    assert eventually(lambda: answer(server, alice1).status_code == 401)
    assert f"API key {first_id} has been revoked" in answer(server, alice1).json()["detail"]
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=server.base_url, api_key=alice1).list_training_runs().result()
    assert rest2.get_training_run(model_id).result().training_run_id == model_id
    assert list_keys(data_dir)[0][3] != "-"
    again = tinkerd("keys", "revoke", first_id, "--data-dir", str(data_dir))
    assert again.returncode == 0 and "already revoked" in again.stdout
    unknown = tinkerd("keys", "revoke", "nope", "--data-dir", str(data_dir))
    assert unknown.returncode == 1 and "no key" in unknown.stderr


def test_non_loopback_without_keys_is_refused_quickly(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["serve", "--host", "0.0.0.0", "--port", str(free_port())]
    args += ["--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir)]
    started = time.monotonic()
    refused = tinkerd(*args, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refusing to serve 0.0.0.0" in refused.stderr and "--insecure" in refused.stderr
    assert "tinkerd keys create" in refused.stderr
    assert time.monotonic() - started < 15  # before any model is loaded
    assert "tinkerd ready" not in refused.stdout + refused.stderr

    # Only revoked keys: nobody could use the server, and the refusal says so.
    create_key(tmp_path / "data", "gone")
    (key_id, *_), *_ = list_keys(tmp_path / "data")
    assert tinkerd("keys", "revoke", key_id, "--data-dir", str(tmp_path / "data")).returncode == 0
    still = tinkerd(*args, timeout=60)
    assert still.returncode == 2 and "no unrevoked API key" in still.stderr


def test_non_loopback_with_insecure_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    args = ["serve", "--host", "0.0.0.0", "--port", str(port), "--insecure"]
    args += ["--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir)]
    log_path = tmp_path / "server.log"
    env = {**os.environ, "TINKERD_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(TINKERD), *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                url = f"http://127.0.0.1:{port}/api/v1/healthz"
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert eventually(healthy, within=STARTUP_TIMEOUT_S), log_path.read_text()
        assert "WARNING: --insecure" in log_path.read_text()
        zero_setup = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/training_runs", headers={"X-API-Key": "tml-x"}
        )
        assert zero_setup.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0, log_path.read_text()
