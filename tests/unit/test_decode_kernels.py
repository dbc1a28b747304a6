"""The decoder's fused CPU kernels (tinkerd/model/kernels/decode_ops.cpp) against their eager
ops and float64 references, in float32 and bfloat16, on the shapes that take their vector and
scalar paths (head dims of one and several vectors, GQA groups of 1 to 8, sliding windows,
rows whose last position sits in the arena's final block), the packed float32 linear, and the
build's fallback.

Tolerances: float32 results use `assert_close_scaled` with the length of the longest sum.
bfloat16 results that follow the eager ops' rounding step for step (RoPE) must equal them;
those with a sum inside (RMSNorm's mean square, summed in another order) may differ from the
eager result by two bf16 ulps (the flipped rounding of the normalised value, then of weight x
value); attention, float32 inside, is held to its output's rounding (half a bf16 ulp, 2^-8
relative) of the float64 reference plus float32 summation error.
"""

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled

from tinkerd.model import kernels
from tinkerd.model.decoder import _rms_norm, _rotate_half, _silu_mul

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values (8 significant bits)


@pytest.fixture(scope="module")
def ops() -> object:
    assert kernels.load(), "the kernels must build here (g++ is on every CI machine)"
    return torch.ops.tinkerd_decode


class Norm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps


