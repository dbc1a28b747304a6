"""Fused CPU kernels of the decode step (`decode_ops.cpp`), compiled on first use.

Why: at decode each transformer layer runs ~50 small eager ops (RMSNorm, RoPE, the KV write,
masked attention, SiLU); their per-op overhead took more of a step than the matmuls' weight
reads (docs/architecture.md, BENCHMARKS.md). The four kernels here do those runs in one call
each, with the same rounding as the eager ops (attention stays in float32 inside). A fifth,
the float32 linear over weights packed into panels, streams the weights at the decode step's
few rows faster than oneDNN's packed linear.

The library is built with the machine's C++ compiler (`g++ -O3 -march=native`: the build is
for the CPU it runs on) against the installed torch, once per source/torch/CPU combination,
into `$XDG_CACHE_HOME/tinkerd/kernels` (default `~/.cache/tinkerd/kernels`); later processes
load the cached `.so`. Building takes ~10-15 s on 2 cores. Where it cannot be built (no
compiler, a torch without headers) the decoder keeps its eager ops and logs why, once.
`Settings.decode_kernels` (`TINKERD_DECODE_KERNELS=false`) turns them off: the eager path, for
comparison or debugging.

OpenMP: the kernels' loops are OpenMP parallel regions on the calling thread's team
(`-fopenmp`); the library's libgomp dependency resolves to the one torch already loaded (same
soname), so they share the scheduler thread's pool (engine/threads.py).
"""

import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "decode_ops.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tinkerd" / "kernels"


@functools.cache
def load() -> bool:
    """Build (or find) and load the kernels: True if `torch.ops.tinkerd_decode` is usable."""
    try:
        library = _build()
        torch.ops.load_library(str(library))
    except Exception as exc:  # no compiler, no headers, a failed build: eager ops instead
        log.warning("decode kernels unavailable (%s); the decoder uses eager ops", exc)
        return False
    return True


def _build() -> Path:
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes()
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                torch.__version__.encode(),
                sys.version.encode(),
                platform.machine().encode(),
                _cpu_flags().encode(),
                compiler.encode(),
                " ".join(FLAGS).encode(),
            ]
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"tinkerd_decode_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libraries = cpp_extension.library_paths()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [
            compiler,
            *FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in includes),
            str(SOURCE),
            "-o",
            str(built),
            *(f"-L{p}" for p in libraries),
            *(f"-Wl,-rpath,{p}" for p in libraries),
            "-lc10",
            "-ltorch_cpu",
        ]
        log.info("building the decode kernels (once per machine, ~15 s): %s", target)
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build leaves one whole file
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (`-march=native` builds for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
