"""The base-model lineup: every family of `families.FAMILIES`, as a tiny random-init model built in
code, through the engine the way a server uses it, each result compared against plain
transformers / PEFT:

- it loads via `load_base_model` as the expected class;
- LoRA goes on the expected modules (attention, MLP incl. routed and shared experts, lm_head;
  nothing in a vision tower);
- an adapter trains (the loss falls over a few optimizer steps);
- three tenants of different ranks and row counts plus a base-model row in one batch get the
  log-probs and gradients of separate runs;
- greedy sampling of a batch mixing the base model and two adapters of different rank (prompts
  of different lengths, left-padded) equals transformers' `generate` per row;
- an exported adapter loads in PEFT (`PeftModel.from_pretrained`) with equal logits;
- it takes images (`ImageChunk`) or not, as the table says (`Family.images`; the image path
  itself is compared with transformers in tests/unit/test_vision_layer.py).

MODELS.md at the repo root is generated from the same table (`render_models_md`): run with
TINKERD_WRITE_MODELS=1 to rewrite it; otherwise `test_models_md_is_up_to_date` fails when it has
drifted. A check that fails for a known reason is listed in `XFAIL` (strict: it must fail), and
MODELS.md shows it.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from lineup.families import FAMILIES, SAMPLING, SAMPLING_TITLES, VOCAB, build
from transformers import AutoConfig, GenerationConfig
from unit.numerics import assert_close_scaled

from tinkerd.checkpoints.peft_format import save_adapter
from tinkerd.constants import NON_TEXT_MODULES
from tinkerd.engine.adapter_files import to_saved
from tinkerd.model.loading import BaseModel, load_base_model, model_class
from tinkerd.model.lora import LoraConfig, LoraLinear, Routing, segments_for
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

pytestmark = pytest.mark.filterwarnings(
    "ignore:Model has `tie_word_embeddings=True`:UserWarning",  # Gemma 3 multimodal
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # PEFT on transformers 5
)

MODELS_MD = Path(__file__).resolve().parents[2] / "MODELS.md"
REAL_MODELS_HEADING = "## Real models"

# The checks, in MODELS.md's column order: test name -> column title.
CHECKS = {
    "train": "train",
    "mixed": "mixed tenants",
    "greedy": "greedy = generate",
    "peft": "PEFT round trip",
}
# (family, check) -> why it fails. Each is xfail(strict=True): fixing it makes the suite fail
# until the entry is removed (and MODELS.md regenerated).
XFAIL: dict[tuple[str, str], str] = {}

TEXTS = ["The quick brown fox jumps over", "Hello"]
# Three tenants of different ranks/alphas and row counts, plus one base-model row.
TENANTS = {"t4": (4, 32.0, 1), "t8": (8, 16.0, 2), "t2": (2, 8.0, 3)}


@dataclass
class Setup:
    name: str
    path: Path
    base: BaseModel
    worker: ModelWorker


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """One family's tiny model, built, saved and loaded once; its worker is shared by the
    family's checks (each check uses its own adapter ids)."""
    name = request.param
    path = build(FAMILIES[name].build, tmp_path_factory.mktemp(name))
    base = load_base_model(str(path), data_dir=tmp_path_factory.mktemp(f"{name}-data"))
    return Setup(name, path, base, ModelWorker(base))


