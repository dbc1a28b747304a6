"""LoRA on MoE experts (Qwen3-MoE, gpt-oss, DeepSeek-V3): train_mlp adapts every routed expert's
fused 3-D projections as PEFT's `target_parameters` does, with equal logits and gradients, per
tenant in mixed batches (tests/lineup/test_lineup.py checks those for every family), and
checkpoints that PEFT loads."""

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from lineup.families import VOCAB, build, deepseek_v3, gpt_oss, qwen3_moe
from numerics import assert_close_scaled
from torch import nn

from tinkerd.checkpoints.peft_format import peft_targets, read_adapter_info
from tinkerd.engine.adapter_files import read_adapter, write_adapter
from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.lora import Adapter, LoraConfig, MultiLoraModel, segments_for
from tinkerd.model.moe_lora import LoraExperts
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

# The MoE families of the lineup (tests/lineup/families.py).
FAMILIES = {"qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss, "deepseek_v3": deepseek_v3}
# Expert parameters (tinkerd's short names) and the MLP Linears train_mlp adapts per family.
EXPERT_TARGETS = {"experts/gate_up_proj", "experts/down_proj"}
MLP_LINEARS = {
    "qwen3_moe": set(),
    "gpt_oss": set(),
    "deepseek_v3": {"gate_proj", "up_proj", "down_proj"},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init MoE model of one family, saved with the byte-level tokenizer."""
    return build(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))


@pytest.fixture
def moe_base(moe_dir: Path, tmp_path: Path) -> BaseModel:
    return load_base_model(str(moe_dir), data_dir=tmp_path)


def family(base: BaseModel) -> str:
    return base.model.config.model_type


def randomize(adapter: Adapter, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def short_targets(lora: MultiLoraModel, config: LoraConfig) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in lora.target_paths(config)})


def peft_model_for(
    ref: nn.Module, adapter: Adapter, targets: list[str], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """PEFT LoRA on a copy of `ref` with the targets tinkerd exports, `adapter`'s weights in."""
    modules, params = peft_targets(targets)
    cfg = peft.LoraConfig(
        r=adapter.config.rank,
        lora_alpha=adapter.config.alpha,
        target_modules=modules,
        target_parameters=params,
        lora_dropout=0.0,
    )
    ref = copy.deepcopy(ref).to(dtype)
    if dtype == torch.float64:  # grouped_mm has no float64 kernel
        ref.set_experts_implementation("eager")
    model = peft.get_peft_model(ref, cfg).to(dtype)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapter.params.items():
            peft_param(named, name).copy_(value)
    n_peft = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_peft == adapter.num_params(), "PEFT and tinkerd target different parameters"
    return model


def peft_param(named: dict[str, nn.Parameter], name: str) -> nn.Parameter:
    """PEFT's parameter for a tinkerd name (`<module>.lora_A.weight`)."""
    return named["base_model.model." + name.replace(".weight", ".default.weight")]


def token_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, length), generator=gen)


def datum(length: int, gen: torch.Generator) -> Datum:
    tokens = torch.randint(0, 256, (length,), generator=gen).tolist()
    inputs = {
        "target_tokens": torch.randint(0, VOCAB, (length,), generator=gen),
        "weights": torch.randn(length, generator=gen),
    }
    return Datum(tokens, inputs)


