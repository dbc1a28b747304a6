"""Timing statistics shared by the benchmarks, so every bench computes a figure the same way."""

import time
from collections.abc import Callable


def best_of(
    fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None
) -> float:
    """Best-of-`repeats` wall time of `fn` after one warm-up call (seconds). The best, not the
    mean: on a shared machine the fastest run is the one least disturbed by other work. `sync`
    waits for asynchronous work (a CUDA stream) before the clock is read."""
    wait = sync or (lambda: None)
    fn()
    wait()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wait()
        best = min(best, time.perf_counter() - t0)
    return best


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var
