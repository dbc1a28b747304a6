"""Tinker's loss functions, per token and summed (never averaged): `tinker-protocol.md` §5.

Each loss maps one datum's target logprobs `lp` (from this pass, differentiable) and its
`loss_fn_inputs` to a per-token loss tensor. The caller sums them over tokens and datums.
Notation: q = sampler logprobs (`logprobs` input), A = `advantages`, r = exp(lp - q).
"""

from collections.abc import Callable, Mapping

import torch


class LossInputError(ValueError):
    """The caller's loss inputs or config are wrong (a user error, not a server fault)."""


LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]

RL_INPUTS = ("target_tokens", "logprobs", "advantages")


def cross_entropy(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    """-lp * weights. Weights may be any real number; 2-D (N, K) sums over K."""
    loss = -lp * inputs["weights"]
    return loss.sum(dim=-1) if loss.dim() == 2 else loss


def importance_sampling(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"])


def clip_bounds(config: Mapping[str, float]) -> tuple[float, float]:
    low = float(config.get("clip_low_threshold", 0.8))
    high = float(config.get("clip_high_threshold", 1.2))
    if not (0.0 <= low <= high):
        raise LossInputError(
            f"need 0 <= clip_low_threshold <= clip_high_threshold, got {low} and {high}"
        )
    return low, high


def ppo(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    low, high = clip_bounds(config)
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    return -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)


def cispo(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    low, high = clip_bounds(config)
    ratio = torch.exp(lp - inputs["logprobs"]).clamp(low, high).detach()
    return -(ratio * lp * inputs["advantages"])


def dro(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    if "beta" not in config:
        raise LossInputError("dro needs loss_fn_config['beta']")
    beta = float(config["beta"])
    q = inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * beta * (lp - q) ** 2)


def gspo(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    """PPO-style clipping on the sequence-level ratio exp(mean over mask of (lp - q)), with the
    token-level gradient of GSPO-token: s_t = exp(sg[mean(lp - q)] + lp_t - sg[lp_t])."""
    low, high = clip_bounds(config)
    mask = inputs["sequence_ratio_mask"]
    adv = inputs["advantages"]
    n = mask.sum()
    if n <= 0:
        return torch.zeros_like(lp)
    log_seq_ratio = ((lp.detach() - inputs["logprobs"]) * mask).sum() / n
    ratio = torch.exp(log_seq_ratio + lp - lp.detach())
    per_token = -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
    return per_token * mask


LOSSES: dict[str, tuple[LossFn, tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ("target_tokens", "weights")),
    "importance_sampling": (importance_sampling, RL_INPUTS),
    "ppo": (ppo, RL_INPUTS),
    "cispo": (cispo, RL_INPUTS),
    "dro": (dro, RL_INPUTS),
    "gspo": (gspo, (*RL_INPUTS, "sequence_ratio_mask")),
}


# Loss names of tinker 0.38 that tinkerd cannot run faithfully, with the reason (COMPAT.md).
UNSUPPORTED_LOSSES: dict[str, str] = {
    "stable_reinforce": (
        "its math is not public (neither the SDK nor the cookbook describes it) and it needs "
        "stability data the hosted sampler records per sequence; use importance_sampling, "
        "ppo, cispo, dro or gspo"
    ),
    "custom": (
        "uploaded loss graphs are not executed on the server; tinkerd leaves "
        "custom_loss_server_side off, so create_custom_loss and forward_backward_custom run "
        "the loss on the client"
    ),
}


def get_loss(name: str) -> tuple[LossFn, tuple[str, ...]]:
    """The loss function and its required input names, or a LossInputError naming the choices."""
    if name in UNSUPPORTED_LOSSES:
        raise LossInputError(f"{name} is not supported by tinkerd: {UNSUPPORTED_LOSSES[name]}")
    if name not in LOSSES:
        known = ", ".join(sorted(LOSSES))
        raise LossInputError(f"unknown loss_fn {name!r}; supported: {known}")
    return LOSSES[name]
