"""Vision-language and hybrid-attention base models, on tiny random-init models built in code.

Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE load as their image-text-to-text class (their configs have
no causal-LM class), Gemma 3 4B+ as `Gemma3ForConditionalGeneration`; tinkerd trains and samples
them on text with LoRA on the language model only, and their adapters load in PEFT. Qwen3.5
(gated-delta-net linear attention + full attention) samples with a cache that holds the linear
layers' conv/recurrent state. Everything is compared against plain transformers.
(docs/lineup.md F1, F3, F6, F7.)
"""

from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from lineup.families import (
    Builder,
    build,
    gemma3,
    qwen2_5_vl,
    qwen3_5,
    qwen3_5_moe,
    qwen3_vl,
    qwen3_vl_moe,
)
from transformers import AutoConfig, GenerationConfig

from tinkerd.checkpoints.peft_format import save_adapter
from tinkerd.constants import NON_TEXT_MODULES
from tinkerd.engine.adapter_files import to_saved
from tinkerd.model.loading import BaseModel, load_base_model, model_class
from tinkerd.model.lora import LoraConfig, segments_for
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

# The VL families of the lineup (tests/lineup/families.py).
VL_FAMILIES: dict[str, Builder] = {
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "qwen3_vl_moe": qwen3_vl_moe,
    "gemma3": gemma3,
}
# (built class, class tinkerd loads)
EXPECTED_CLASS = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
TEXTS = ["The quick brown fox jumps over", "Hello"]


_built: dict[str, Path] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    def get(name: str) -> Path:
        if name not in _built:
            family = {**VL_FAMILIES, "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe}[name]
            _built[name] = build(family, tmp_path_factory.mktemp(name))
        return _built[name]

    return get


def plain_model(path: Path) -> torch.nn.Module:
    """The model as transformers loads it, with the class tinkerd picks."""
    config = AutoConfig.from_pretrained(path)
    return model_class(config).from_pretrained(path, dtype=torch.float32).eval()


def prompts(base: BaseModel) -> list[list[int]]:
    return [base.tokenizer.encode(t) for t in TEXTS]


def greedy_equals_generate(worker: ModelWorker, adapter_id: str | None = None) -> None:
    """tinkerd's greedy tokens for a left-padded batch of prompts of different lengths equal
    transformers' `generate` on each prompt alone (no padding), base model or adapter."""
    base = worker.base
    params = SamplingParams(8, 0.0, stop=())
    rows = prompts(base)
    outs = worker.sample([SampleInput(adapter_id, p, params) for p in rows])
    config = GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=256, bos_token_id=257
    )
    for prompt, out in zip(rows, outs, strict=True):
        with torch.no_grad(), worker.lora.route(segments_for([adapter_id])):
            ids = base.model.generate(
                torch.tensor([prompt]), attention_mask=None, generation_config=config
            )
        assert out.sequences[0].tokens == ids[0, len(prompt) :].tolist()


def ce_datum(tokens: list[int]) -> Datum:
    return Datum(
        tokens[:-1],
        {
            "target_tokens": torch.tensor(tokens[1:]),
            "weights": torch.ones(len(tokens) - 1),
        },
    )


# ------------------------------------------------------------------------------------------
# VL models: load, LoRA on the language model only, train, sample, export


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # Gemma 3
@pytest.mark.parametrize("name", list(VL_FAMILIES))
def test_vl_model_text_only(name: str, model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    path = model_dir(name)
    base = load_base_model(str(path), data_dir=tmp_path)
    assert type(base.model).__name__ == EXPECTED_CLASS[name]
    assert base.info.vocab_size == 320
    worker = ModelWorker(base)

    # LoRA targets: the language model's attention/MLP Linears and lm_head, nothing else.
    targets = list(worker.lora.layers)
    assert "lm_head" in targets
    assert all(p == "lm_head" or p.startswith("model.language_model.layers.") for p in targets), (
        targets
    )
    assert not any(NON_TEXT_MODULES.intersection(p.split(".")) for p in targets)
    assert any(k == "mlp" for k in worker.lora.kinds.values())  # text MLP (or MoE experts)

    # Forward log-probs equal the model's own, with plain input_ids (text positions).
    tokens = prompts(base)[0]
    (out,) = worker.forward_backward(
        [ForwardBackwardInput(None, [ce_datum(tokens)], forward_only=True)]
    )
    with torch.no_grad():
        logp = torch.log_softmax(base.model(torch.tensor([tokens])).logits[0].float(), -1)
    want = logp[:-1].gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.loss_fn_outputs[0]["logprobs"], want, atol=1e-5, rtol=1e-5)

    # Greedy sampling (left-padded batch) equals generate, base model.
    greedy_equals_generate(worker)

    # A few optimizer steps make the loss fall.
    worker.add_adapter("a", LoraConfig(rank=8, seed=0))
    data = [ce_datum(tokens)]
    losses = []
    for _ in range(5):
        (res,) = worker.forward_backward([ForwardBackwardInput("a", data)])
        worker.optim_step("a", AdamParams(learning_rate=1e-2))
        losses.append(res.metrics["loss:sum"])
    assert losses[-1] < losses[0] * 0.8, losses

    # Greedy under the trained adapter equals generate with the adapter routed in.
    greedy_equals_generate(worker, "a")

    # The exported adapter loads in PEFT on the same class and gives the same logits.
    state = worker.export_adapter("a", with_optimizer=False)
    assert not {"0", "2"} & set(state.target_modules)  # F7: no merger.mlp.0 / .2
    ckpt = tmp_path / "ckpt"
    save_adapter(ckpt, to_saved(state, str(path)))
    ids = torch.tensor([tokens])
    with torch.no_grad(), worker.lora.route(segments_for(["a"])):
        ours = base.model(ids).logits
    peft_model = peft.PeftModel.from_pretrained(plain_model(path), ckpt).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    lora_paths = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in peft_model.named_modules()
        if n.endswith(".lora_A")
    }
    assert lora_paths == {k.removesuffix(".lora_A.weight") for k in state.weights if "lora_A" in k}


