"""Does this CPU run bf16 matmuls at full speed?

CPUs with bf16 dot-product instructions (x86 `avx512_bf16` or `amx_bf16`, aarch64 `bf16`) run a
bf16 matmul faster than a float32 one, and AVX512 CPUs without them come near float32 speed
through oneDNN's kernels. Elsewhere (AVX2 only) torch converts every element and falls back to
slow reference loops: bf16 matmuls ran about 450x slower
than float32 on an AVX2-only EPYC (20-140x, depending on size, on an AVX512 EPYC with oneDNN
limited to AVX2), so `--dtype bfloat16` would make the server look hung.

The decision rests on a measurement, not on the flags alone: a 128 x 128 bf16 matmul is timed
against the float32 one on one thread (best of up to 5 runs after a warm-up; 10-20 ms in all
with or without native bf16, and under 100 ms even where a bf16 matmul is 450x slower, since
the timed runs stop after 20 ms). What counts is what torch's kernels
actually do here: the flags say nothing about a torch build or a oneDNN setting
(`ONEDNN_MAX_CPU_ISA`) that does not use them, and an AVX512 CPU without `avx512_bf16` still
has oneDNN's AVX512 bf16 kernels, slower than float32 but not by much. The flags and torch's
CPU capability are reported alongside so that a refusal explains itself.

Test hook: `TINKERD_TEST_BF16_SLOWDOWN=<ratio>` replaces the measurement (not the flags) with
that ratio, so tests can take both branches on any machine. It is not a setting: nothing but
tests should set it.
"""

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

# A bf16 matmul this many times slower than float32, or more, is "not native". Native bf16
# measures 0.2-1x; emulated, 15-450x: the threshold sits far from both.
SLOW_BF16_FACTOR = 3.0
PROBE_SIZE = 128
PROBE_REPEATS = 5
PROBE_BUDGET_S = 0.02  # timed runs per dtype stop after this much (at least one runs)
TEST_SLOWDOWN_ENV = "TINKERD_TEST_BF16_SLOWDOWN"
# CPU flags that mean bf16 dot products in hardware (/proc/cpuinfo "flags" on x86, "Features"
# on aarch64).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Bf16Facts:
    """What the decision is made from."""

    flags: tuple[str, ...]  # the BF16_FLAGS this CPU reports (empty: none)
    capability: str  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX2", "AVX512"
    slowdown: float | None  # bf16 / float32 time of the probe matmul; None: not measured
    source: str  # where `slowdown` comes from: "measured" or the test hook's name


@dataclass(frozen=True)
class Bf16Support:
    """The verdict: `native` is True when bf16 matmuls run at least near float32 speed."""

    native: bool
    reason: str  # one sentence with the figures, for logs, refusals and bench headers
    facts: Bf16Facts


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (first processor); empty where /proc/cpuinfo is missing."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def measure_bf16_slowdown(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> float:
    """How many times longer a size x size bf16 matmul takes than a float32 one on this CPU
    (best of `repeats` each after one warm-up, so a busy machine inflates neither side), on
    one thread."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        torch.mm(x, y)  # warm-up: kernel selection, JIT, first-touch of the output
        times: list[float] = []
        # Fewer repeats once PROBE_BUDGET_S is spent: a slow bf16 kernel is obvious from one.
        while len(times) < repeats and (not times or sum(times) < PROBE_BUDGET_S):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        return min(times)

    # One thread: the probe compares kernels, and on a busy machine a second thread's wake-up
    # alone can cost more (~16 ms seen on a shared 2-core VM) than the matmul itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = best(a, b)
        bf16 = best(a.bfloat16(), b.bfloat16())
    finally:
        torch.set_num_threads(threads)
    return bf16 / max(fp32, 1e-9)


def gather_facts(*, measure: bool = True) -> Bf16Facts:
    """Flags, torch's CPU capability and (with `measure`) the probe, or the test hook's ratio."""
    import torch

    flags = tuple(f for f in BF16_FLAGS if f in cpu_flags())
    capability = torch.backends.cpu.get_cpu_capability()
    hooked = os.environ.get(TEST_SLOWDOWN_ENV)
    if hooked:
        return Bf16Facts(flags, capability, float(hooked), TEST_SLOWDOWN_ENV)
    slowdown = measure_bf16_slowdown() if measure else None
    return Bf16Facts(flags, capability, slowdown, "measured")


def decide(facts: Bf16Facts) -> Bf16Support:
    """Native when the probe says so (slowdown below SLOW_BF16_FACTOR); without a measurement,
    when the CPU reports a bf16 flag."""
    flags = ", ".join(facts.flags) if facts.flags else f"none of {', '.join(BF16_FLAGS)}"
    cpu = f"CPU bf16 flags: {flags}; torch CPU capability {facts.capability}"
    if facts.slowdown is None:
        native = bool(facts.flags)
        return Bf16Support(native, f"{cpu} (not measured)", facts)
    native = facts.slowdown < SLOW_BF16_FACTOR
    how = "measured" if facts.source == "measured" else f"from {facts.source}"
    reason = (
        f"a {PROBE_SIZE}x{PROBE_SIZE} bf16 matmul takes {facts.slowdown:.1f}x the float32 time "
        f"({how}); {cpu}"
    )
    return Bf16Support(native, reason, facts)


@functools.cache
def bf16_support() -> Bf16Support:
    """This CPU's verdict, measured once per process."""
    return decide(gather_facts())


def fast_dtype(device: str) -> tuple[str, str]:
    """The dtype (name) that runs fast on `device`, and why: bfloat16 on CUDA and on CPUs with
    native bf16 matmuls, else float32."""
    if not device.startswith("cpu"):
        return "bfloat16", f"{device}: bf16 is native on the GPU"
    support = bf16_support()
    if support.native:
        return "bfloat16", f"native bf16 on this CPU: {support.reason}"
    return "float32", f"no native bf16 on this CPU: {support.reason}"
