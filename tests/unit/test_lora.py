"""Multi-adapter LoRA against PEFT: mixed batches of several adapters (and the base model) must
give each row exactly what a separate PEFT model gives, with gradients that stay per adapter."""

import copy
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from numerics import assert_close_scaled
from torch import nn

from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.lora import (
    Adapter,
    LoraConfig,
    LoraLinear,
    MultiLoraModel,
    Routing,
    segments_for,
)
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput
from tinkerd.model.worker import ModelWorker

# For values (logprobs, logits) compared with a float32 reference: their error does not grow with
# the batch. Gradients, whose error grows with the summed terms, use `assert_close_scaled`
# against a float64 reference (see `longest_sum`).
ATOL, RTOL = 1e-5, 1e-4
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_TARGETS = [*ATTN, *MLP, "lm_head"]
# adapter id -> (rank, alpha): different ranks and scalings (8, 2, 0.5).
SPECS: dict[str, tuple[int, int]] = {"a": (4, 32), "b": (8, 16), "c": (16, 8)}
# Input order of the mixed batch: adapters interleaved, one base row, all lengths different.
ROW_ADAPTERS: list[str | None] = ["b", "a", None, "c", "a", "b", "c"]
ROW_LENGTHS = [7, 11, 9, 5, 13, 6, 10]


@dataclass
class Setup:
    """A worker with three randomised adapters and the unwrapped HF model they started from."""

    worker: ModelWorker
    ref: nn.Module
    adapters: dict[str, Adapter]
    vocab: int