@pytest.mark.parametrize("width", [64, 576, 100])  # 100: a scalar tail after the vectors
def test_rms_norm(ops: object, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(7, width, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(width, generator=gen, dtype=torch.float64)
    eps = 1e-5
    want = weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    got = ops.rms_norm(x.float(), weight.float(), eps)  # type: ignore[attr-defined]
    assert_close_scaled(got, want, terms=width)
    # Rows of a wider tensor (a stride that is not the width), and 3-d input.
    wide = torch.randn(7, width + 8, generator=gen)
    assert_close_scaled(
        ops.rms_norm(wide[:, :width], weight.float(), eps),  # type: ignore[attr-defined]
        _rms_norm(wide[:, :width].double(), Norm(weight, eps)),
        terms=width,
    )
    cube = x.float().view(7, 1, width)
    assert ops.rms_norm(cube, weight.float(), eps).shape == cube.shape  # type: ignore[attr-defined]
    xb, wb = x.bfloat16(), weight.bfloat16()
    eager = _rms_norm(xb, Norm(wb, eps))
    fused = ops.rms_norm(xb, wb, eps)  # type: ignore[attr-defined]
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, eager, rtol=2 * BF16_ULP, atol=0)


@pytest.mark.parametrize(
    ("out_features", "in_features"),
    [(64, 576), (100, 37), (33, 1536)],  # whole panels; a partial last panel; long sums
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(ops: object, out_features: int, in_features: int, bias: bool) -> None:
    """The packed float32 linear for every row count up to two row blocks and past them
    (whole blocks of 6 and each tail size), and no rows at all."""
    gen = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    b = torch.randn(out_features, generator=gen, dtype=torch.float64) if bias else None
    packed = ops.pack_linear(weight.float())  # type: ignore[attr-defined]
    for rows in [*range(14), 64]:
        x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64)
        got = ops.linear(x.float(), packed, out_features, None if b is None else b.float())  # type: ignore[attr-defined]
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        assert_close_scaled(got, torch.nn.functional.linear(x, weight, b), terms=in_features + 1)
    with pytest.raises(RuntimeError, match="packed"):
        ops.linear(torch.zeros(2, in_features), packed, out_features + 64, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("inner", [128, 1536, 72])
def test_silu_mul(ops: object, inner: int) -> None:
    gen = torch.Generator().manual_seed(inner)
    gate_up = torch.randn(5, 2 * inner, generator=gen, dtype=torch.float64) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert_close_scaled(ops.silu_mul(gate_up.float()), want, terms=8)  # type: ignore[attr-defined]
    eager = _silu_mul(gate_up.bfloat16())
    fused = ops.silu_mul(gate_up.bfloat16())  # type: ignore[attr-defined]
    torch.testing.assert_close(fused, eager, rtol=BF16_ULP, atol=0)


def _rope_inputs(
    dtype: torch.dtype, rows: int, heads: int, kv_heads: int, dim: int, width: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * dim)
    # q/k/v as slices of one fused projection output (rows of a longer stride), as decoded.
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(rows, dim // 2, generator=gen) * 100
    angles = torch.cat((angles, angles), -1)
    return {
        "qk": qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim),
        "v": qkv[:, (heads + kv_heads) * dim :],
        "cos": angles.cos().to(dtype),
        "sin": angles.sin().to(dtype),
        "keys": torch.zeros(rows + 2, kv_heads, dim, width, dtype=dtype),  # transposed
        "values": torch.zeros(rows + 2, kv_heads, width, dim, dtype=dtype),
        "positions": torch.randperm(width, generator=gen)[:rows],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (2, 1, 24)])
def test_rope_store(ops: object, dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> None:
    rows, width = 6, 40
    t = _rope_inputs(dtype, rows, heads, kv_heads, dim, width)
    slots = torch.arange(rows)
    q = ops.rope_store(  # type: ignore[attr-defined]
        t["qk"], t["v"], t["cos"], t["sin"], t["keys"], t["values"], t["positions"], slots, heads
    )
    cos, sin = t["cos"][:, None], t["sin"][:, None]
    eager = t["qk"] * cos + _rotate_half(t["qk"]) * sin  # what decoder.py does without kernels
    if dtype == torch.bfloat16:  # the same roundings, step for step
        want_q, want_k = eager[:, :heads], eager[:, heads:]
        assert torch.equal(q, want_q)
    else:
        exact = t["qk"].double() * cos.double() + _rotate_half(t["qk"].double()) * sin.double()
        want_q, want_k = exact[:, :heads], exact[:, heads:]
        assert_close_scaled(q, want_q, terms=4)
    written_k = t["keys"].transpose(2, 3)  # (slots, kv heads, positions, dim)
    values = t["values"]
    v = t["v"].view(rows, kv_heads, dim)
    for r, p in enumerate(t["positions"].tolist()):
        if dtype == torch.bfloat16:
            assert torch.equal(written_k[r, :, p], want_k[r])
        else:
            assert_close_scaled(written_k[r, :, p], want_k[r], terms=4)
        assert torch.equal(values[r, :, p], v[r])
        written_k[r, :, p] = 0
        values[r, :, p] = 0
    assert not t["keys"].any() and not t["values"].any()  # nothing else was written


def _attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: list[int],
    window: int,
    scaling: float,
) -> torch.Tensor:
    """float64, row by row: keys (slots, kv heads, dim, width), values (slots, kv, width, dim)."""
    rows, heads, dim = q.shape
    kv_heads = keys.shape[1]
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r, last in enumerate(positions):
        first = max(0, last - window + 1) if window else 0
        for h in range(heads):
            kh = h // (heads // kv_heads)
            k = keys[r, kh, :, first : last + 1].double()  # (dim, n)
            v = values[r, kh, first : last + 1].double()  # (n, dim)
            probs = torch.softmax(q[r, h].double() @ k * scaling, -1)
            out[r, h] = probs @ v
    return out.view(rows, heads * dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "window"),
    [(9, 3, 64, 0), (4, 4, 16, 0), (8, 1, 32, 0), (4, 2, 16, 5), (14, 2, 64, 20)],
)
def test_attend(
    ops: object, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, window: int
) -> None:
    gen = torch.Generator().manual_seed(heads * dim + window)
    width = 48
    # Ragged: a row at position 0 (one key), rows whose last block runs past the arena's
    # width (the scalar tail), and a slot beyond the rows (never read).
    positions = [0, 3, 17, 33, 40, 47]
    rows = len(positions)
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    keys = (torch.randn(rows + 1, kv_heads, dim, width, generator=gen) * 2).to(dtype)
    values = torch.randn(rows + 1, kv_heads, width, dim, generator=gen).to(dtype)
    scaling = dim**-0.5
    slots = torch.arange(rows)
    got = ops.attend(  # type: ignore[attr-defined]
        q, keys, values, torch.tensor(positions), slots, window, scaling
    )
    want = _attention_reference(q, keys, values, positions, window, scaling)
    assert got.shape == (rows, heads * dim) and got.dtype == dtype
    if dtype == torch.float32:
        assert_close_scaled(got, want, terms=width + dim)
    else:
        tolerance = (2.0**-8 + (width + dim) * torch.finfo(torch.float32).eps) * want.abs().max()
        assert float((got.double() - want).abs().max()) <= float(tolerance)
    # Positions past a row's last are never read: garbage there changes nothing.
    keys[:, :, :, 47:] = float("nan") if dtype == torch.float32 else 1e4
    for r, p in enumerate(positions):
        keys[r, :, :, p + 1 :] = float("nan")
        values[r, :, p + 1 :] = float("nan")
    again = ops.attend(  # type: ignore[attr-defined]
        q[:-1], keys, values, torch.tensor(positions[:-1]), slots[:-1], window, scaling
    )
    assert torch.equal(again, got[:-1])


