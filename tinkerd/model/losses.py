"""Tinker's loss functions, per token and summed (never averaged): `tinker-protocol.md` §5.

Each loss maps one datum's target logprobs `lp` (from this pass, differentiable) and its
`loss_fn_inputs` to a per-token loss tensor. The caller sums them over tokens and datums.
Notation: q = sampler logprobs (`logprobs` input), A = `advantages`, r = exp(lp - q).
"""

import math
from collections.abc import Callable, Mapping

import torch


class LossInputError(ValueError):
    """The caller's loss inputs or config are wrong (a user error, not a server fault)."""


# A loss returns the per-token loss, or that and per-datum metrics (`name:reduction` → scalar,
# combined over datums by tinkerd.model.metrics).
LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]
LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], LossOutput]

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


# Per-target inputs the server fills for stable_reinforce from its sequence records (a client
# cannot supply them: the service overwrites these keys). See tinkerd/api/stability.py.
STABILITY_INPUTS = (
    "behaviour_logprobs",  # q: under the distribution each token was drawn from
    "base_logprobs",  # p1: under the untruncated temperature-1 distribution, same weights
    "sampled_mask",  # 1 where the target is a sampled token, else 0
    "sequence_index",  # which sampled sequence of the datum (0, 1, ...), -1 if none
    "weights_step",  # optim steps of this run the sampler's weights had; -1 if unknown
)
STABLE_REINFORCE_DEFAULTS = {
    "clip_high_threshold": 2.0,  # token weights min(ratio, this): truncated IS
    "token_mask_low": 0.2,  # drop a token whose policy drift exp(lp - p1) is outside
    "token_mask_high": 5.0,  #   [token_mask_low, token_mask_high]
    "sequence_mask_low": 0.5,  # drop a whole sequence whose geometric-mean drift is outside
    "sequence_mask_high": 2.0,  #   [sequence_mask_low, sequence_mask_high]
}


def stable_reinforce_config(config: Mapping[str, float]) -> dict[str, float]:
    """The knobs with their defaults, checked."""
    c = {k: float(config.get(k, v)) for k, v in STABLE_REINFORCE_DEFAULTS.items()}
    if not c["clip_high_threshold"] >= 1.0:
        raise LossInputError(
            f"stable_reinforce: clip_high_threshold must be >= 1, got {c['clip_high_threshold']}"
        )
    for kind in ("token", "sequence"):
        low, high = c[f"{kind}_mask_low"], c[f"{kind}_mask_high"]
        if not 0.0 <= low <= 1.0 <= high:
            raise LossInputError(
                f"stable_reinforce: need 0 <= {kind}_mask_low <= 1 <= {kind}_mask_high, "
                f"got {low} and {high}"
            )
    return c


def stable_reinforce(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with server-recorded behaviour logprobs, truncated token weights, and token-
    and sequence-level masking of stale data (tinkerd's own objective; docs/api.md explains it).

    Per sampled target t of sequence g:
        ratio_t = exp(sg[lp_t] - q_t)           q: the sampler's logprob (what it drew from)
        drift_t = exp(sg[lp_t] - p1_t)          p1: same weights, temperature 1, untruncated
        keep_t  = low_tok <= drift_t <= high_tok  and  low_seq <= exp(mean_g log drift) <= high_seq
        loss_t  = -min(ratio_t, clip_high) * keep_t * A_t * lp_t
    Prompt targets contribute nothing. The client's `logprobs` input is ignored.
    """
    c = stable_reinforce_config(config)
    sampled = inputs["sampled_mask"] > 0
    seq = inputs["sequence_index"].long()
    lp_d = lp.detach()
    log_ratio = torch.where(sampled, lp_d - inputs["behaviour_logprobs"], 0.0)
    log_drift = torch.where(sampled, lp_d - inputs["base_logprobs"], 0.0)
    ratio = torch.exp(log_ratio)
    keep_token = (log_drift >= math.log(max(c["token_mask_low"], 1e-30))) & (
        log_drift <= math.log(c["token_mask_high"])
    )
    n_seq = int(seq.max()) + 1 if sampled.any() else 0
    keep_seq = torch.ones_like(sampled)
    seq_masked = 0
    for g in range(n_seq):
        in_g = sampled & (seq == g)
        count = int(in_g.sum())
        if count == 0:
            continue
        mean_drift = float(log_drift[in_g].sum()) / count
        low, high = c["sequence_mask_low"], c["sequence_mask_high"]
        if not math.log(max(low, 1e-30)) <= mean_drift <= math.log(high):
            keep_seq &= ~in_g
            seq_masked += 1
    keep = sampled & keep_token & keep_seq
    weight = torch.clamp(ratio, max=c["clip_high_threshold"]) * keep
    loss = -(weight * inputs["advantages"] * lp)
    metrics = _stability_metrics(inputs, config, sampled, ratio, keep_token, seq_masked, n_seq)
    metrics["stable_reinforce/clipped_frac:mean"] = _frac(
        sampled & (ratio > c["clip_high_threshold"]), sampled
    )
    return loss, metrics


def _frac(part: torch.Tensor, whole: torch.Tensor) -> float:
    n = int(whole.sum())
    return float((part & whole).sum()) / n if n else 0.0


def _stability_metrics(
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
    sampled: torch.Tensor,
    ratio: torch.Tensor,
    keep_token: torch.Tensor,
    seq_masked: int,
    n_seq: int,
) -> dict[str, float]:
    n = int(sampled.sum())
    out = {
        "stable_reinforce/ratio:mean": float(ratio[sampled].mean()) if n else 1.0,
        "stable_reinforce/token_masked_frac:mean": _frac(~keep_token, sampled),
        "stable_reinforce/sequence_masked_frac:mean": seq_masked / n_seq if n_seq else 0.0,
    }
    # Staleness: optim steps this run took since the sampled weights were frozen (known only
    # for samples of this run's own snapshots; the worker adds the run's current step).
    steps = inputs["weights_step"][sampled]
    known = steps[steps >= 0]
    if "optim_steps" in config and known.numel():
        stale = float(config["optim_steps"]) - known
        out["stable_reinforce/staleness:max"] = float(stale.max())
        out["stable_reinforce/staleness:mean"] = float(stale.mean())
    return out


LOSSES: dict[str, tuple[LossFn, tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ("target_tokens", "weights")),
    "importance_sampling": (importance_sampling, RL_INPUTS),
    "ppo": (ppo, RL_INPUTS),
    "cispo": (cispo, RL_INPUTS),
    "dro": (dro, RL_INPUTS),
    "gspo": (gspo, (*RL_INPUTS, "sequence_ratio_mask")),
    "stable_reinforce": (stable_reinforce, ("target_tokens", "advantages", *STABILITY_INPUTS)),
}


def get_loss(name: str) -> tuple[LossFn, tuple[str, ...]]:
    """The loss function and its required input names, or a LossInputError naming the choices."""
    if name not in LOSSES:
        known = ", ".join(sorted(LOSSES))
        raise LossInputError(f"unknown loss_fn {name!r}; supported: {known}")
    return LOSSES[name]
