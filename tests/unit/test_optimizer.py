"""The worker's per-adapter AdamW against a standalone torch.optim.AdamW fed the same gradients,
with hyperparameters and gradient clipping changing at every step, and adapter isolation."""

from pathlib import Path

import pytest
import torch
from torch import nn

from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput
from tinkerd.model.worker import ModelWorker

ATOL, RTOL = 1e-7, 1e-6


def make_worker(base: BaseModel) -> ModelWorker:
    """A worker with adapters x (rank 4) and y (rank 8), both with random non-zero A and B."""
    worker = ModelWorker(base)
    for i, (aid, rank) in enumerate([("x", 4), ("y", 8)]):
        worker.add_adapter(aid, LoraConfig(rank=rank, alpha=16, seed=i))
        gen = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in worker.lora.adapters[aid].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return worker


def batch(adapter_id: str, seed: int, n: int = 3) -> ForwardBackwardInput:
    """A cross-entropy input of n random datums with real weights."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=gen))
        tokens = torch.randint(0, 256, (length,), generator=gen).tolist()
        inputs = {
            "target_tokens": torch.randint(0, 320, (length,), generator=gen),
            "weights": torch.randn(length, generator=gen),
        }
        data.append(Datum(tokens, inputs))
    return ForwardBackwardInput(adapter_id, data)


def grad_norm(params: list[nn.Parameter]) -> float:
    """The global L2 norm of the parameters' gradients."""
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))


# (lr, beta1, beta2, eps, weight_decay, clip as a multiple of the step's grad norm; 0 = off)
SCHEDULE = [
    (1e-2, 0.9, 0.95, 1e-8, 0.0, 0.0),
    (5e-3, 0.8, 0.99, 1e-6, 0.1, 0.5),  # clipping active
    (2e-2, 0.95, 0.9, 1e-12, 0.01, 0.0),
    (1e-3, 0.5, 0.999, 1e-8, 0.5, 2.0),  # clip norm set but above the norm: no effect
    (1e-2, 0.9, 0.95, 1e-10, 0.05, 0.1),  # clipping active
]


