"""stable_reinforce against a plain float64 reference written token by token, and the sequence
record store's bounds (TTL, bytes)."""

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from tinkerd.model.losses import STABLE_REINFORCE_DEFAULTS, LossInputError, stable_reinforce
from tinkerd.store.records import StabilityRecord
from tinkerd.store.store import Store


def reference(
    lp: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]
) -> torch.Tensor:
    """The documented formula, one token at a time, in float64 (lp must be float64)."""
    c = {**STABLE_REINFORCE_DEFAULTS, **cfg}
    n = lp.shape[0]
    drift = [float(lp[t].detach()) - float(inp["base_logprobs"][t]) for t in range(n)]
    seq_mean: dict[int, float] = {}
    for g in {int(x) for x in inp["sequence_index"].tolist() if x >= 0}:
        ts = [t for t in range(n) if inp["sampled_mask"][t] > 0 and inp["sequence_index"][t] == g]
        seq_mean[g] = sum(drift[t] for t in ts) / len(ts)
    total = lp.new_zeros(())
    for t in range(n):
        if inp["sampled_mask"][t] <= 0:
            continue
        g = int(inp["sequence_index"][t])
        keep = c["token_mask_low"] <= math.exp(drift[t]) <= c["token_mask_high"]
        keep &= c["sequence_mask_low"] <= math.exp(seq_mean[g]) <= c["sequence_mask_high"]
        if not keep:
            continue
        ratio = math.exp(float(lp[t]) - float(inp["behaviour_logprobs"][t]))
        weight = min(ratio, c["clip_high_threshold"])
        total = total - weight * float(inp["advantages"][t]) * lp[t]
    return total


def make_inputs(seed: int, n: int = 24) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two sampled sequences after a 4-token prompt, drifts chosen on both sides of every
    mask bound (never on one) and ratios on both sides of the clip."""
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 0.05
    sampled = torch.zeros(n)
    sampled[4:] = 1
    index = torch.full((n,), -1.0)
    index[4:14], index[14:] = 0, 1
    # log drift in (-2.5, 2.5): exp spans [0.08, 12], straddling the token mask [0.2, 5].
    drift = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 5
    base = lp - drift
    # behaviour = base minus up to 1 nat (a sharper sampling distribution), ratio straddles 2.
    behaviour = base - torch.rand(n, generator=gen, dtype=torch.float64)
    adv = torch.where(sampled > 0, torch.randn(n, generator=gen, dtype=torch.float64), 0.0)
    inp = {
        "advantages": adv,
        "behaviour_logprobs": behaviour,
        "base_logprobs": base,
        "sampled_mask": sampled,
        "sequence_index": index,
        "weights_step": torch.where(sampled > 0, 3.0, -1.0),
    }
    return lp, inp


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "cfg",
    [{}, {"clip_high_threshold": 1.5, "sequence_mask_low": 0.0, "sequence_mask_high": 1e9}],
)
def test_value_and_gradient_match_the_reference(seed: int, cfg: dict[str, float]) -> None:
    lp, inp = make_inputs(seed)
    ours_lp = lp.clone().requires_grad_(True)
    ref_lp = lp.clone().requires_grad_(True)
    loss, metrics = stable_reinforce(ours_lp, inp, {**cfg, "optim_steps": 5.0})
    loss.sum().backward()
    expected = reference(ref_lp, inp, cfg)
    expected.backward()
    # float64 throughout: agreement to rounding of a few dozen summed terms.
    assert float(loss.sum()) == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(ours_lp.grad, ref_lp.grad, rtol=1e-12, atol=1e-12)
    assert metrics["stable_reinforce/staleness:max"] == 2.0
    assert 0.0 <= metrics["stable_reinforce/token_masked_frac:mean"] <= 1.0


def test_some_tokens_masked_some_clipped_some_kept() -> None:
    """The generated cases exercise every branch (else the comparison above proves little)."""
    lp, inp = make_inputs(0)
    _, m = stable_reinforce(lp, inp, {"sequence_mask_low": 0.0, "sequence_mask_high": 1e9})
    assert 0.0 < m["stable_reinforce/token_masked_frac:mean"] < 1.0
    assert 0.0 < m["stable_reinforce/clipped_frac:mean"] < 1.0
    assert m["stable_reinforce/sequence_masked_frac:mean"] == 0.0


def test_on_policy_is_plain_reinforce() -> None:
    """Fresh temperature-1 samples (q = p1 = lp): loss = -A * lp, gradient -A."""
    lp, inp = make_inputs(1)
    inp["behaviour_logprobs"] = inp["base_logprobs"] = lp.clone()
    x = lp.clone().requires_grad_(True)
    loss, m = stable_reinforce(x, inp, {})
    loss.sum().backward()
    torch.testing.assert_close(x.grad, -inp["advantages"])
    assert m["stable_reinforce/ratio:mean"] == pytest.approx(1.0)
    assert m["stable_reinforce/token_masked_frac:mean"] == 0.0


def test_a_drifted_sequence_is_masked_whole() -> None:
    lp, inp = make_inputs(2)
    inp["behaviour_logprobs"] = inp["base_logprobs"] = lp.clone()
    inp["base_logprobs"][14:] -= 1.0  # sequence 1: policy drift e^1 on every token
    x = lp.clone().requires_grad_(True)
    loss, m = stable_reinforce(x, inp, {})
    loss.sum().backward()
    assert torch.all(x.grad[14:] == 0) and torch.all(x.grad[4:14] != 0)
    assert m["stable_reinforce/sequence_masked_frac:mean"] == 0.5


@pytest.mark.parametrize(
    "cfg",
    [
        {"clip_high_threshold": 0.9},
        {"token_mask_low": 1.5},
        {"token_mask_high": 0.5},
        {"sequence_mask_low": -0.1},
    ],
)
def test_bad_knobs_are_refused(cfg: dict[str, float]) -> None:
    lp, inp = make_inputs(0)
    with pytest.raises(LossInputError, match="stable_reinforce"):
        stable_reinforce(lp, inp, cfg)


def record(request_id: str, size: int) -> StabilityRecord:
    return StabilityRecord(
        request_id=request_id,
        session_id="s",
        user="u",
        base_model="m",
        weights_run=None,
        weights_step=None,
        prompt=b"\0" * 4,
        lengths=[1],
        tokens=b"\0" * 4,
        behaviour_logprobs=b"\0" * 4,
        base_logprobs=b"\0" * 4,
        size_bytes=size,
    )


def test_records_expire_a_day_after_last_use_and_fit_the_byte_bound(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for i in range(5):
        assert store.add_stability_record(record(f"r{i}", 100))
    assert not store.add_stability_record(record("r0", 100))  # recorded once
    day_ago = datetime.now(UTC) - timedelta(days=1)
    assert set(store.stability_records(["r0", "r1"], "s", "u", day_ago)) == {"r0", "r1"}
    # Another session or user: absent, as unknown ids are.
    assert store.stability_records(["r0"], "other", "u", day_ago) == {}
    assert store.stability_records(["r0"], "s", "other", day_ago) == {}
    store.touch_stability_records(["r0"])  # r0 is now the most recently used
    # Over the bound: the least recently used go first, r0 stays.
    assert store.sweep_stability_records(day_ago, max_bytes=250) == 3
    assert store.stability_bytes() == 200
    left = store.stability_records([f"r{i}" for i in range(5)], "s", "u", day_ago)
    assert "r0" in left and len(left) == 2
    # A day without use: gone.
    assert store.sweep_stability_records(datetime.now(UTC) + timedelta(seconds=1), 1 << 30) == 2
    assert store.stability_bytes() == 0
