"""Tolerances for comparing float32 results with a reference, derived from the computation.

A fixed tiny `atol` (say 1e-5) between two float32 implementations is a statement about the
kernels, not about the code under test: the same sums taken in another order (AVX2 instead of
AVX512 kernels, another blocking, another BLAS) round differently, and a gradient of magnitude
40 has an ulp of 4e-6 on its own. `assert_close_scaled` instead bounds the error by what float32
rounding can produce for the computation at hand, so it holds on every CPU kind while still
catching real mistakes (a dropped token, a wrong adapter, a bf16 round trip), which are orders
of magnitude larger.
"""

import torch

# Above this relative tolerance the bound no longer tells a correct result from a wrong one
# (a bf16 round trip alone is ~4e-3): ask for a float64 reference or a smaller computation.
MAX_RELATIVE_TOLERANCE = 1e-3


def scaled_tolerance(expected: torch.Tensor, *, terms: int, dtype: torch.dtype) -> float:
    """`terms` x eps(`dtype`) x max|expected|: the absolute tolerance `assert_close_scaled` uses."""
    relative = terms * torch.finfo(dtype).eps
    if relative > MAX_RELATIVE_TOLERANCE:
        raise ValueError(
            f"terms={terms} gives a relative tolerance of {relative:.2g} in {dtype}, too loose to "
            "catch real errors; compare against a float64 reference instead"
        )
    return relative * float(expected.detach().abs().max()) if expected.numel() else 0.0


def assert_close_scaled(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    terms: int,
    msg: str = "",
) -> None:
    """Assert |actual - expected| <= terms x eps x max|expected| everywhere.

    Why this bound: the rounding error of a floating-point sum of n terms is, with high
    probability, at most about sqrt(n) x eps x sum|x_i| (Higham & Mary, "A new approach to
    probabilistic rounding error analysis", 2019; the worst case is n x eps x sum|x_i|). For
    terms of mixed sign, as in gradients and logits, sum|x_i| is about sqrt(n) x |sum x_i|,
    so the error of every element is about n x eps times the magnitude of the results, for
    which the tensor's max-abs stands in. Elements much smaller than the max (after
    cancellation) keep the absolute error of the large ones, so no per-element relative
    tolerance is used.

    `terms`: the length of the longest sum that feeds one element of the result (e.g. the
    vocabulary size for anything back-propagated through the unembedding, or the number of
    tokens summed into a weight gradient, whichever is larger). eps is that of `actual`'s
    dtype (float32 for the code under test). `expected` is best a float64 reference: then
    the whole tolerance is for `actual`'s rounding; a float32 `expected` shares it.
    """
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values in actual"
    tol = scaled_tolerance(expected, terms=terms, dtype=actual.dtype)
    diff = (actual.detach().double() - expected.detach().double()).abs()
    if diff.numel() and float(diff.max()) > tol:
        worst = int(diff.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{msg}: max |actual - expected| = {float(diff.max()):.3g} at {index} "
            f"(actual {float(actual.flatten()[worst]):.8g}, "
            f"expected {float(expected.flatten()[worst]):.8g}) exceeds {tol:.3g} = "
            f"terms {terms} x eps {torch.finfo(actual.dtype).eps:.3g} x "
            f"max|expected| {float(expected.detach().abs().max()):.3g}"
        )