def test_experts_detected_and_flags_select_them(moe_base: BaseModel) -> None:
    """Every routed experts module is wrapped; train_mlp gives the adapter PEFT-named expert LoRA
    (A [r*E, in], B [out, r*E]) plus the MLP Linears, train_mlp=False gives none; the router
    is never adapted."""
    worker = ModelWorker(moe_base)
    lora = worker.lora
    layers = moe_base.model.config.num_hidden_layers
    moe_layers = layers - getattr(moe_base.model.config, "first_k_dense_replace", 0)
    assert len(lora.expert_layers) == moe_layers
    assert all(isinstance(m, LoraExperts) for m in lora.expert_layers.values())
    worker.add_adapter("mlp", LoraConfig(rank=4, seed=0, train_attn=False))
    with_mlp = lora.adapters["mlp"]
    assert set(short_targets(lora, with_mlp.config)) >= EXPERT_TARGETS
    names = [n for n in with_mlp.params if ".experts." in n]
    assert len(names) == 4 * moe_layers
    assert not any("router" in n or ".gate." in n for n in with_mlp.params)
    experts = next(iter(lora.expert_layers.values()))
    n_experts = experts.num_experts
    for name, p in with_mlp.params.items():
        if ".experts." in name and "lora_A" in name:
            assert p.shape[0] == 4 * n_experts
        elif ".experts." in name:
            assert p.shape[1] == 4 * n_experts
    expected = EXPERT_TARGETS | MLP_LINEARS[family(moe_base)] | {"lm_head"}
    assert set(short_targets(lora, with_mlp.config)) == expected
    worker.add_adapter("attn", LoraConfig(rank=4, seed=0, train_mlp=False))
    no_mlp = lora.adapters["attn"]
    assert not any(".experts." in n or "mlp" in n for n in no_mlp.params)


def test_mlp_only_adapter_trains(moe_base: BaseModel) -> None:
    """An adapter with train_mlp only (routed experts, plus dense/shared MLPs where the model
    has them) lowers the loss; every expert's LoRA B gets a gradient."""
    worker = ModelWorker(moe_base)
    cfg = LoraConfig(rank=8, seed=0, train_attn=False, train_unembed=False)
    worker.add_adapter("m", cfg)
    adapter = worker.lora.adapters["m"]
    gen = torch.Generator().manual_seed(0)
    item = ForwardBackwardInput("m", [datum(24, gen), datum(17, gen)])
    item.data[:] = [
        Datum(d.tokens, {**d.loss_fn_inputs, "weights": torch.ones(len(d.tokens))})
        for d in item.data
    ]
    losses = []
    for step in range(10):
        (out,) = worker.forward_backward([item])
        losses.append(out.metrics["loss:sum"])
        if step == 0:
            grads = [
                p.grad for n, p in adapter.params.items() if ".experts." in n and "lora_B" in n
            ]
            assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
        worker.optim_step("m", AdamParams(learning_rate=1e-2))
    assert losses[-1] < 0.9 * losses[0], losses


def test_logits_and_gradients_match_peft(moe_base: BaseModel) -> None:
    """With the same random non-zero A/B, tinkerd's logits equal PEFT's (`target_parameters` on
    the experts) and every LoRA parameter's gradient equals PEFT's (float64 reference)."""
    ref = copy.deepcopy(moe_base.model)
    lora = MultiLoraModel(moe_base.model)
    cfg = LoraConfig(rank=4, alpha=16, seed=1)
    adapter = lora.add_adapter("x", cfg)
    randomize(adapter, seed=7)
    ids = token_ids(3, 12, seed=1)
    weights = torch.randn(3, 12, VOCAB, generator=torch.Generator().manual_seed(2))
    with lora.route(segments_for(["x"] * 3)):
        logits = lora.model(input_ids=ids, use_cache=False).logits
    (logits * weights).sum().backward()

    model = peft_model_for(ref, adapter, short_targets(lora, cfg), torch.float64)
    expected = model(input_ids=ids, use_cache=False).logits
    (expected * weights.double()).sum().backward()
    terms = max(VOCAB, ids.numel())
    assert_close_scaled(logits, expected.detach(), terms=terms, msg="logits")
    base_logits = ref(input_ids=ids, use_cache=False).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter changes the output
    named = dict(model.named_parameters())
    for name, param in adapter.params.items():
        want = peft_param(named, name).grad
        assert param.grad is not None and want is not None and want.abs().max() > 0, name
        assert_close_scaled(param.grad, want, terms=terms, msg=name)


