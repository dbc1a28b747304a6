"""Loss functions through the worker against textbook formulas (§5 of tinker-protocol.md) on a
PEFT copy of the same adapter: values, per-datum outputs and adapter gradients."""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import peft
import pytest
import torch
from numerics import assert_close_scaled
from torch import nn

from tinkerd.model.loading import BaseModel
from tinkerd.model.lora import Adapter, LoraConfig
from tinkerd.model.losses import LossInputError
from tinkerd.model.types import Datum, ForwardBackwardInput
from tinkerd.model.worker import ModelWorker

ATOL, RTOL = 1e-5, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
LENGTHS = [(4, 9), (6, 6), (3, 12), (5, 8)]  # (prompt tokens, completion tokens) per datum
# Log-ratios log(r) = lp - q kept away from every clip boundary used below, so that the
# tinkerd pass and the reference agree on which tokens are clipped.
LOG_RATIOS = (-1.0, -0.7, -0.1, 0.0, 0.1, 0.7, 1.0)


@dataclass
class Env:
    """A worker with one randomised adapter "a", and its PEFT twin."""

    worker: ModelWorker
    adapter: Adapter
    peft_model: nn.Module
    vocab: int


@pytest.fixture
def env(tiny_base: BaseModel) -> Env:
    """Adapter "a" (rank 8, alpha 16) with random non-zero A and B, and a PEFT copy of it."""
    ref = copy.deepcopy(tiny_base.model)
    worker = ModelWorker(tiny_base)
    worker.add_adapter("a", LoraConfig(rank=8, alpha=16, seed=0))
    adapter = worker.lora.adapters["a"]
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(ref, cfg)
    with torch.no_grad():
        for name, value in adapter.params.items():
            peft_param(model, name).copy_(value)
    return Env(worker, adapter, model, tiny_base.info.vocab_size)


def peft_param(model: nn.Module, name: str) -> torch.Tensor:
    """The PEFT parameter for a tinkerd name like `model.layers.0.mlp.up_proj.lora_A.weight`."""
    path, _, kind = name.removesuffix(".weight").rpartition(".")
    return getattr(model.base_model.model.get_submodule(path), kind)["default"].weight


