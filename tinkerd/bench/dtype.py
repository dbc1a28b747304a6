"""Which dtype a benchmark runs in: the one this machine runs fast, unless `--dtype` says.

bf16 (bf16 weights, bf16 autocast) on CUDA and on CPUs with native bf16 matmuls; float32
(float32 weights and math) elsewhere, where bf16 is emulated and a benchmark would take hours
(see tinkerd/model/cpu_features.py). The choice and its reason head every benchmark's output
and are in its JSON figures.
"""

from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" or "bfloat16"
    reason: str

    @property
    def autocast(self) -> bool:
        """bf16 autocast of the math: with bf16 weights only (as `tinkerd serve` does)."""
        return self.dtype == "bfloat16"

    def header(self) -> str:
        return f"dtype: {self.dtype} ({self.reason})"

    def serve_env(self) -> dict[str, str]:
        """Env for a `tinkerd serve` subprocess: bf16 was chosen (native) or asked for, so
        the server's slow-bf16 refusal must not stop the benchmark."""
        return {"TINKERD_ALLOW_SLOW_BF16": "1"} if self.dtype == "bfloat16" else {}


def choose_dtype(requested: str | None, device: str = "cpu") -> DtypeChoice:
    """`requested` if given (warning when it is bf16 on a CPU without native bf16), else the
    dtype `device` runs fast."""
    from tinkerd.model.cpu_features import bf16_support, fast_dtype

    if requested is None:
        return DtypeChoice(*fast_dtype(device))
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {requested!r}")
    reason = "--dtype given"
    if requested == "bfloat16" and device.startswith("cpu"):
        support = bf16_support()
        if not support.native:
            reason += "; WARNING: no native bf16 on this CPU, expect a very slow run: "
            reason += support.reason
    return DtypeChoice(requested, reason)