def families_for(check: str) -> list[object]:
    """The family params of one check, with that check's XFAIL entries marked."""
    params = []
    for name in FAMILIES:
        reason = XFAIL.get((name, check))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def each_family(check: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("family", families_for(check), indirect=True)


# -- helpers -----------------------------------------------------------------------------------


def short_targets(worker: ModelWorker, config: LoraConfig) -> set[str]:
    return {p.rsplit(".", 1)[-1] for p in worker.lora.target_paths(config)}


def randomize(worker: ModelWorker, adapter_id: str, seed: int, std: float = 0.05) -> None:
    """Non-zero A and B, so the adapter changes every targeted layer's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.lora.adapters[adapter_id].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def ce_datum(tokens: list[int]) -> Datum:
    targets = torch.tensor(tokens[1:])
    return Datum(tokens[:-1], {"target_tokens": targets, "weights": torch.ones(len(targets))})


def random_datum(length: int, gen: torch.Generator) -> Datum:
    tokens = torch.randint(0, 256, (length,), generator=gen).tolist()
    inputs = {
        "target_tokens": torch.randint(0, VOCAB, (length,), generator=gen),
        "weights": torch.randn(length, generator=gen),
    }
    return Datum(tokens, inputs)


def plain_model(path: Path) -> torch.nn.Module:
    """The model as transformers loads it, with the class tinkerd picks."""
    config = AutoConfig.from_pretrained(path)
    return model_class(config).from_pretrained(path, dtype=torch.float32).eval()


# -- the checks ------------------------------------------------------------------------------


@each_family("images")
def test_image_input_as_listed(family: Setup) -> None:
    """The loaded model takes images exactly when its family is listed with image input."""
    assert (family.worker.vision is not None) == FAMILIES[family.name].images


@each_family("sampling")
def test_sampling_path_as_listed(family: Setup) -> None:
    """The family samples the way MODELS.md says (its greedy check runs that path)."""
    engine = family.worker.sampler
    got = "static" if not engine.continuous else "decoder" if engine.own_decoder else "continuous"
    assert got == SAMPLING[family.name]


@each_family("load")
def test_loads_as_expected_class(family: Setup) -> None:
    assert type(family.base.model).__name__ == FAMILIES[family.name].loads_as
    assert family.base.info.vocab_size == VOCAB


@each_family("targets")
def test_lora_targets(family: Setup) -> None:
    """The default adapter adapts exactly the table's modules: attention, the text MLP (routed
    experts' fused weights and shared experts included), lm_head; nothing outside the language
    model; train_mlp alone gives an adapter for every MLP target, experts included."""
    spec = FAMILIES[family.name]
    lora = family.worker.lora
    assert short_targets(family.worker, LoraConfig()) == set(spec.targets)
    paths = lora.target_paths(LoraConfig())
    assert not any(NON_TEXT_MODULES.intersection(p.split(".")) for p in paths), paths
    assert {lora.kinds[p] for p in paths} == {"attn", "mlp", "unembed"}
    assert bool(lora.expert_layers) == spec.moe
    mlp_only = LoraConfig(train_attn=False, train_unembed=False)
    assert all(lora.kinds[p] == "mlp" for p in lora.target_paths(mlp_only))
    experts = {t for t in short_targets(family.worker, mlp_only) if t.startswith("experts/")}
    assert len(experts) == (2 if spec.moe else 0), experts


@each_family("train")
def test_trains(family: Setup) -> None:
    worker = family.worker
    worker.add_adapter("train", LoraConfig(rank=8, seed=0))
    data = [ce_datum(family.base.tokenizer.encode(TEXTS[0]))]
    losses = []
    for _ in range(5):
        (res,) = worker.forward_backward([ForwardBackwardInput("train", data)])
        worker.optim_step("train", AdamParams(learning_rate=1e-2))
        losses.append(res.metrics["loss:sum"])
    worker.remove_adapter("train")
    assert losses[-1] < 0.8 * losses[0], losses


@each_family("mixed")
def test_mixed_tenants_equal_separate_runs(family: Setup) -> None:
    """One forward_backward over three tenants' rows (ranks 4/8/2, 1/2/3 rows of different
    lengths) and a base row gives each row the log-probs, and each adapter the gradients, of
    running that tenant's rows alone."""
    worker = family.worker
    for i, (aid, (rank, alpha, _)) in enumerate(TENANTS.items()):
        worker.add_adapter(aid, LoraConfig(rank=rank, alpha=alpha, seed=i))
        randomize(worker, aid, seed=50 + i)
    gen = torch.Generator().manual_seed(3)
    items = [
        ForwardBackwardInput(aid, [random_datum(int(n), gen) for n in torch.randint(5, 14, (k,))])
        for aid, (_, _, k) in TENANTS.items()
    ]
    items.insert(1, ForwardBackwardInput(None, [random_datum(9, gen)]))
    mixed = worker.forward_backward(items)
    grads = {
        aid: {k: p.grad.clone() for k, p in worker.lora.adapters[aid].params.items()}
        for aid in TENANTS
    }
    for aid in TENANTS:
        worker.zero_grad(aid)
    try:
        for item, out in zip(items, mixed, strict=True):
            (alone,) = worker.forward_backward([item])
            for got, want in zip(out.loss_fn_outputs, alone.loss_fn_outputs, strict=True):
                assert_close_scaled(got["logprobs"], want["logprobs"], terms=VOCAB, msg="logprobs")
            if item.adapter_id is None:
                continue
            tokens = sum(len(d.tokens) for d in item.data)
            for k, p in worker.lora.adapters[item.adapter_id].params.items():
                assert p.grad is not None, k
                terms = max(VOCAB, tokens)
                assert_close_scaled(grads[item.adapter_id][k], p.grad, terms=terms, msg=k)
        assert all(p.grad is None for p in worker.lora.model.parameters())
    finally:
        for aid in TENANTS:
            worker.remove_adapter(aid)