def ref_logprobs(model: nn.Module, datum: Datum) -> torch.Tensor:
    """Target log-probs, (N,) or (N, K), of one datum through the PEFT model."""
    logits = model(input_ids=torch.tensor([datum.tokens])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    targets = datum.loss_fn_inputs["target_tokens"]
    if targets.dim() == 2:
        return logp.gather(-1, targets)
    return logp.gather(-1, targets[:, None])[:, 0]


def base_data(vocab: int, seed: int, k: list[int] | None = None) -> list[Datum]:
    """Datums of LENGTHS with random tokens and targets; k[i] > 0 makes datum i 2-D (N, k)."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i, (p, c) in enumerate(LENGTHS):
        n = p + c
        tokens = torch.randint(0, 256, (n,), generator=gen).tolist()
        shape = (n, k[i]) if k and k[i] else (n,)
        targets = torch.randint(0, vocab, shape, generator=gen)
        data.append(Datum(tokens, {"target_tokens": targets}))
    return data


def ce_data(vocab: int, seed: int, k: list[int] | None = None) -> list[Datum]:
    """Cross-entropy datums with real weights of both signs (2-D where k says so)."""
    gen = torch.Generator().manual_seed(seed + 1)
    data = base_data(vocab, seed, k)
    for d in data:
        d.loss_fn_inputs["weights"] = torch.randn(
            d.loss_fn_inputs["target_tokens"].shape, generator=gen
        )
    return data


def rl_data(env: Env, seed: int, seq_log_ratios: list[float] | None = None) -> list[Datum]:
    """RL datums: on completion tokens q = lp - log r (log r from LOG_RATIOS, or per datum from
    `seq_log_ratios` plus zero-mean noise) and advantages of both signs; on prompt tokens
    advantages 0 and q = 0 (arbitrary, as the e2e tests send); sequence_ratio_mask marks the
    completion."""
    gen = torch.Generator().manual_seed(seed + 2)
    data = base_data(env.vocab, seed)
    choices = torch.tensor(LOG_RATIOS)
    for i, (d, (p, c)) in enumerate(zip(data, LENGTHS, strict=True)):
        with torch.no_grad():
            lp = ref_logprobs(env.peft_model, d)
        if seq_log_ratios is None:
            log_r = choices[torch.randint(0, len(LOG_RATIOS), (c,), generator=gen)]
        else:
            noise = torch.randn(c, generator=gen) * 0.3
            log_r = seq_log_ratios[i] + noise - noise.mean()
        adv = torch.randn(c, generator=gen)
        adv = torch.where(adv >= 0, adv + 0.2, adv - 0.2)
        q = torch.zeros(p + c)
        q[p:] = lp[p:] - log_r
        mask = torch.zeros(p + c)
        mask[p:] = 1.0
        d.loss_fn_inputs["logprobs"] = q
        d.loss_fn_inputs["advantages"] = torch.cat([torch.zeros(p), adv])
        d.loss_fn_inputs["sequence_ratio_mask"] = mask
    return data


def ppo_clip(r: torch.Tensor, adv: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """-min(r A, clip(r) A) written as a case split: the clipped branch is a constant."""
    clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
    return -torch.where(clipped, r.detach().clamp(lo, hi) * adv, r * adv)


def reference(name: str, lp: torch.Tensor, inp: dict, cfg: dict) -> torch.Tensor:
    """The per-token loss of §5 (elementwise, summed over K for 2-D cross-entropy)."""
    if name == "cross_entropy":
        loss = -lp * inp["weights"]
        return loss.sum(-1) if loss.dim() == 2 else loss
    q, adv = inp["logprobs"], inp["advantages"]
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    r = torch.exp(lp - q)
    if name == "importance_sampling":
        return -r * adv
    if name == "ppo":
        return ppo_clip(r, adv, lo, hi)
    if name == "cispo":
        return -r.detach().clamp(lo, hi) * lp * adv
    if name == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2)
    if name == "gspo":
        m = inp["sequence_ratio_mask"]
        log_seq = ((lp.detach() - q) * m).sum() / m.sum()
        s = torch.exp(log_seq + lp - lp.detach())
        return ppo_clip(s, adv, lo, hi) * m
    raise AssertionError(name)


def clip_cases(r: torch.Tensor, adv: torch.Tensor, lo: float, hi: float) -> dict[str, int]:
    """How many tokens fall in each ratio/advantage-sign region (to prove clipping is active)."""
    return {
        "pos_above": int(((adv > 0) & (r > hi)).sum()),
        "neg_below": int(((adv < 0) & (r < lo)).sum()),
        "pos_below": int(((adv > 0) & (r < lo)).sum()),
        "neg_above": int(((adv < 0) & (r > hi)).sum()),
        "inside": int(((adv != 0) & (r >= lo) & (r <= hi)).sum()),
    }


DataFn = Callable[[Env], list[Datum]]
CASES: list[tuple[str, dict[str, float], DataFn]] = [
    ("cross_entropy", {}, lambda e: ce_data(e.vocab, 0)),
    ("cross_entropy", {}, lambda e: ce_data(e.vocab, 1, k=[0, 3, 2, 0])),
    ("importance_sampling", {}, lambda e: rl_data(e, 2)),
    ("ppo", {}, lambda e: rl_data(e, 3)),
    ("ppo", {"clip_low_threshold": 0.6, "clip_high_threshold": 1.5}, lambda e: rl_data(e, 4)),
    ("cispo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}, lambda e: rl_data(e, 5)),
    ("dro", {"beta": 0.3}, lambda e: rl_data(e, 6)),
    (
        "gspo",
        {"clip_low_threshold": 0.75, "clip_high_threshold": 1.3},
        lambda e: rl_data(e, 7, seq_log_ratios=[-0.8, 0.05, 0.7, -0.05]),
    ),
]
CASE_IDS = ["ce", "ce_2d", "is", "ppo_default", "ppo", "cispo", "dro", "gspo"]


@pytest.mark.parametrize(("loss_fn", "cfg", "make_data"), CASES, ids=CASE_IDS)
def test_loss_matches_reference(
    env: Env, loss_fn: str, cfg: dict[str, float], make_data: DataFn
) -> None:
    """loss:sum, per-datum logprobs and elementwise_loss, and every adapter gradient equal
    the textbook formula applied to PEFT logprobs (clipping active where the loss clips)."""
    data = make_data(env)
    item = ForwardBackwardInput("a", data, loss_fn, dict(cfg))
    env.worker.validate(item)
    out = env.worker.forward_backward([item])[0]
    total = torch.zeros(())
    counts: dict[str, int] = {}
    for datum, got in zip(data, out.loss_fn_outputs, strict=True):
        lp = ref_logprobs(env.peft_model, datum)
        inp = {
            k: v.float() if v.is_floating_point() else v for k, v in datum.loss_fn_inputs.items()
        }
        loss = reference(loss_fn, lp, inp, cfg)
        total = total + loss.sum()
        torch.testing.assert_close(got["logprobs"], lp.detach(), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got["elementwise_loss"], loss.detach(), atol=ATOL, rtol=RTOL)
        if loss_fn in ("ppo", "cispo"):
            lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
            r = torch.exp(lp.detach() - inp["logprobs"])
            for k, v in clip_cases(r, inp["advantages"], lo, hi).items():
                counts[k] = counts.get(k, 0) + v
    assert all(counts.values()), counts  # every clip region occurs (ppo, cispo)
    assert out.metrics["loss:sum"] == pytest.approx(total.item(), rel=RTOL, abs=ATOL)
    total.backward()
    for name, param in env.adapter.params.items():
        expected = peft_param(env.peft_model, name).grad
        assert expected.abs().max() > 0 and param.grad is not None, name
        # Sums over the vocabulary (softmax backward) and over every token of the batch.
        terms = max(env.vocab, sum(len(d.tokens) for d in data))
        assert_close_scaled(param.grad, expected, terms=terms, msg=name)


def test_gspo_clipping_is_active(env: Env) -> None:
    """The gspo case has sequences whose ratio is above, inside and below the clip range, with
    advantages of both signs, and prompt positions (q = 0) outside the sequence ratio."""
    data = CASES[-1][2](env)
    lo, hi = 0.75, 1.3
    counts = {"pos_above": 0, "neg_below": 0, "pos_below": 0, "neg_above": 0, "inside": 0}
    for d in data:
        with torch.no_grad():
            lp = ref_logprobs(env.peft_model, d)
        m = d.loss_fn_inputs["sequence_ratio_mask"]
        q = d.loss_fn_inputs["logprobs"]
        seq = torch.exp(((lp - q) * m).sum() / m.sum())
        r = seq.expand_as(lp)
        for k, v in clip_cases(r, d.loss_fn_inputs["advantages"], lo, hi).items():
            counts[k] += v
    assert all(counts.values()), counts


def test_gspo_ratio_ignores_unmasked_tokens(env: Env) -> None:
    """Changing q on tokens outside sequence_ratio_mask changes neither loss nor gradient."""
    data = rl_data(env, 8, seq_log_ratios=[0.3, -0.3, 0.0, 0.6])
    item = ForwardBackwardInput("a", data, "gspo", {})
    first = env.worker.forward_backward([item])[0]
    grads = [p.grad.clone() for p in env.adapter.parameters()]
    env.worker.zero_grad("a")
    for d, (p, _) in zip(data, LENGTHS, strict=True):
        d.loss_fn_inputs["logprobs"][:p] = -50.0
    second = env.worker.forward_backward([item])[0]
    assert second.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"], abs=1e-6)
    for g, p in zip(grads, env.adapter.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_half_batches_accumulate_to_full_batch(env: Env, loss_fn: str) -> None:
    """Two forward_backward calls of two datums each accumulate the gradient of one call with
    all four (sum, not mean)."""
    data = ce_data(env.vocab, 9) if loss_fn == "cross_entropy" else rl_data(env, 9)
    cfg = {"clip_low_threshold": 0.6, "clip_high_threshold": 1.5} if loss_fn == "ppo" else {}
    full = env.worker.forward_backward([ForwardBackwardInput("a", data, loss_fn, cfg)])[0]
    full_grads = [p.grad.clone() for p in env.adapter.parameters()]
    env.worker.zero_grad("a")
    halves = [
        env.worker.forward_backward([ForwardBackwardInput("a", part, loss_fn, cfg)])[0]
        for part in (data[:2], data[2:])
    ]
    summed = sum(h.metrics["loss:sum"] for h in halves)
    assert summed == pytest.approx(full.metrics["loss:sum"], rel=RTOL, abs=ATOL)
    for g, p in zip(full_grads, env.adapter.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=ATOL, rtol=RTOL)


def test_forward_only_leaves_grads_alone(env: Env) -> None:
    """forward_only gives the same outputs as a training pass but creates no .grad and leaves
    pending gradients bit-identical, also when batched with a training input."""
    data = rl_data(env, 10)
    cfg = {"beta": 0.1}
    fo = ForwardBackwardInput("a", data, "dro", cfg, forward_only=True)
    only = env.worker.forward_backward([fo])[0]
    assert all(p.grad is None for p in env.adapter.parameters())
    trained = env.worker.forward_backward([ForwardBackwardInput("a", data, "dro", cfg)])[0]
    assert only.metrics["loss:sum"] == pytest.approx(trained.metrics["loss:sum"], abs=1e-6)
    for a, b in zip(only.loss_fn_outputs, trained.loss_fn_outputs, strict=True):
        torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a["elementwise_loss"], b["elementwise_loss"], atol=1e-6, rtol=0)
    pending = [p.grad.clone() for p in env.adapter.parameters()]
    env.worker.forward_backward([fo])
    assert all(
        torch.equal(p.grad, g) for p, g in zip(env.adapter.parameters(), pending, strict=True)
    )
    # Mixed: a forward-only input beside a training input adds only the training gradient.
    ce = ce_data(env.vocab, 11)
    env.worker.zero_grad("a")
    env.worker.forward_backward([ForwardBackwardInput("a", ce)])
    ce_grads = [p.grad.clone() for p in env.adapter.parameters()]
    env.worker.zero_grad("a")
    env.worker.forward_backward([fo, ForwardBackwardInput("a", ce)])
    for g, p in zip(ce_grads, env.adapter.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=ATOL, rtol=RTOL)


def good_ce(n: int = 5) -> Datum:
    """A valid cross-entropy datum of n tokens."""
    return Datum(
        list(range(1, n + 1)),
        {"target_tokens": torch.arange(2, n + 2), "weights": torch.ones(n)},
    )


def good_rl(n: int = 5) -> Datum:
    """A valid RL datum (no weights: RL losses don't need them)."""
    return Datum(
        list(range(1, n + 1)),
        {
            "target_tokens": torch.arange(2, n + 2),
            "logprobs": torch.zeros(n),
            "advantages": torch.ones(n),
            "sequence_ratio_mask": torch.ones(n),
        },
    )


def with_input(datum: Datum, key: str, value: torch.Tensor | None) -> Datum:
    """A copy of `datum` with one loss input replaced (None: removed)."""
    inputs = dict(datum.loss_fn_inputs)
    if value is None:
        inputs.pop(key)
    else:
        inputs[key] = value
    return Datum(list(datum.tokens), inputs)


VOCAB = 320  # the tiny model's vocabulary
BAD_INPUTS: dict[str, ForwardBackwardInput] = {
    "unknown_loss": ForwardBackwardInput("a", [good_ce()], "mse"),
    "empty_data": ForwardBackwardInput("a", [], "cross_entropy"),
    "empty_tokens": ForwardBackwardInput(
        "a",
        [Datum([], {"target_tokens": torch.zeros(0, dtype=torch.long), "weights": torch.zeros(0)})],
    ),
    "missing_weights": ForwardBackwardInput("a", [with_input(good_ce(), "weights", None)]),
    "missing_targets": ForwardBackwardInput("a", [with_input(good_ce(), "target_tokens", None)]),
    "missing_advantages": ForwardBackwardInput(
        "a", [with_input(good_rl(), "advantages", None)], "ppo"
    ),
    "missing_logprobs": ForwardBackwardInput(
        "a", [with_input(good_rl(), "logprobs", None)], "importance_sampling"
    ),
    "missing_mask": ForwardBackwardInput(
        "a", [with_input(good_rl(), "sequence_ratio_mask", None)], "gspo"
    ),
    "length_mismatch": ForwardBackwardInput("a", [with_input(good_ce(), "weights", torch.ones(4))]),
    "rl_length_mismatch": ForwardBackwardInput(
        "a", [with_input(good_rl(), "advantages", torch.ones(6))], "ppo"
    ),
    "nan_weights": ForwardBackwardInput(
        "a", [with_input(good_ce(), "weights", torch.tensor([1.0, math.nan, 1, 1, 1]))]
    ),
    "inf_advantages": ForwardBackwardInput(
        "a", [with_input(good_rl(), "advantages", torch.tensor([1.0, 1, math.inf, 1, 1]))], "ppo"
    ),
    "nan_logprobs": ForwardBackwardInput(
        "a", [with_input(good_rl(), "logprobs", torch.full((5,), math.nan))], "cispo"
    ),
    "token_too_big": ForwardBackwardInput("a", [Datum([1, 2, VOCAB], good_ce(3).loss_fn_inputs)]),
    "token_negative": ForwardBackwardInput("a", [Datum([1, -1, 3], good_ce(3).loss_fn_inputs)]),
    "target_too_big": ForwardBackwardInput(
        "a", [with_input(good_ce(), "target_tokens", torch.tensor([1, 2, 3, 4, VOCAB]))]
    ),
    "target_negative": ForwardBackwardInput(
        "a", [with_input(good_ce(), "target_tokens", torch.tensor([1, 2, -3, 4, 5]))]
    ),
    "float_targets": ForwardBackwardInput(
        "a", [with_input(good_ce(), "target_tokens", torch.arange(5.0))]
    ),
    "weights_shape_2d": ForwardBackwardInput(
        "a", [with_input(good_ce(), "target_tokens", torch.ones(5, 2, dtype=torch.long))]
    ),
    "too_long": ForwardBackwardInput(
        "a",
        [
            Datum(
                [1] * 600,
                {"target_tokens": torch.ones(600, dtype=torch.long), "weights": torch.ones(600)},
            )
        ],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_validate_rejects_bad_inputs(env: Env, case: str) -> None:
    """worker.validate raises LossInputError for each malformed request."""
    with pytest.raises(LossInputError):
        env.worker.validate(BAD_INPUTS[case])


def test_validate_accepts_good_inputs(env: Env) -> None:
    """Valid requests for every loss (RL without weights, 2-D CE, base rows) pass validate."""
    two_d = Datum(
        [1, 2, 3],
        {"target_tokens": torch.ones(3, 4, dtype=torch.long), "weights": -torch.ones(3, 4)},
    )
    env.worker.validate(ForwardBackwardInput("a", [good_ce(), two_d]))
    env.worker.validate(ForwardBackwardInput(None, [good_ce()], forward_only=True))
    for loss in ("importance_sampling", "ppo", "cispo", "gspo"):
        env.worker.validate(ForwardBackwardInput("a", [good_rl()], loss))
    env.worker.validate(ForwardBackwardInput("a", [good_rl()], "dro", {"beta": 0.1}))


@pytest.mark.parametrize(
    ("loss_fn", "cfg"),
    [("dro", {}), ("ppo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2})],
    ids=["dro_no_beta", "ppo_low_gt_high"],
)
def test_validate_rejects_bad_config(env: Env, loss_fn: str, cfg: dict[str, float]) -> None:
    """A config that can never run (dro without beta, low > high clip) fails in validate."""
    with pytest.raises(LossInputError):
        env.worker.validate(ForwardBackwardInput("a", [good_rl()], loss_fn, cfg))


@pytest.mark.parametrize(
    ("loss_fn", "key", "value"),
    [
        ("cross_entropy", "weights", torch.tensor(1.0)),
        ("ppo", "advantages", torch.ones(5, 2)),
        ("ppo", "advantages", torch.ones(5, 5)),
    ],
    ids=["ce_0dim_weights", "ppo_adv_5x2", "ppo_adv_5x5_broadcasts"],
)
def test_validate_rejects_bad_input_shapes(
    env: Env, loss_fn: str, key: str, value: torch.Tensor
) -> None:
    """Loss inputs whose shape is not target_tokens' shape are a LossInputError in validate."""
    datum = good_ce() if loss_fn == "cross_entropy" else good_rl()
    with pytest.raises(LossInputError):
        env.worker.validate(ForwardBackwardInput("a", [with_input(datum, key, value)], loss_fn))


def test_bad_config_raises_loss_input_error_in_pass(env: Env) -> None:
    """Today a bad config raises LossInputError (a user error) when the pass runs."""
    for loss_fn, cfg in [("dro", {}), ("cispo", {"clip_low_threshold": 2.0})]:
        with pytest.raises(LossInputError):
            env.worker.forward_backward([ForwardBackwardInput("a", [good_rl()], loss_fn, cfg)])
