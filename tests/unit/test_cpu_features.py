"""bf16 detection (tinkerd/model/cpu_features.py) and `tinkerd serve`'s refusal of bfloat16 on
a CPU without native bf16 matmuls.

The decision is tested on injected facts, so both branches run on every CPU kind. The serve
tests start the real CLI with the documented test hook TINKERD_TEST_BF16_SLOWDOWN, which
replaces the measured slowdown: on a machine with native bf16 they still see the refusal."""

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tinkerd.bench.dtype import choose_dtype
from tinkerd.bench.server import free_port, serve
from tinkerd.model import cpu_features
from tinkerd.model.cpu_features import (
    SLOW_BF16_FACTOR,
    TEST_SLOWDOWN_ENV,
    Bf16Facts,
    bf16_support,
    cpu_flags,
    decide,
    fast_dtype,
    gather_facts,
    measure_bf16_slowdown,
)

# What an AVX2-only EPYC measured for a bf16 training step against float32.
AVX2_SLOWDOWN = "450"


@pytest.fixture
def fresh_verdict() -> Iterator[None]:
    """bf16_support() is measured once per process: forget it around the test."""
    bf16_support.cache_clear()
    yield
    bf16_support.cache_clear()


def facts(slowdown: float | None, flags: tuple[str, ...] = ()) -> Bf16Facts:
    return Bf16Facts(flags, "AVX2", slowdown, "measured")


def test_cpu_flags_reads_x86_and_aarch64(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nflags : other\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("slowdown", "flags", "native"),
    [
        (450.0, (), False),  # AVX2-only EPYC
        (24.6, ("avx512_bf16",), False),  # flags present, but the kernels torch uses emulate
        (1.1, (), True),  # AVX512 without avx512_bf16: oneDNN's kernels are near fp32 speed
        (0.5, ("avx512_bf16",), True),  # native
        (SLOW_BF16_FACTOR, (), False),  # the threshold itself counts as slow
        (None, ("amx_bf16",), True),  # not measured: the flags decide
        (None, (), False),
    ],
)
def test_decide(slowdown: float | None, flags: tuple[str, ...], native: bool) -> None:
    support = decide(facts(slowdown, flags))
    assert support.native is native
    assert "torch CPU capability AVX2" in support.reason
    if slowdown is not None:
        assert f"{slowdown:.1f}x the float32 time" in support.reason
    for flag in flags:
        assert flag in support.reason


def test_measurement_is_cheap_and_leaves_threads_alone() -> None:
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    slowdown = measure_bf16_slowdown()
    elapsed = time.perf_counter() - t0
    assert math.isfinite(slowdown) and slowdown > 0
    assert torch.get_num_threads() == threads
    # About 10-20 ms here; the bound leaves room for a busy shared machine.
    assert elapsed < 1.0


