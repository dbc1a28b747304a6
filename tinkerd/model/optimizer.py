"""Per-adapter AdamW with Tinker's `AdamParams`, new hyperparameters at every step.

Each adapter gets its own `torch.optim.AdamW` over its own parameters only, so a step (weight
decay included) never touches another adapter and optimizer memory is 2x that adapter's size.
Using torch's implementation directly is what makes it "identical to torch.optim.AdamW".
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AdamParams:
    """Tinker's AdamParams (types/optimizer.py); grad_clip_norm 0 means no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid adam_params.{name}: {getattr(self, name)}")


@dataclass(frozen=True)
class OptimStepResult:
    grad_norm: float
    step: int


class AdapterOptimizer:
    """AdamW over one adapter's parameters."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        self.steps = 0

    def step(self, hp: AdamParams) -> OptimStepResult:
        """Apply accumulated gradients with `hp`, then clear them."""
        for group in self.adamw.param_groups:
            group["lr"] = hp.learning_rate
            group["betas"] = (hp.beta1, hp.beta2)
            group["eps"] = hp.eps
            group["weight_decay"] = hp.weight_decay
        grads = [p.grad for p in self.params if p.grad is not None]
        if hp.grad_clip_norm > 0:
            norm = nn.utils.clip_grad_norm_(self.params, hp.grad_clip_norm, foreach=True)
        elif grads:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
        else:
            norm = torch.zeros(())
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        self.steps += 1
        return OptimStepResult(grad_norm=float(norm), step=self.steps)

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Moments as flat named tensors (`<param name>.exp_avg`, ...) for safetensors."""
        out: dict[str, torch.Tensor] = {}
        for name, param in zip(names, self.params, strict=True):
            state = self.adamw.state.get(param)
            if not state:
                continue
            out[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu()
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu()
            out[f"{name}.step"] = torch.as_tensor(state["step"]).detach().cpu().reshape(1)
        return out

    def load_state_tensors(self, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        for name, param in zip(names, self.params, strict=True):
            if f"{name}.exp_avg" not in tensors:
                continue
            self.adamw.state[param] = {
                "step": tensors[f"{name}.step"].reshape(()).to(torch.float32).clone(),
                "exp_avg": tensors[f"{name}.exp_avg"].to(param.device, param.dtype).clone(),
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(param.device, param.dtype).clone(),
            }
        steps = [t for n, t in tensors.items() if n.endswith(".step")]
        self.steps = int(steps[0].item()) if steps else 0