def randomize(adapter: Adapter, seed: int, std: float = 0.05) -> None:
    """Give every A and B of `adapter` random non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_setup(base: BaseModel) -> Setup:
    """Wrap `base` in a worker with adapters a/b/c (SPECS) on attention, MLP and lm_head."""
    ref = copy.deepcopy(base.model)
    worker = ModelWorker(base)
    for i, (aid, (rank, alpha)) in enumerate(SPECS.items()):
        worker.add_adapter(aid, LoraConfig(rank=rank, alpha=alpha, seed=i))
        randomize(worker.lora.adapters[aid], seed=100 + i)
    return Setup(worker, ref, dict(worker.lora.adapters), base.info.vocab_size)


def peft_model_for(
    ref: nn.Module, adapter: Adapter, targets: list[str], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A PEFT LoRA model on a copy of `ref` with `adapter`'s A/B weights copied in, in `dtype`
    (float64: an exact-enough reference for float32 gradients)."""
    cfg = peft.LoraConfig(
        r=adapter.config.rank,
        lora_alpha=adapter.config.alpha,
        target_modules=targets,
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(copy.deepcopy(ref).to(dtype), cfg).to(dtype)
    with torch.no_grad():
        for name, value in adapter.params.items():
            peft_param(model, name).copy_(value)
    n_peft = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_peft == adapter.num_params(), "PEFT and tinkerd target different modules"
    return model


def peft_param(model: nn.Module, name: str) -> torch.Tensor:
    """The PEFT parameter for a tinkerd name like `model.layers.0.mlp.up_proj.lora_A.weight`."""
    path, _, kind = name.removesuffix(".weight").rpartition(".")
    module = model.base_model.model.get_submodule(path)
    return getattr(module, kind)["default"].weight


def make_rows(vocab: int, seed: int = 0) -> list[Datum]:
    """One datum per ROW_LENGTHS entry, CE targets with real (also negative) weights."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for n in ROW_LENGTHS:
        tokens = torch.randint(0, 256, (n,), generator=gen).tolist()
        targets = torch.randint(0, vocab, (n,), generator=gen)
        weights = torch.randn(n, generator=gen)
        data.append(Datum(tokens, {"target_tokens": targets, "weights": weights}))
    return data


def ref_logprobs(model: nn.Module, datum: Datum) -> torch.Tensor:
    """Target log-probs of one unpadded row through a plain HF/PEFT model (float32 at least,
    float64 for a float64 model)."""
    logits = model(input_ids=torch.tensor([datum.tokens])).logits[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = datum.loss_fn_inputs["target_tokens"]
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


def longest_sum(vocab: int, tokens: int) -> int:
    """The longest sum that feeds one logprob or one adapter-gradient element, the `terms` of
    `assert_close_scaled`: the vocabulary (log-softmax, and the unembedding's backward) or the
    tokens (attention over a row; a weight gradient sums over all of its adapter's tokens),
    whichever is larger. The hidden and MLP widths of the tiny model are smaller than both."""
    return max(vocab, tokens)


def mixed_inputs(data: list[Datum], zero: str | None = None) -> list[ForwardBackwardInput]:
    """One input per row in ROW_ADAPTERS order; rows of adapter `zero` get zero weights."""
    items = []
    for aid, datum in zip(ROW_ADAPTERS, data, strict=True):
        if aid == zero:
            inputs = dict(datum.loss_fn_inputs, weights=torch.zeros(len(datum.tokens)))
            datum = Datum(datum.tokens, inputs)
        items.append(ForwardBackwardInput(aid, [datum]))
    return items


@pytest.fixture(params=["untied", "tied"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    """The three-adapter setup on the tiny Llama, with untied and with tied embeddings."""
    name = "tiny_model_dir" if request.param == "untied" else "tiny_tied_model_dir"
    model_dir: Path = request.getfixturevalue(name)
    return make_setup(load_base_model(str(model_dir), data_dir=tmp_path))


def test_mixed_batch_logprobs_match_peft(setup: Setup) -> None:
    """Each row of an interleaved multi-adapter batch (plus a base row) gets the target
    logprobs of its own PEFT model (the plain HF model for the base row)."""
    data = make_rows(setup.vocab)
    outs = setup.worker.forward_backward(mixed_inputs(data))
    refs = {aid: peft_model_for(setup.ref, setup.adapters[aid], ALL_TARGETS) for aid in SPECS}
    with torch.no_grad():
        for aid, datum, out in zip(ROW_ADAPTERS, data, outs, strict=True):
            model = setup.ref if aid is None else refs[aid]
            expected = ref_logprobs(model, datum)
            got = out.loss_fn_outputs[0]["logprobs"]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
            if aid is not None:  # the adapter really changes the output
                assert (got - ref_logprobs(setup.ref, datum)).abs().max() > 1e-2


def test_interleaved_routing_full_logits_match_peft(setup: Setup) -> None:
    """Routing non-sorted segments (a, None, b, a, c) through the wrapped model gives every
    row the full logits of its PEFT model, at all (right-padded) real positions."""
    lora = setup.worker.lora
    order: list[str | None] = ["a", None, "b", "a", "c"]
    lengths = [6, 9, 4, 8, 7]
    gen = torch.Generator().manual_seed(3)
    ids = torch.full((len(order), max(lengths)), 256, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, 256, (n,), generator=gen)
    with torch.no_grad(), lora.route(segments_for(order)):
        logits = lora.model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        for i, (aid, n) in enumerate(zip(order, lengths, strict=True)):
            ref = setup.ref
            if aid is not None:
                ref = peft_model_for(setup.ref, setup.adapters[aid], ALL_TARGETS)
            expected = ref(input_ids=ids[i : i + 1, :n]).logits[0]
            torch.testing.assert_close(logits[i, :n], expected, atol=ATOL, rtol=RTOL)


def test_long_batch_across_unembedding_chunks_matches_peft(setup: Setup) -> None:
    """A batch of more than 1024 tokens (the unembedding's chunk size) whose adapter segments
    straddle chunk boundaries still gives every row its PEFT logprobs and gradients."""
    gen = torch.Generator().manual_seed(7)
    order: list[str | None] = ["c", "a", None, "b", "a"]
    # Sorted by adapter: None 0-200, a 200-910, b 910-1260 (crosses 1024), c 1260-1590.
    lengths = [330, 410, 200, 350, 300]
    items = []
    for aid, n in zip(order, lengths, strict=True):
        inputs = {
            "target_tokens": torch.randint(0, setup.vocab, (n,), generator=gen),
            "weights": torch.randn(n, generator=gen),
        }
        datum = Datum(torch.randint(0, 256, (n,), generator=gen).tolist(), inputs)
        items.append(ForwardBackwardInput(aid, [datum]))
    outs = setup.worker.forward_backward(items)
    f64 = torch.float64
    for aid in ["a", "b", "c", None]:
        model = (
            copy.deepcopy(setup.ref).to(f64)
            if aid is None
            else peft_model_for(setup.ref, setup.adapters[aid], ALL_TARGETS, f64)
        )
        loss = torch.zeros((), dtype=f64)
        tokens = 0
        for item, out in zip(items, outs, strict=True):
            if item.adapter_id != aid:
                continue
            datum = item.data[0]
            lp = ref_logprobs(model, datum)
            assert_close_scaled(
                out.loss_fn_outputs[0]["logprobs"],
                lp.detach(),
                terms=longest_sum(setup.vocab, len(datum.tokens)),
                msg=f"logprobs of {aid}",
            )
            loss = loss - (lp * datum.loss_fn_inputs["weights"]).sum()
            tokens += len(datum.tokens)
        if aid is None:
            continue
        loss.backward()
        for name, param in setup.adapters[aid].params.items():
            expected = peft_param(model, name).grad
            assert param.grad is not None and expected.abs().max() > 0, name
            assert_close_scaled(
                param.grad, expected, terms=longest_sum(setup.vocab, tokens), msg=name
            )


def test_mixed_batch_gradients_match_peft(setup: Setup) -> None:
    """One forward_backward over the mixed batch leaves in every adapter's A/B the gradient
    PEFT computes for that adapter's rows alone (CE with real, also negative, weights)."""
    data = make_rows(setup.vocab, seed=1)
    outs = setup.worker.forward_backward(mixed_inputs(data))
    for aid in SPECS:
        model = peft_model_for(setup.ref, setup.adapters[aid], ALL_TARGETS, torch.float64)
        loss = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for row_aid, datum in zip(ROW_ADAPTERS, data, strict=True):
            if row_aid == aid:
                loss = loss - (ref_logprobs(model, datum) * datum.loss_fn_inputs["weights"]).sum()
                tokens += len(datum.tokens)
        loss.backward()
        got_loss = sum(
            o.metrics["loss:sum"] for o, r in zip(outs, ROW_ADAPTERS, strict=True) if r == aid
        )
        assert got_loss == pytest.approx(loss.item(), rel=RTOL, abs=ATOL)
        for name, param in setup.adapters[aid].params.items():
            expected = peft_param(model, name).grad
            assert param.grad is not None, name
            assert expected.abs().max() > 0, name
            assert_close_scaled(
                param.grad, expected, terms=longest_sum(setup.vocab, tokens), msg=name
            )


def test_gradients_never_cross_adapters(setup: Setup) -> None:
    """With one adapter's CE weights zeroed in the same mixed batch, that adapter's gradient is
    exactly zero and the others' gradients are unchanged; the base row adds none anywhere."""
    worker = setup.worker
    data = make_rows(setup.vocab, seed=2)
    worker.forward_backward(mixed_inputs(data))
    full = {
        aid: {n: p.grad.clone() for n, p in a.params.items()} for aid, a in setup.adapters.items()
    }
    for zeroed in SPECS:
        for aid in SPECS:
            worker.zero_grad(aid)
        worker.forward_backward(mixed_inputs(data, zero=zeroed))
        for aid, adapter in setup.adapters.items():
            for name, p in adapter.params.items():
                if aid == zeroed:
                    assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
                else:
                    torch.testing.assert_close(p.grad, full[aid][name], atol=ATOL, rtol=RTOL)
    assert all(p.grad is None for p in worker.lora.model.parameters())


def test_base_rows_produce_no_gradient(setup: Setup) -> None:
    """A training (not forward-only) batch of base-model rows touches no gradient at all."""
    worker = setup.worker
    data = make_rows(setup.vocab, seed=4)
    out = worker.forward_backward([ForwardBackwardInput(None, data[:3])])
    assert len(out[0].loss_fn_outputs) == 3
    for adapter in setup.adapters.values():
        assert all(p.grad is None for p in adapter.parameters())
    assert all(p.grad is None for p in worker.lora.model.parameters())


def test_add_train_remove_keeps_base_bit_identical(tiny_base: BaseModel) -> None:
    """Adding, training (with weight decay) and removing adapters leaves every base weight and
    the base model's logits bit-identical."""
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    ids = torch.tensor([[5, 17, 99, 200, 3, 42]])
    with torch.no_grad():
        logits_before = tiny_base.model(input_ids=ids).logits
    setup = make_setup(tiny_base)
    data = make_rows(setup.vocab)
    for _ in range(2):
        setup.worker.forward_backward(mixed_inputs(data))
        for aid in SPECS:
            setup.worker.optim_step(aid, AdamParams(learning_rate=1e-2, weight_decay=0.1))
    for aid in SPECS:
        setup.worker.remove_adapter(aid)
    assert not any(layer.adapters for layer in setup.worker.lora.layers.values())
    for name, value in tiny_base.model.state_dict().items():
        key = name.replace(".base.", ".")
        assert torch.equal(value, before[key]), name
    with torch.no_grad():
        logits_after = tiny_base.model(input_ids=ids).logits
    assert torch.equal(logits_after, logits_before)


def test_seeded_init_reproducible(tiny_base: BaseModel) -> None:
    """Same seed -> same A (Kaiming-uniform bound 1/sqrt(in)), B all zero; other seed differs,
    and a fresh adapter leaves the model's output unchanged."""
    lora2 = MultiLoraModel(copy.deepcopy(tiny_base.model))
    lora = MultiLoraModel(tiny_base.model)
    cfg = LoraConfig(rank=8, alpha=16, seed=7)
    one = lora.add_adapter("one", cfg)
    two = lora.add_adapter("two", cfg)
    other = lora.add_adapter("other", LoraConfig(rank=8, alpha=16, seed=8))
    again = lora2.add_adapter("x", cfg)
    for name, p in one.params.items():
        assert torch.equal(p, two.params[name]) and torch.equal(p, again.params[name])
        if name.endswith("lora_B.weight"):
            assert torch.count_nonzero(p) == 0
        else:
            bound = 1.0 / p.shape[1] ** 0.5
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound
            assert not torch.equal(p, other.params[name])
    with pytest.raises(ValueError):
        lora.add_adapter("one", cfg)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = lora.model(input_ids=ids).logits
        with lora.route(segments_for(["one"])):
            routed = lora.model(input_ids=ids).logits
    assert torch.equal(plain, routed)


def test_unseeded_adapter_leaves_global_rng_alone(tiny_base: BaseModel) -> None:
    """Adding an adapter without a seed must not reseed torch's global RNG."""
    lora = MultiLoraModel(tiny_base.model)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    lora.add_adapter("unseeded", LoraConfig(rank=4))
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_adapters_differ(tiny_base: BaseModel) -> None:
    """Two adapters created without a seed get different A matrices."""
    lora = MultiLoraModel(tiny_base.model)
    one = lora.add_adapter("one", LoraConfig(rank=4))
    two = lora.add_adapter("two", LoraConfig(rank=4))
    assert all(not torch.equal(p, two.params[n]) for n, p in one.params.items() if "lora_A" in n)


@pytest.mark.parametrize(
    ("attn", "mlp", "unembed", "expected"),
    [
        (True, False, False, ATTN),
        (False, True, False, MLP),
        (False, False, True, ["lm_head"]),
        (True, True, False, ATTN + MLP),
        (True, True, True, ALL_TARGETS),
    ],
)
def test_train_flags_select_modules(
    tiny_base: BaseModel, attn: bool, mlp: bool, unembed: bool, expected: list[str]
) -> None:
    """train_attn/train_mlp/train_unembed pick exactly those Linears (in every layer), the
    adapter has the PEFT parameter count for those targets, and its logprobs match PEFT."""
    ref = copy.deepcopy(tiny_base.model)
    worker = ModelWorker(tiny_base)
    cfg = LoraConfig(rank=4, alpha=8, seed=0, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
    worker.add_adapter("x", cfg)
    adapter = worker.lora.adapters["x"]
    randomize(adapter, seed=5)
    names = {n.removesuffix(".lora_A.weight") for n in adapter.params if "lora_A" in n}
    assert {n.rsplit(".", 1)[-1] for n in names} == set(expected)
    layers = ref.config.num_hidden_layers
    per_layer = len([t for t in expected if t != "lm_head"])
    assert len(names) == per_layer * layers + ("lm_head" in expected)
    assert worker.export_adapter("x", with_optimizer=False).target_modules == sorted(expected)
    model = peft_model_for(ref, adapter, expected)
    datum = make_rows(tiny_base.info.vocab_size)[0]
    out = worker.forward_backward([ForwardBackwardInput("x", [datum], forward_only=True)])
    with torch.no_grad():
        expected_lp = ref_logprobs(model, datum)
    torch.testing.assert_close(out[0].loss_fn_outputs[0]["logprobs"], expected_lp)


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (4, 32.0), (16, 8.0), (8, 0.0)])
def test_rank_alpha_scaling(rank: int, alpha: float) -> None:
    """A LoraLinear row adds (alpha / rank) * B @ A @ x to the base output; other rows and
    unrouted rows get the base output only."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    routing = Routing()
    wrapped = LoraLinear(base, routing)
    cfg = LoraConfig(rank=rank, alpha=alpha)
    assert cfg.scaling == alpha / rank
    a, b = torch.randn(rank, 12), torch.randn(10, rank)
    wrapped.adapters["x"] = (a, b, cfg.scaling)
    x = torch.randn(3, 5, 12)
    routing.segments = segments_for([None, "x", "unknown"])
    out = wrapped(x)
    plain = base(x)
    torch.testing.assert_close(out[0], plain[0], atol=0, rtol=0)
    torch.testing.assert_close(out[2], plain[2], atol=0, rtol=0)
    expected = plain[1] + (alpha / rank) * x[1] @ a.T @ b.T
    torch.testing.assert_close(out[1], expected, atol=ATOL, rtol=RTOL)


def test_lora_config_validation() -> None:
    """Rank < 1 or no trained module kind is rejected; alpha defaults to 32 (Tinker)."""
    assert LoraConfig(rank=8).scaling == 4.0
    with pytest.raises(ValueError):
        LoraConfig(rank=0)
    with pytest.raises(ValueError):
        LoraConfig(train_attn=False, train_mlp=False, train_unembed=False)


def test_uniform_segments_use_batched_path_and_match_one_at_a_time(tiny_base: BaseModel) -> None:
    """Adapters of one rank with equally many rows (the RL shape) take the batched-matmul
    path; each row's logprobs and each adapter's gradients equal running its batch alone."""
    worker = ModelWorker(tiny_base)
    ids = ["u0", "u1", "u2", "u3"]
    for i, aid in enumerate(ids):
        worker.add_adapter(aid, LoraConfig(rank=8, alpha=16, seed=i))
        randomize(worker.lora.adapters[aid], seed=200 + i)
    rows = make_rows(tiny_base.info.vocab_size, seed=3)[: len(ids)]
    items = [
        ForwardBackwardInput(aid, [d], "cross_entropy") for aid, d in zip(ids, rows, strict=True)
    ]
    layer = next(iter(worker.lora.layers.values()))
    routed = segments_for(ids)
    pairs = [layer.adapters[a] for a in ids]
    assert LoraLinear._uniform(routed, pairs)

    mixed = worker.forward_backward(items)
    mixed_grads = {
        aid: {k: p.grad.clone() for k, p in worker.lora.adapters[aid].params.items()} for aid in ids
    }
    for aid in ids:
        worker.zero_grad(aid)
    for aid, item, out in zip(ids, items, mixed, strict=True):
        (alone,) = worker.forward_backward([item])
        torch.testing.assert_close(
            out.loss_fn_outputs[0]["logprobs"],
            alone.loss_fn_outputs[0]["logprobs"],
            atol=ATOL,
            rtol=RTOL,
        )
        terms = longest_sum(tiny_base.info.vocab_size, len(item.data[0].tokens))
        for k, p in worker.lora.adapters[aid].params.items():
            assert_close_scaled(mixed_grads[aid][k], p.grad, terms=terms, msg=k)
