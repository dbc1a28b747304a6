"""A `tinkerd serve` subprocess on a free loopback port, for the benchmarks that go through
the HTTP path: a real server process, as users run it, not the app in the bench's process."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 300.0
SHUTDOWN_TIMEOUT_S = 30.0


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path | None

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(
    model: str,
    data_dir: Path,
    *,
    threads: int,
    dtype: str,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> Iterator[ServerProcess]:
    """Start `tinkerd serve`, wait for /healthz, yield it; SIGTERM and wait on exit. The log
    (stdout and stderr) goes to `log_path`, or nowhere."""
    import httpx

    port = free_port()
    full_env = dict(os.environ, TINKERD_THREADS=str(threads), TINKERD_DTYPE=dtype, **(env or {}))
    cmd = [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--model", model, *(extra_args or [])]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log_path, "wb")) if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{server.url}/api/v1/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"tinkerd serve did not start (exit code {proc.poll()})\n{server.log_tail()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
