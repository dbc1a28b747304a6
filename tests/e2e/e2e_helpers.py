"""Helpers shared by the e2e test modules (importable as `e2e_helpers`)."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
import tinker
from tinker import types

# The `tinkerd` script of the interpreter running the tests (.venv/bin/tinkerd in this repo).
TINKERD = Path(sys.executable).parent / "tinkerd"
STARTUP_TIMEOUT_S = 180.0  # SmolLM2 loads and probes its activation memory first
SHUTDOWN_TIMEOUT_S = 20.0


@dataclass
class Server:
    base_url: str
    model: str  # the base model name as served (the tiny model's directory)
    log_path: Path
    data_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count_in_log(self, needle: str) -> int:
        return self.log().count(needle)

    def client(self, api_key: str = "tml-e2e") -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.base_url, api_key=api_key)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(
    model_dir: Path,
    data_dir: Path,
    port: int,
    log: IO[bytes],
    served_as: str | None = None,
    extra_args: tuple[str, ...] = (),
    **env: str,
) -> subprocess.Popen[bytes]:
    """`tinkerd serve` on loopback `port` (one torch thread), its output into `log`; the model
    under its path, or under `served_as` (`--model NAME=PATH`); `extra_args` (e.g. a second
    `--model`) after those."""
    full_env = {**os.environ, "TINKERD_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    launcher = [str(TINKERD)] if TINKERD.exists() else [sys.executable, "-m", "tinkerd.cli"]
    cmd = [*launcher, "serve", "--port", str(port), "--data-dir", str(data_dir)]
    cmd += ["--model", f"{served_as}={model_dir}" if served_as else str(model_dir)]
    cmd += extra_args
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)


def wait_healthy(proc: subprocess.Popen[bytes], base_url: str, log: Callable[[], str]) -> None:
    """Wait for /healthz; RuntimeError with the server's log if it exits or never answers."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tinkerd exited early ({proc.returncode}):\n{log()}")
        try:
            if httpx.get(f"{base_url}/api/v1/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"tinkerd did not become healthy:\n{log()}")
        time.sleep(0.1)


@contextmanager
def run_server(
    model_dir: Path,
    workdir: Path,
    port: int | None = None,
    served_as: str | None = None,
    extra_args: tuple[str, ...] = (),
    **env: str,
) -> Iterator[Server]:
    """Start `tinkerd serve`, wait for /healthz, yield, then SIGTERM and check a clean exit.
    The same `workdir` and `port` again restart the same server (same data, same URL)."""
    port = port or free_port()
    data_dir = workdir / "data"
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = start_serve(
            model_dir,
            data_dir,
            port,
            log,
            served_as,
            extra_args,
            **{"TINKERD_LONG_POLL_SECONDS": "5", **env},
        )
    server = Server(f"http://127.0.0.1:{port}", served_as or str(model_dir), log_path, data_dir)
    try:
        wait_healthy(proc, server.base_url, server.log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"tinkerd did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM")
        else:
            code = proc.returncode
        # A clean exit: status 0, after uvicorn's graceful shutdown completed.
        log = server.log()
        shutdown = log[log.rfind("Shutting down") :] if "Shutting down" in log else ""
        clean = (
            code == 0
            and "Application shutdown complete" in shutdown
            and "Traceback" not in shutdown
        )
        if not clean:
            sys.stderr.write(log[-5000:])
            pytest.fail(f"tinkerd did not shut down cleanly on SIGTERM (status {code})")


def sft_datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """model_input = seq[:-1], target_tokens = seq[1:] (weights default to 1)."""
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": weights if weights is not None else [1.0] * n,
        },
    )


def output_logprobs(result: types.ForwardBackwardOutput) -> list[list[float]]:
    return [out["logprobs"].tolist() for out in result.loss_fn_outputs]


def adam(lr: float) -> types.AdamParams:
    return types.AdamParams(learning_rate=lr)