def test_unbuildable_kernels_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No working compiler (and nothing cached): `load` says False and logs why, so the
    decoder runs its eager ops."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tinkerd.model.kernels"):
            assert kernels.load() is False
        assert "decode kernels unavailable (false failed" in caplog.text
        assert not list(tmp_path.rglob("*.so"))
    finally:
        kernels.load.cache_clear()


def test_rows_sharing_a_slot_attend_causally(ops: object) -> None:
    """A prompt's rows in one slot at successive positions (how `Decoder.prefill` runs a
    chunk): each row's key lands at its position, and each row attends to the positions up
    to its own only, as causal attention over the prompt would. Slots or positions outside
    the arena are refused."""
    heads, kv_heads, dim, width = 4, 2, 16, 32
    t = _rope_inputs(torch.float32, 5, heads, kv_heads, dim, width)
    positions, slots = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 1, 1, 0])
    q = ops.rope_store(  # type: ignore[attr-defined]
        t["qk"], t["v"], t["cos"], t["sin"], t["keys"], t["values"], positions, slots, heads
    )
    got = ops.attend(q, t["keys"], t["values"], positions, slots, 0, 0.25)  # type: ignore[attr-defined]
    for r in range(5):
        # Row r alone, against its slot as it stands after every row's write.
        alone = ops.attend(  # type: ignore[attr-defined]
            q[r : r + 1], t["keys"], t["values"], positions[r : r + 1], slots[r : r + 1], 0, 0.25
        )
        assert torch.equal(got[r : r + 1], alone)
    want = _attention_reference(
        q[:4], t["keys"][[1] * 4], t["values"][[1] * 4], [0, 1, 2, 3], 0, 0.25
    )
    assert_close_scaled(got[:4], want, terms=width + dim)
    with pytest.raises(RuntimeError, match="slot out of the arena"):
        ops.attend(q, t["keys"], t["values"], positions, slots + 10, 0, 0.25)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="position out of the arena"):
        ops.attend(q, t["keys"], t["values"], positions + width, slots, 0, 0.25)  # type: ignore[attr-defined]


def _has_avx2() -> bool:
    flags = kernels._cpu_flags().split()
    return platform.machine() == "x86_64" and "avx2" in flags and "fma" in flags


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2 and FMA")
def test_avx2_build_passes_these_tests(tmp_path: Path) -> None:
    """The kernels as built on an AVX2-only CPU (`-march=haswell`: 8-lane vectors, no
    AVX512) pass this file's other tests. They run in a subprocess, since a second build of
    the same op namespace cannot load in this process."""
    here = Path(__file__).resolve()
    code = (
        "import sys, pytest, tinkerd.model.kernels as k\n"
        "k.FLAGS[k.FLAGS.index('-march=native')] = '-march=haswell'\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not avx2', {str(here)!r}]))"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=here.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "passed" in done.stdout and len(list(tmp_path.rglob("*.so"))) == 1