def test_export_loads_in_peft_and_reimports(moe_base: BaseModel, tmp_path: Path) -> None:
    """The exported checkpoint's adapter_config.json lists the experts as target_parameters;
    `PeftModel.from_pretrained` gives tinkerd's logits, and re-importing gives equal weights."""
    ref = copy.deepcopy(moe_base.model)
    worker = ModelWorker(moe_base)
    worker.add_adapter("x", LoraConfig(rank=4, alpha=8, seed=0))
    adapter = worker.lora.adapters["x"]
    randomize(adapter, seed=11)
    path = tmp_path / "ckpt"
    write_adapter(path, worker.export_adapter("x", with_optimizer=False), "tiny-moe")
    info = read_adapter_info(path)
    assert set(info.target_modules) >= EXPERT_TARGETS
    config = json.loads((path / "adapter_config.json").read_text())
    linears = {f"{n}.weight" for n in MLP_LINEARS[family(moe_base)]}
    experts = {"experts.gate_up_proj", "experts.down_proj"}
    assert set(config["target_parameters"]) == experts | linears
    assert not set(config["target_modules"]) & MLP_LINEARS[family(moe_base)]

    loaded = peft.PeftModel.from_pretrained(ref, str(path))
    ids = token_ids(2, 10, seed=5)
    with torch.no_grad():
        with worker.lora.route(segments_for(["x", "x"])):
            got = worker.lora.model(input_ids=ids, use_cache=False).logits
        want = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    worker.import_adapter("y", read_adapter(path, with_optimizer=False))
    again = worker.lora.adapters["y"]
    assert set(again.params) == set(adapter.params)
    for name, p in adapter.params.items():
        assert torch.equal(again.params[name], p), name


def test_plain_peft_adapter_imports(moe_base: BaseModel, tmp_path: Path) -> None:
    """An adapter saved by PEFT itself with target_parameters on the experts (no tinkerd.json)
    imports into tinkerd with train_mlp set and gives PEFT's logits."""
    ref = copy.deepcopy(moe_base.model)
    worker = ModelWorker(moe_base)
    lora = worker.lora
    cfg = LoraConfig(rank=4, alpha=8, seed=0)
    template = lora.add_adapter("t", cfg)
    model = peft_model_for(ref, template, short_targets(lora, cfg))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "peft")
    state = read_adapter(tmp_path / "peft", with_optimizer=False)
    assert state.config.train_mlp and state.config.train_attn and state.config.train_unembed
    worker.import_adapter("p", state)
    ids = token_ids(2, 9, seed=4)
    with torch.no_grad():
        with lora.route(segments_for(["p", "p"])):
            got = lora.model(input_ids=ids, use_cache=False).logits
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_mixed_adapter_greedy_sampling_matches_peft(moe_base: BaseModel) -> None:
    """Greedy sampling of prompts of different lengths under two adapters and the base model in
    one batch (prefill, then one token per row through the experts) gives each row the tokens
    of its PEFT model's (or the base model's) greedy `generate`."""
    ref = copy.deepcopy(moe_base.model)
    worker = ModelWorker(moe_base)
    for i, aid in enumerate(["a", "b"]):
        worker.add_adapter(aid, LoraConfig(rank=4 * (i + 1), alpha=16, seed=i))
        randomize(worker.lora.adapters[aid], seed=30 + i, std=0.1)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 9, 7)]
    order: list[str | None] = ["a", None, "b"]
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=())
    outs = worker.sample([SampleInput(a, p, params) for a, p in zip(order, prompts, strict=True)])
    targets = short_targets(worker.lora, worker.lora.adapters["a"].config)
    for aid, prompt, out in zip(order, prompts, outs, strict=True):
        model = ref if aid is None else peft_model_for(ref, worker.lora.adapters[aid], targets)
        with torch.no_grad():
            want = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=None,
            )[0, len(prompt) :].tolist()
        assert out.sequences[0].tokens == want, aid


def test_moe_bench_reports_both_variants() -> None:
    """`tinkerd bench moe` runs (smallest shape, one repetition) and reports every figure for
    the expert and the attention-only variant (no timing is judged here)."""
    from tinkerd.bench.moe import VARIANTS, MoeBenchConfig, run

    results = run(MoeBenchConfig(rows=1, seq=8, rank=4, tenants=2, steps=1, dtype="float32"))
    for name in VARIANTS:
        figures = results[name]
        assert figures["train_tokens_per_s"] > 0 and figures["mixed_tokens_per_s"] > 0
        assert figures["saved_for_backward_mb"] > 0
    assert results["experts"]["lora_params"] > results["attention_only"]["lora_params"]