def test_steps_match_torch_adamw(tiny_base: BaseModel) -> None:
    """Five optim_steps with new lr/betas/eps/weight_decay each step and clipping in some equal
    torch.optim.AdamW (+ clip_grad_norm_) on a standalone copy fed the same gradients; the
    reported grad_norm is the pre-clip norm and gradients are cleared after each step."""
    worker = make_worker(tiny_base)
    params = worker.lora.adapters["x"].parameters()
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1.0, foreach=False)
    for step, (lr, b1, b2, eps, wd, clip_mult) in enumerate(SCHEDULE, start=1):
        worker.forward_backward([batch("x", seed=step)])
        for r, p in zip(ref, params, strict=True):
            r.grad = p.grad.detach().clone()
        norm = grad_norm(ref)
        clip = clip_mult * norm
        hp = AdamParams(
            learning_rate=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, grad_clip_norm=clip
        )
        result = worker.optim_step("x", hp)
        if clip > 0:
            ref_norm = float(nn.utils.clip_grad_norm_(ref, clip, foreach=False))
            assert ref_norm == pytest.approx(norm, rel=1e-5)
            if clip_mult < 1:
                assert grad_norm(ref) == pytest.approx(clip, rel=1e-5)  # clipping really applied
        ref_opt.param_groups[0].update(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        ref_opt.step()
        ref_opt.zero_grad()
        assert result.step == step
        assert result.grad_norm == pytest.approx(norm, rel=1e-5)
        assert all(p.grad is None for p in params)
        for r, p in zip(ref, params, strict=True):
            torch.testing.assert_close(p.detach(), r.detach(), atol=ATOL, rtol=RTOL)
    state = worker.optimizers["x"].adamw.state
    for r, p in zip(ref, params, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[p][key], ref_opt.state[r][key], atol=1e-9, rtol=RTOL)


def test_step_on_one_adapter_leaves_other_untouched(tiny_base: BaseModel) -> None:
    """optim_step on x (with weight decay) changes neither y's weights, y's pending gradients
    nor y's optimizer state; y's later step still uses its own pending gradients."""
    worker = make_worker(tiny_base)
    worker.forward_backward([batch("x", seed=1), batch("y", seed=2)])
    y = worker.lora.adapters["y"]
    y_weights = [p.detach().clone() for p in y.parameters()]
    y_grads = [p.grad.clone() for p in y.parameters()]
    x_before = [p.detach().clone() for p in worker.lora.adapters["x"].parameters()]
    hp = AdamParams(learning_rate=1e-2, weight_decay=0.5, grad_clip_norm=1e-3)
    worker.optim_step("x", hp)
    x_after = worker.lora.adapters["x"].parameters()
    assert all(not torch.equal(a, b) for a, b in zip(x_before, x_after, strict=True))
    for p, w, g in zip(y.parameters(), y_weights, y_grads, strict=True):
        assert torch.equal(p.detach(), w) and torch.equal(p.grad, g)
    assert not worker.optimizers["y"].adamw.state
    worker.optim_step("y", hp)
    assert all(p.grad is None for p in y.parameters())
    assert all(
        not torch.equal(p.detach(), w) for p, w in zip(y.parameters(), y_weights, strict=True)
    )


def test_optimizer_state_is_twice_the_adapter(tiny_base: BaseModel) -> None:
    """Each adapter's AdamW holds exactly its own parameters, and after a step its moments
    (exp_avg + exp_avg_sq) total 2x the adapter's parameter count."""
    worker = make_worker(tiny_base)
    worker.forward_backward([batch("x", seed=3), batch("y", seed=4)])
    worker.optim_step("x", AdamParams(learning_rate=1e-3))
    worker.optim_step("y", AdamParams(learning_rate=1e-3))
    for aid, adapter in worker.lora.adapters.items():
        opt = worker.optimizers[aid]
        own = {id(p) for p in adapter.parameters()}
        group_params = [p for g in opt.adamw.param_groups for p in g["params"]]
        assert {id(p) for p in group_params} == own and len(group_params) == len(own)
        assert {id(p) for p in opt.adamw.state} == own
        moments = sum(
            s[k].numel() for s in opt.adamw.state.values() for k in ("exp_avg", "exp_avg_sq")
        )
        assert moments == 2 * adapter.num_params()
        saved = opt.state_tensors(list(adapter.params))
        assert len(saved) == 3 * len(adapter.params)
        saved_moments = sum(v.numel() for k, v in saved.items() if not k.endswith(".step"))
        assert saved_moments == 2 * adapter.num_params()


def test_export_import_resumes_identically(
    tiny_base: BaseModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An adapter exported with optimizer state and imported into another worker continues
    training exactly like the original."""
    worker = make_worker(tiny_base)
    for step in range(2):
        worker.forward_backward([batch("x", seed=10 + step)])
        worker.optim_step("x", AdamParams(learning_rate=1e-2, weight_decay=0.1))
    state = worker.export_adapter("x", with_optimizer=True)
    other = ModelWorker(load_base_model(str(tiny_model_dir), data_dir=tmp_path))
    other.import_adapter("x", state)
    for w in (worker, other):
        for step in range(2):
            w.forward_backward([batch("x", seed=20 + step)])
            result = w.optim_step("x", AdamParams(learning_rate=5e-3, beta1=0.8))
        assert result.step == 4
    mine = worker.lora.adapters["x"].params
    theirs = other.lora.adapters["x"].params
    for name, p in mine.items():
        torch.testing.assert_close(theirs[name], p, atol=ATOL, rtol=RTOL)


def test_invalid_params_and_frozen_snapshot(tiny_base: BaseModel) -> None:
    """Out-of-range AdamParams are rejected; a frozen snapshot cannot take an optim_step."""
    bad: list[dict[str, float]] = [
        {"learning_rate": -1.0},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"eps": -1e-8},
        {"weight_decay": -0.1},
        {"grad_clip_norm": -1.0},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            AdamParams(**kwargs)
    worker = make_worker(tiny_base)
    worker.snapshot_adapter("x", "x-snap")
    with pytest.raises(ValueError):
        worker.optim_step("x-snap", AdamParams())