@each_family("greedy")
def test_greedy_equals_generate(family: Setup) -> None:
    """Greedy sampling of one left-padded batch mixing the base model and two adapters of
    different rank (prompts of different lengths) gives each row the tokens of transformers'
    `generate` on that prompt alone, with that row's adapter (or none) routed in."""
    worker, base = family.worker, family.base
    for i, rank in enumerate((4, 8)):
        worker.add_adapter(f"g{rank}", LoraConfig(rank=rank, alpha=16, seed=i))
        randomize(worker, f"g{rank}", seed=30 + i, std=0.1)
    prompts = [base.tokenizer.encode(t) for t in TEXTS]
    rows: list[tuple[str | None, list[int]]] = [
        (None, prompts[0]),
        ("g4", prompts[1]),
        ("g8", prompts[0]),
        (None, prompts[1]),
    ]
    params = SamplingParams(8, 0.0, stop=())
    try:
        outs = worker.sample([SampleInput(aid, p, params) for aid, p in rows])
        config = GenerationConfig(
            max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=256
        )
        for (aid, prompt), out in zip(rows, outs, strict=True):
            with torch.no_grad(), worker.lora.route(segments_for([aid])):
                ids = base.model.generate(
                    torch.tensor([prompt]), attention_mask=None, generation_config=config
                )
            assert out.sequences[0].tokens == ids[0, len(prompt) :].tolist(), aid
    finally:
        for rank in (4, 8):
            worker.remove_adapter(f"g{rank}")


@each_family("peft")
def test_peft_round_trip(family: Setup, tmp_path: Path) -> None:
    """An exported adapter (non-zero weights) loads with `PeftModel.from_pretrained` on the
    plain transformers model with the same LoRA parameters and gives tinkerd's logits."""
    worker = family.worker
    worker.add_adapter("p", LoraConfig(rank=4, alpha=8, seed=0))
    randomize(worker, "p", seed=11)
    try:
        state = worker.export_adapter("p", with_optimizer=False)
        ckpt = tmp_path / "ckpt"
        save_adapter(ckpt, to_saved(state, str(family.path)))
        ids = torch.tensor([family.base.tokenizer.encode(TEXTS[0])])
        with torch.no_grad(), worker.lora.route(segments_for(["p"])):
            ours = family.base.model(ids).logits
        plain = plain_model(family.path)
        peft_model = peft.PeftModel.from_pretrained(plain, ckpt).eval()
        n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert n_peft == worker.lora.adapters["p"].num_params(), "PEFT adapts other parameters"
        with torch.no_grad():
            theirs = peft_model(ids).logits
            untouched = plain_model(family.path)(ids).logits
        assert (ours - untouched).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    finally:
        worker.remove_adapter("p")


def test_flattened_tokens_route_like_rows() -> None:
    """A LoraLinear called on tokens flattened to (rows × seq, in) gives each token its row's
    adapter, as on the (rows, seq, in) input: mixed ranks, unequal row counts, a base row."""
    torch.manual_seed(0)
    routing = Routing()
    layer = LoraLinear(torch.nn.Linear(8, 6), routing)
    for aid, rank in (("a", 2), ("b", 3)):
        layer.adapters[aid] = (torch.randn(rank, 8), torch.randn(6, rank), 0.5)
    x = torch.randn(4, 5, 8)
    routing.segments = segments_for(["a", "a", None, "b"])
    rows = layer(x)
    flat = layer(x.reshape(20, 8))
    torch.testing.assert_close(flat, rows.reshape(20, 6))
    for r, aid in enumerate(["a", "a", None, "b"]):
        routing.segments = segments_for([aid])
        torch.testing.assert_close(rows[r], layer(x[r : r + 1])[0])
    routing.segments = segments_for(["a", "b", "a"])  # uniform ranks are not required
    with pytest.raises(ValueError, match="do not split"):
        layer(torch.randn(7, 8))


