"""Merged-model and PEFT exports (tinkerd/checkpoints/merge.py, `tinkerd export`).

Each case saves a checkpoint through tinkerd's own path (`ModelWorker.export_adapter` and the
checkpoint writer) with random non-zero LoRA weights, exports the merged model, loads it with
plain `transformers` and compares its logits with tinkerd's forward with the adapter.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from lineup.families import build, deepseek_v3, gemma3, gpt_oss, qwen2_5_vl, qwen3_5, qwen3_moe
from numerics import assert_close_scaled
from safetensors.torch import load_file

from tinkerd.checkpoints.merge import (
    NOTE_FILE,
    REPORT_FILE,
    export_merged,
    export_peft,
    is_merged_export,
)
from tinkerd.engine.adapter_files import write_adapter
from tinkerd.model.loading import load_base_model, model_class
from tinkerd.model.lora import LoraConfig, segments_for
from tinkerd.model.worker import ModelWorker

IDS = [[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]]


def checkpoint(model_dir: Path, tmp_path: Path, *, seed: int = 3) -> tuple[Path, torch.Tensor]:
    """A saved checkpoint with random non-zero LoRA (attention, MLP/experts, lm_head) and
    tinkerd's logits for IDS with it."""
    base = load_base_model(str(model_dir), data_dir=tmp_path)
    worker = ModelWorker(base)
    worker.add_adapter("p", LoraConfig(rank=4, alpha=8, seed=0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.lora.adapters["p"].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ckpt = tmp_path / "ckpt"
    write_adapter(ckpt, worker.export_adapter("p", with_optimizer=False), str(model_dir))
    with torch.no_grad(), worker.lora.route(segments_for(["p"])):
        ours = base.model(torch.tensor(IDS)).logits
    with torch.no_grad():
        plain = base.model(torch.tensor(IDS)).logits  # routing: no adapter
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the output"
    return ckpt, ours


def load_merged(out: Path) -> torch.nn.Module:
    config = tf.AutoConfig.from_pretrained(out)
    return model_class(config).from_pretrained(out, dtype=torch.float32).eval()


def check_merged(model_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    ckpt, ours = checkpoint(model_dir, tmp_path)
    out = tmp_path / "merged"
    export_merged(ckpt, str(model_dir), out, checkpoint="tinker://r/weights/c")
    assert is_merged_export(out)
    merged = load_merged(out)
    with torch.no_grad():
        theirs = merged(torch.tensor(IDS)).logits
    hidden = merged.config.get_text_config().hidden_size
    assert_close_scaled(theirs, ours, terms=4 * hidden, msg=str(model_dir.name))
    for name in ("config.json", "generation_config.json", "tokenizer.json", NOTE_FILE):
        assert (out / name).is_file(), name
    assert tf.AutoTokenizer.from_pretrained(out).encode("ab") == [97, 98]
    return out, json.loads((out / REPORT_FILE).read_text())


def test_untied_llama(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, report = check_merged(tiny_model_dir, tmp_path)
    assert not report["untied"] and "lm_head" in report["merged"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_tied_embeddings_are_untied(tiny_tied_model_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-style tied embeddings with an lm_head LoRA: the export writes a separate
    lm_head (merged) and the base embedding (unchanged), and says so."""
    out, report = check_merged(tiny_tied_model_dir, tmp_path)
    assert report["untied"]
    assert "untie" in (out / NOTE_FILE).read_text()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_tied_model_dir / "model.safetensors"))
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(tensors[embed], base[embed], rtol=0, atol=0)
    assert "lm_head.weight" in tensors
    assert (tensors["lm_head.weight"] - tensors[embed]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "family", [qwen3_moe, gpt_oss, deepseek_v3], ids=["qwen3_moe", "gpt_oss", "deepseek_v3"]
)
def test_moe_experts(family: Callable, tmp_path: Path) -> None:
    """Expert LoRA merged into the 3-D expert weights, in each layout (gpt-oss transposed)."""
    model_dir = build(family, tmp_path / "base")
    _, report = check_merged(model_dir, tmp_path)
    assert any(m.endswith("experts/gate_up_proj") for m in report["merged"])
    assert any(m.endswith("experts/down_proj") for m in report["merged"])


def test_vl_keeps_vision_tower(tmp_path: Path) -> None:
    model_dir = build(qwen2_5_vl, tmp_path / "base")
    out, _ = check_merged(model_dir, tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    base = load_file(str(model_dir / "model.safetensors"))
    vision = [k for k in base if ".visual." in f".{k}"]
    assert vision
    for key in vision:
        torch.testing.assert_close(tensors[key], base[key], rtol=0, atol=0)


def test_tied_vl_and_text_only_class(tmp_path: Path) -> None:
    """Gemma 3 (multimodal class, tied embeddings) unties; Qwen3.5 exports the multimodal
    class it ships and is served as (vision tower included). A checkpoint whose declared
    class tinkerd does not load (here a made-up one, so Qwen3.5 loads text-only) exports the
    class served and says the rest is left out."""
    _, report = check_merged(build(gemma3, tmp_path / "gemma3"), tmp_path / "g")
    assert report["untied"]
    out, report = check_merged(build(qwen3_5, tmp_path / "qwen3_5"), tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert not any("not included" in n for n in report["notes"])
    model_dir = build(qwen3_5, tmp_path / "qwen3_5_other")
    shipped = json.loads((model_dir / "config.json").read_text())
    shipped["architectures"] = ["Qwen3_5ForSomethingElse"]
    (model_dir / "config.json").write_text(json.dumps(shipped))
    out, report = check_merged(model_dir, tmp_path / "q2")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    assert any("Qwen3_5ForSomethingElse" in n and "not included" in n for n in report["notes"])


def test_bfloat16_cast_and_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt, _ = checkpoint(tiny_model_dir, tmp_path)
    out = tmp_path / "merged"
    export_merged(ckpt, str(tiny_model_dir), out)
    with pytest.raises(FileExistsError):
        export_merged(ckpt, str(tiny_model_dir), out)
    report = export_merged(ckpt, str(tiny_model_dir), out, dtype="bfloat16", overwrite=True)
    assert report.dtype == "bfloat16"
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_peft_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt, _ = checkpoint(tiny_model_dir, tmp_path)
    full = export_peft(ckpt, tmp_path / "peft")
    assert "vLLM" in (tmp_path / "peft" / NOTE_FILE).read_text()
    assert any("lm_head" in n for n in full.notes)
    assert load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys() == (
        load_file(str(ckpt / "adapter_model.safetensors")).keys()
    )
    export_peft(ckpt, tmp_path / "vllm", drop_lm_head=True)
    keys = load_file(str(tmp_path / "vllm" / "adapter_model.safetensors")).keys()
    assert keys and not [k for k in keys if ".lm_head." in k]
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert "lm_head" not in config["target_modules"]


def test_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`tinkerd export merged|peft tinker://… DIR --data-dir D`, from the data dir alone."""
    data_dir = tmp_path / "data"
    ckpt, ours = checkpoint(tiny_model_dir, tmp_path)
    stored = data_dir / "checkpoints" / "run-1" / "weights" / "c1"
    stored.parent.mkdir(parents=True)
    os.rename(ckpt, stored)
    cli = [sys.executable, "-m", "tinkerd.cli", "export"]
    env = {**os.environ, "TINKERD_DATA_DIR": str(tmp_path / "elsewhere")}
    path = "tinker://run-1/weights/c1"
    args = [path, str(tmp_path / "m"), "--data-dir", str(data_dir)]
    done = subprocess.run([*cli, "merged", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "merged" in done.stdout
    with torch.no_grad():
        theirs = load_merged(tmp_path / "m")(torch.tensor(IDS)).logits
    assert_close_scaled(theirs, ours, terms=256, msg="cli")
    peft_args = [path, str(tmp_path / "p"), "--data-dir", str(data_dir), "--drop-lm-head"]
    done = subprocess.run([*cli, "peft", *peft_args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    missing = [path.replace("c1", "nope"), str(tmp_path / "x"), "--data-dir", str(data_dir)]
    done = subprocess.run([*cli, "merged", *missing], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "no checkpoint" in done.stderr