def test_measurement_matches_the_cpu_kind(fresh_verdict: None) -> None:
    """Where the CPU's kind is clear-cut, the measurement agrees with it: bf16 flags -> native;
    no bf16 flag and no AVX512 -> not native (AVX512 without bf16 is near fp32 speed, so
    either verdict is right there)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get(TEST_SLOWDOWN_ENV):
        pytest.skip("ONEDNN_MAX_CPU_ISA or the test hook overrides what the CPU can do")
    support = bf16_support()
    got = support.facts
    assert got.source == "measured" and got.slowdown is not None
    if got.flags and got.capability.startswith("AVX512"):
        assert support.native, support.reason
    elif not got.flags and not got.capability.startswith("AVX512"):
        assert not support.native, support.reason
    else:
        pytest.skip(f"no clear-cut expectation on this CPU: {support.reason}")


def test_test_hook_replaces_the_measurement(
    monkeypatch: pytest.MonkeyPatch, fresh_verdict: None
) -> None:
    monkeypatch.setenv(TEST_SLOWDOWN_ENV, AVX2_SLOWDOWN)
    got = gather_facts()
    assert got.slowdown == 450.0 and got.source == TEST_SLOWDOWN_ENV
    assert got.capability == torch.backends.cpu.get_cpu_capability()
    assert not bf16_support().native
    assert f"from {TEST_SLOWDOWN_ENV}" in bf16_support().reason
    monkeypatch.setenv(TEST_SLOWDOWN_ENV, "0.5")
    bf16_support.cache_clear()
    assert bf16_support().native


@pytest.mark.parametrize(("slowdown", "expected"), [("450", "float32"), ("0.5", "bfloat16")])
def test_fast_dtype_and_bench_choice(
    monkeypatch: pytest.MonkeyPatch, fresh_verdict: None, slowdown: str, expected: str
) -> None:
    monkeypatch.setenv(TEST_SLOWDOWN_ENV, slowdown)
    dtype, reason = fast_dtype("cpu")
    assert dtype == expected
    assert ("no native bf16" in reason) == (expected == "float32")
    choice = choose_dtype(None)
    assert (choice.dtype, choice.autocast) == (expected, expected == "bfloat16")
    assert choice.header().startswith(f"dtype: {expected} (")
    # An explicit --dtype wins, with a warning where bf16 would be slow.
    forced = choose_dtype("bfloat16")
    assert forced.dtype == "bfloat16"
    assert forced.serve_env() == {"TINKERD_ALLOW_SLOW_BF16": "1"}
    assert ("WARNING" in forced.reason) == (expected == "float32")
    assert choose_dtype("float32").serve_env() == {}
    with pytest.raises(ValueError):
        choose_dtype("float16")


def test_cuda_is_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise AssertionError("probed the CPU for a CUDA device")

    monkeypatch.setattr(cpu_features, "bf16_support", boom)
    assert fast_dtype("cuda")[0] == "bfloat16"
    assert fast_dtype("cuda:1")[0] == "bfloat16"


def _serve(model_dir: Path, data_dir: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(free_port())]
    cmd += ["--data-dir", str(data_dir), "--model", str(model_dir), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "TINKERD_ALLOW_SLOW_BF16"}
    full_env.update({"TINKERD_THREADS": "1", TEST_SLOWDOWN_ENV: AVX2_SLOWDOWN, **env})
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_serve_refuses_bf16_without_native_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`tinkerd serve --dtype bfloat16` on a CPU reported without native bf16 exits 2 before
    loading the model, saying why, how slow, and how to force it."""
    proc = _serve(tiny_model_dir, tmp_path / "data", "--dtype", "bfloat16")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "refusing --dtype bfloat16" in err
    assert "no native bf16" in err
    assert "450.0x the float32 time" in err
    assert "--allow-slow-bf16" in err and "TINKERD_ALLOW_SLOW_BF16=1" in err
    assert "--dtype float32" in err
    # Nothing heavy ran: no "serving" banner, no run-state folder (made by the model loading).
    assert "serving" not in out
    assert not (tmp_path / "data" / "runs").exists()
    assert not (tmp_path / "data" / "models").exists()


def test_serve_allows_bf16_when_forced(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TINKERD_ALLOW_SLOW_BF16=1 (what --allow-slow-bf16 sets) serves bf16 anyway, with a
    warning; float32 is never refused."""
    log = tmp_path / "forced.log"
    env = {TEST_SLOWDOWN_ENV: AVX2_SLOWDOWN, "TINKERD_ALLOW_SLOW_BF16": "1"}
    with serve(
        str(tiny_model_dir), tmp_path / "data", threads=1, dtype="bfloat16", log_path=log, env=env
    ) as srv:
        assert httpx.get(f"{srv.url}/api/v1/healthz", timeout=5).status_code == 200
    text = log.read_text()
    assert "WARNING: --allow-slow-bf16" in text and "450.0x" in text
    assert "refusing" not in text


def test_serve_flag_passes_the_check(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--allow-slow-bf16 on the command line gets past the check (the server then starts: it
    is stopped as soon as it prints its banner)."""
    proc = _serve(tiny_model_dir, tmp_path / "data", "--dtype", "bfloat16", "--allow-slow-bf16")
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "tinkerd: serving" in banner, banner
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "WARNING: --allow-slow-bf16" in err
    assert "refusing" not in err