# -- MODELS.md -------------------------------------------------------------------------------


def cell(name: str, check: str) -> str:
    reason = XFAIL.get((name, check))
    return f"✗ (xfail: {reason})" if reason else "✓"


def render_models_md() -> str:
    lines = [
        "# Tested base-model families",
        "",
        "<!-- Generated by tests/lineup/test_lineup.py; do not edit the table by hand. Regenerate",
        "     with TINKERD_WRITE_MODELS=1 .venv/bin/pytest tests/lineup. The section after it",
        f"     ({REAL_MODELS_HEADING[3:]!r}) is hand-written and kept as it is. -->",
        "",
        "Every family below runs in CI (`tests/lineup/`) as a tiny random-init model built in code",
        "(hidden 64, 2 layers, 4 experts top-2 for MoE; `tests/lineup/families.py`), loaded with",
        "`load_base_model`, with LoRA targets per adapter of the default `LoraConfig` (attention,",
        "MLP, unembedding; `experts/<param>`: every routed expert's fused weight, PEFT's",
        "`target_parameters`). ✓ means, compared against plain transformers / PEFT:",
        "",
        "- **train**: the loss of a rank-8 adapter falls over 5 Adam steps;",
        "- **mixed tenants**: three tenants of ranks 4/8/2 with 1/2/3 rows and a base-model row in",
        "  one `forward_backward` get the log-probs and gradients of separate runs;",
        "- **greedy = generate**: greedy sampling of one left-padded batch mixing the base model",
        "  and adapters of rank 4 and 8 equals `generate` per row;",
        "- **PEFT round trip**: the exported adapter loads with `PeftModel.from_pretrained` and",
        "  gives the same logits.",
        "",
        "Vision-language models train and sample on text; their vision towers get no LoRA.",
        "**image input** ✓: `ImageChunk`s in `forward_backward` and `sample` too (the model's own",
        "image processor; forward and greedy sampling equal transformers',",
        "`tests/unit/test_vision_layer.py`). Qwen3.5 checkpoints load as the multimodal class",
        "they declare, so they take images through the Qwen-VL path.",
        "",
        "**sampling**: how the family samples (`tinkerd/model/sample_engine.py`): continuous",
        "batching (requests join the running decode batch at the next step) on tinkerd's own",
        "decode step (`tinkerd/model/decoder.py`) or on transformers' forward; or static batches",
        "(a request waits for the running batch), for recurrent cache state or image input.",
        "",
        "| family | class tinkerd loads | LoRA targets | "
        + " | ".join(CHECKS.values())
        + " | image input | sampling |",
        "| --- | --- | --- | " + " | ".join("---" for _ in CHECKS) + " | --- | --- |",
    ]
    for name, spec in FAMILIES.items():
        targets = ", ".join(f"`{t}`" for t in spec.targets)
        checks = " | ".join(cell(name, c) for c in CHECKS)
        images = "✓" if spec.images else "–"
        sampling = SAMPLING_TITLES[SAMPLING[name]]
        lines.append(
            f"| {spec.title} | `{spec.loads_as}` | {targets} | {checks} | {images} | {sampling} |"
        )
    return "\n".join(lines) + "\n\n"


def test_models_md_is_up_to_date() -> None:
    """The generated part (everything before the real-models section) must match; that section
    is hand-written and kept as it is when rewriting."""
    generated = render_models_md()
    current = MODELS_MD.read_text() if MODELS_MD.exists() else ""
    if os.environ.get("TINKERD_WRITE_MODELS") == "1":
        rest = (
            current[current.index(REAL_MODELS_HEADING) :] if REAL_MODELS_HEADING in current else ""
        )
        MODELS_MD.write_text(generated + (rest or f"{REAL_MODELS_HEADING}\n"))
        return
    assert current[: len(generated)] == generated and REAL_MODELS_HEADING in current, (
        "MODELS.md is out of date: run TINKERD_WRITE_MODELS=1 .venv/bin/pytest tests/lineup"
    )
