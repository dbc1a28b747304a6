"""Tinker's `name:reduction` metrics: how per-datum values combine into one number.

Losses report metrics per datum (a dict of name → scalar). A request's value is the reduction
named after the colon over its datums, and the same rule merges the slices of a request that
the scheduler split across micro-batches. `:mean` is weighted by the datums behind each value,
so a split request reports what an unsplit one would.
"""

import math
from collections.abc import Iterable, Mapping

REDUCTIONS = ("sum", "mean", "max", "min")


def reduction_of(name: str) -> str:
    """The reduction a metric name asks for; names without a known suffix sum (Tinker's
    `loss:sum` is the common case)."""
    suffix = name.rsplit(":", 1)[-1] if ":" in name else "sum"
    return suffix if suffix in REDUCTIONS else "sum"


def reduce_metrics(parts: Iterable[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Combine `(metrics, datums)` pairs, each metric by its own reduction."""
    values: dict[str, list[tuple[float, int]]] = {}
    for metrics, weight in parts:
        for name, value in metrics.items():
            values.setdefault(name, []).append((float(value), weight))
    out: dict[str, float] = {}
    for name, pairs in values.items():
        how = reduction_of(name)
        if how == "sum":
            out[name] = math.fsum(v for v, _ in pairs)
        elif how == "max":
            out[name] = max(v for v, _ in pairs)
        elif how == "min":
            out[name] = min(v for v, _ in pairs)
        else:
            total = sum(w for _, w in pairs)
            out[name] = math.fsum(v * w for v, w in pairs) / total if total else 0.0
    return out