def test_vl_train_mlp_targets_the_text_mlp(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """`train_mlp` means the language model's MLP, never the vision tower's (lineup F6)."""
    base = load_base_model(str(model_dir("qwen3_vl")), data_dir=tmp_path)
    worker = ModelWorker(base)
    config = LoraConfig(rank=8, seed=0, train_attn=False, train_unembed=False)
    paths = worker.lora.target_paths(config)
    assert paths and all(".language_model." in p and ".mlp." in p for p in paths)


# ------------------------------------------------------------------------------------------
# Qwen3.5: hybrid linear + full attention


def test_qwen3_5_greedy_equals_generate(model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = load_base_model(str(model_dir("qwen3_5")), data_dir=tmp_path)
    assert type(base.model).__name__ == EXPECTED_CLASS["qwen3_5"]
    worker = ModelWorker(base)
    greedy_equals_generate(worker)
    # Transformers' own batched generate on the left-padded batch agrees too (pads are masked
    # out of the linear-attention layers' inputs, so zero state stays zero).
    rows = prompts(base)
    width = max(map(len, rows))
    ids = torch.tensor([[256] * (width - len(p)) + p for p in rows])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in rows]).unsqueeze(1)).long()
    config = GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=256
    )
    with torch.no_grad():
        batched = base.model.generate(ids, attention_mask=mask, generation_config=config)
    outs = worker.sample([SampleInput(None, p, SamplingParams(8, 0.0, stop=())) for p in rows])
    assert [o.sequences[0].tokens for o in outs] == batched[:, width:].tolist()


def test_qwen3_5_rows_finishing_early(model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Rows leave the batch at different steps (`reorder_cache` on the linear-attention state
    too) without changing the others' tokens; num_samples > 1 repeats the prefilled state."""
    base = load_base_model(str(model_dir("qwen3_5")), data_dir=tmp_path)
    worker = ModelWorker(base)
    rows = prompts(base)
    solo = [worker.sample([SampleInput(None, p, SamplingParams(8, 0.0, stop=()))])[0] for p in rows]
    mixed = worker.sample(
        [
            SampleInput(None, rows[0], SamplingParams(3, 0.0, stop=()), num_samples=2),
            SampleInput(None, rows[1], SamplingParams(8, 0.0, stop=())),
        ]
    )
    want0 = solo[0].sequences[0].tokens[:3]
    assert [s.tokens for s in mixed[0].sequences] == [want0, want0]
    assert mixed[1].sequences[0].tokens == solo[1].sequences[0].tokens


def test_qwen3_5_trains_and_samples_with_adapter(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = load_base_model(str(model_dir("qwen3_5")), data_dir=tmp_path)
    worker = ModelWorker(base)
    worker.add_adapter("a", LoraConfig(rank=8, seed=0))
    data = [ce_datum(prompts(base)[0])]
    for _ in range(3):
        worker.forward_backward([ForwardBackwardInput("a", data)])
        worker.optim_step("a", AdamParams(learning_rate=1e-2))
    greedy_equals_generate(worker, "a")


def test_qwen3_5_moe_greedy_equals_generate(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = load_base_model(str(model_dir("qwen3_5_moe")), data_dir=tmp_path)
    assert type(base.model).__name__ == EXPECTED_CLASS["qwen3_5_moe"]
    greedy_equals_generate(ModelWorker(base))
