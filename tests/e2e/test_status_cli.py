"""`tinkerd status` against a live server: the in-process worker is one replica, with the
server's own pid, and a run placed on it once a training client exists. (Ray replicas are
listed by the same endpoint: tests/ray/.)"""

import json
import subprocess
import sys

import httpx
import psutil
from e2e_helpers import Server


def _status(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "status", "--url", server.base_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TINKER_API_KEY": "tml-status-test", "PATH": ""},
    )


def test_status_lists_the_in_process_worker(server: Server) -> None:
    client = server.client("tml-status-test")
    client.create_lora_training_client(base_model=server.model, rank=4).result()

    done = _status(server, "--json")
    assert done.returncode == 0, done.stderr
    replicas = json.loads(done.stdout)["replicas"]
    mine = [r for r in replicas if r["model"] == server.model]
    assert len(mine) == 1
    worker = mine[0]
    assert worker["state"] == "ready" and worker["devices"] == "in-process"
    assert worker["runs"] >= 1 and worker["queue_depth"] >= 0
    # The pid is the server's own process: the process listening on the server's port.
    port = int(server.base_url.rsplit(":", 1)[1])
    listening = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port}
    assert worker["pid"] in listening

    table = _status(server)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["model", "replica", "state"]
    assert any(row.startswith(server.model) and " ready " in row for row in rows)


def test_status_needs_a_key_and_a_server(server: Server) -> None:
    refused = httpx.get(f"{server.base_url}/api/v1/tinkerd/replicas")
    assert refused.status_code == 401
    gone = subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "status", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gone.returncode == 1 and "no server at http://127.0.0.1:9" in gone.stderr
