"""Checkpoints: tinker:// paths, PEFT-format save/load, exact resume, PEFT loading, atomicity."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tinkerd.checkpoints import peft_format
from tinkerd.checkpoints.atomic import cleanup_leftovers
from tinkerd.checkpoints.paths import TinkerPath
from tinkerd.checkpoints.peft_format import (
    AdapterInfo,
    SavedAdapter,
    checkpoint_exists,
    delete_checkpoint,
    load_adapter,
    read_adapter_info,
    save_adapter,
)
from tinkerd.engine.adapter_files import to_saved, to_state
from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.lora import LoraConfig, segments_for
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import Datum, ForwardBackwardInput
from tinkerd.model.worker import ModelWorker

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["hello world, this is a test", "checkpoints must round-trip exactly!"]


# --- helpers ------------------------------------------------------------------------------------


def batch(base: BaseModel) -> list[Datum]:
    data = []
    for text in TEXTS:
        seq = base.tokenizer.encode(text)
        targets = torch.tensor(seq[1:])
        data.append(
            Datum(seq[:-1], {"target_tokens": targets, "weights": torch.ones(len(targets))})
        )
    return data


def train(worker: ModelWorker, adapter_id: str, steps: int) -> list[float]:
    data = batch(worker.base)
    losses = []
    for _ in range(steps):
        out = worker.forward_backward([ForwardBackwardInput(adapter_id, data)])
        worker.optim_step(adapter_id, AdamParams(learning_rate=1e-2, weight_decay=0.01))
        losses.append(out[0].metrics["loss:sum"])
    return losses


def input_ids(base: BaseModel) -> torch.Tensor:
    """Two equal-length rows, so no padding is involved."""
    rows = [base.tokenizer.encode(t)[:20] for t in TEXTS]
    return torch.tensor(rows)


def worker_logits(worker: ModelWorker, adapter_id: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), worker.lora.route(segments_for([adapter_id] * ids.shape[0])):
        return worker.base.model(ids).logits


def randomize_b(worker: ModelWorker, adapter_id: str, seed: int = 0) -> None:
    """Give every lora_B a random value so the adapter visibly changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    state = worker.export_adapter(adapter_id, with_optimizer=False)
    for name, tensor in state.weights.items():
        if name.endswith("lora_B.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
    worker.import_adapter(adapter_id, state)


def tiny_saved(seed: int = 0, *, optimizer: bool = True) -> SavedAdapter:
    """A small adapter that needs no model (for the file-level tests)."""
    gen = torch.Generator().manual_seed(seed)
    path = "model.layers.0.self_attn.q_proj"
    weights = {
        f"{path}.lora_A.weight": torch.randn(2, 8, generator=gen),
        f"{path}.lora_B.weight": torch.randn(8, 2, generator=gen),
    }
    moments = None
    if optimizer:
        moments = {}
        for name, w in weights.items():
            moments[f"{name}.exp_avg"] = torch.randn(w.shape, generator=gen)
            moments[f"{name}.exp_avg_sq"] = torch.rand(w.shape, generator=gen)
            moments[f"{name}.step"] = torch.tensor([3.0])
    info = AdapterInfo(rank=2, alpha=4.0, target_modules=("q_proj",), base_model="tiny")
    return SavedAdapter(info, weights, moments)


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# --- tinker:// paths ----------------------------------------------------------------------------


def test_parse_and_format_paths(tmp_path: Path) -> None:
    text = "tinker://0f1e2d3c-aaaa-bbbb-cccc-111122223333:train:0/weights/step_0010"
    path = TinkerPath.parse(text)
    assert path == TinkerPath(
        "0f1e2d3c-aaaa-bbbb-cccc-111122223333:train:0", "weights", "step_0010"
    )
    assert str(path) == text
    assert path.checkpoint_id == "weights/step_0010"
    assert path.checkpoint_type == "training"
    assert TinkerPath.parse("tinker://r/sampler_weights/x").checkpoint_type == "sampler"
    assert TinkerPath.parse("tinker://r/external_weights/x").checkpoint_type == "external"
    assert TinkerPath.from_checkpoint_id(path.run_id, "weights/step_0010") == path

    directory = path.storage_dir(tmp_path)
    assert directory == tmp_path / path.run_id / "weights" / "step_0010"
    assert TinkerPath.from_storage_dir(tmp_path, directory) == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weights/x", "must start with"),
        ("http://run/weights/x", "must start with"),
        ("tinker://run/weights", "3 parts"),
        ("tinker://run/weights/a/b", "3 parts"),
        ("tinker://run/weights/a/../../etc", "3 parts"),
        ("tinker://run/checkpoints/x", "kind"),
        ("tinker://run/weights/", "non-empty"),
        ("tinker:///weights/x", "non-empty"),
        ("tinker://run/weights/..", "must not start with '.'"),
        ("tinker://run/weights/.", "must not start with '.'"),
        ("tinker://../weights/x", "must not start with '.'"),
        ("tinker://run/weights/.x.tmp-0123abcd", "must not start with '.'"),
        ("tinker://run/weights/a\\..\\b", "must not contain"),
        ("tinker://run/weights/a\x00b", "NUL"),
        ("tinker://run/weights/" + "x" * 300, "longer than"),
    ],
)
def test_invalid_paths_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TinkerPath.parse(text)


def test_storage_dir_mapping_refuses_escapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not"):
        TinkerPath("run", "weights", "..")
    with pytest.raises(ValueError, match="must not contain"):
        TinkerPath("a/b", "weights", "x")
    with pytest.raises(ValueError, match="<kind>/<name>"):
        TinkerPath.from_checkpoint_id("run", "weights")
    with pytest.raises(ValueError, match="not inside"):
        TinkerPath.from_storage_dir(tmp_path / "root", tmp_path / "elsewhere" / "w" / "x")
    with pytest.raises(ValueError, match="run_id"):
        TinkerPath.from_storage_dir(tmp_path, tmp_path / "run" / "weights")
    with pytest.raises(ValueError, match="kind"):
        TinkerPath.from_storage_dir(tmp_path, tmp_path / "run" / "other" / "x")


# --- save / load --------------------------------------------------------------------------------


def test_resume_from_checkpoint_is_exact(
    tiny_base: BaseModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    worker = ModelWorker(tiny_base)
    worker.add_adapter("a", LoraConfig(rank=4, alpha=8.0, seed=1))
    train(worker, "a", 3)
    state = worker.export_adapter("a", with_optimizer=True)
    assert state.optimizer

    ckpt = TinkerPath("s:train:0", "weights", "step_3").storage_dir(tmp_path / "ckpts")
    size = save_adapter(ckpt, to_saved(state, str(tiny_model_dir)))
    assert size == peft_format.checkpoint_size(ckpt) > 0
    loaded = load_adapter(ckpt)
    assert_tensors_equal(loaded.weights, state.weights)
    assert loaded.optimizer is not None
    assert_tensors_equal(loaded.optimizer, state.optimizer)
    assert to_state(loaded).config == state.config
    assert sorted(loaded.info.target_modules) == sorted(state.target_modules)
    assert load_adapter(ckpt, with_optimizer=False).optimizer is None

    fresh = ModelWorker(load_base_model(str(tiny_model_dir), data_dir=tmp_path))
    fresh.import_adapter("b", to_state(loaded))
    ids = input_ids(tiny_base)
    assert torch.equal(worker_logits(worker, "a", ids), worker_logits(fresh, "b", ids))
    # The optimizer moments came back too: the resumed run continues exactly like the original.
    assert train(fresh, "b", 3) == train(worker, "a", 3)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.parametrize(
    ("tied", "train_unembed"),
    [(False, False), (False, True), (True, True)],
    ids=["attn+mlp", "with-lm_head", "tied-lm_head"],
)
def test_peft_loads_the_checkpoint(
    tied: bool,
    train_unembed: bool,
    tiny_model_dir: Path,
    tiny_tied_model_dir: Path,
    tmp_path: Path,
) -> None:
    model_dir = tiny_tied_model_dir if tied else tiny_model_dir
    base = load_base_model(str(model_dir), data_dir=tmp_path)
    assert base.model.config.tie_word_embeddings is tied
    worker = ModelWorker(base)
    worker.add_adapter("a", LoraConfig(rank=4, alpha=16.0, seed=3, train_unembed=train_unembed))
    randomize_b(worker, "a")
    train(worker, "a", 2)
    state = worker.export_adapter("a", with_optimizer=False)
    assert ("lm_head" in state.target_modules) is train_unembed
    ckpt = tmp_path / "ckpt"
    save_adapter(ckpt, to_saved(state, str(model_dir)))

    ids = input_ids(base)
    ours = worker_logits(worker, "a", ids)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = plain(ids).logits
    peft_model = peft.PeftModel.from_pretrained(plain, ckpt).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # PEFT put LoRA exactly where we did, and only there.
    lora_paths = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in peft_model.named_modules()
        if n.endswith(".lora_A")
    }
    assert lora_paths == {k.removesuffix(".lora_A.weight") for k in state.weights if "lora_A" in k}
    if tied:  # the base weights are still shared, so nothing about the base model changed
        inner = peft_model.get_base_model()
        assert inner.get_output_embeddings().weight is inner.get_input_embeddings().weight


def test_loads_a_plain_peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An adapter written by PEFT itself (e.g. an upload) loads and gives PEFT's outputs."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[*targets, "lm_head"])
    config.init_lora_weights = False  # random A and B, so outputs differ from the base model
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(plain, config).eval()
    peft_model.save_pretrained(tmp_path / "external")

    saved = load_adapter(tmp_path / "external")
    info = saved.info
    assert (info.rank, info.alpha, info.has_optimizer) == (4, 8.0, False)
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (True, True, True)
    base = load_base_model(str(tiny_model_dir), data_dir=tmp_path)
    worker = ModelWorker(base)
    worker.import_adapter("ext", to_state(saved))
    ids = input_ids(base)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(worker_logits(worker, "ext", ids), theirs, atol=1e-5, rtol=1e-5)


def test_file_layout(tmp_path: Path) -> None:
    saved = tiny_saved()
    saved.metadata = {"step": 3}
    save_adapter(tmp_path / "c", saved)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    expected = ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"]
    assert names == sorted([*expected, "tinkerd.json"])
    keys = set(load_file(tmp_path / "c" / "adapter_model.safetensors"))
    assert keys == {"base_model.model." + k for k in saved.weights}
    info = read_adapter_info(tmp_path / "c")
    assert info == AdapterInfo(
        rank=2, alpha=4.0, target_modules=("q_proj",), base_model="tiny", has_optimizer=True
    )
    assert load_adapter(tmp_path / "c").metadata == {"step": 3}
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "c"))
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.task_type) == (2, 4, "CAUSAL_LM")


def test_incomplete_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_adapter(tmp_path / "missing")
    for victim in ["adapter_config.json", "adapter_model.safetensors"]:
        target = tmp_path / victim
        save_adapter(target, tiny_saved())
        (target / victim).unlink()
        assert not checkpoint_exists(target)
        with pytest.raises(FileNotFoundError, match=f"missing {victim}"):
            load_adapter(target)
    target = tmp_path / "no-optimizer"
    save_adapter(target, tiny_saved())
    (target / "optimizer.safetensors").unlink()
    assert load_adapter(target, with_optimizer=False).optimizer is None
    with pytest.raises(FileNotFoundError, match=r"optimizer\.safetensors"):
        load_adapter(target)


def test_unsupported_peft_options_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "c"
    save_adapter(target, tiny_saved())
    config_path = target / "adapter_config.json"
    original = config_path.read_text()
    for option in ['"use_dora": true', '"use_rslora": true', '"peft_type": "IA3"']:
        key = option.split(":")[0]
        patched = "\n".join(
            f"  {option}," if line.strip().startswith(key) else line
            for line in original.splitlines()
        )
        config_path.write_text(patched)
        with pytest.raises(ValueError):
            load_adapter(target)


# --- overwrite, delete, atomicity ---------------------------------------------------------------


def test_overwrite_semantics(tmp_path: Path) -> None:
    target = tmp_path / "run" / "weights" / "c"
    first, second = tiny_saved(0), tiny_saved(1)
    save_adapter(target, first)
    with pytest.raises(FileExistsError):
        save_adapter(target, second)
    assert_tensors_equal(load_adapter(target).weights, first.weights)
    save_adapter(target, tiny_saved(1, optimizer=False), overwrite=True)
    reloaded = load_adapter(target)
    assert_tensors_equal(reloaded.weights, second.weights)
    assert reloaded.optimizer is None  # no stale optimizer file from the first save
    assert sorted(os.listdir(target.parent)) == ["c"]  # no leftovers
    assert delete_checkpoint(target)
    assert not target.exists()
    assert os.listdir(target.parent) == []
    assert not delete_checkpoint(target)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = peft_format.save_file

    def save_then_fail(tensors: dict[str, torch.Tensor], filename: str, **kw: object) -> None:
        real_save(tensors, filename, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "save_file", save_then_fail)
    target = tmp_path / "c"
    with pytest.raises(OSError, match="disk full"):
        save_adapter(target, tiny_saved())
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        load_adapter(target)


def test_failed_overwrite_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "c"
    old = tiny_saved(0)
    save_adapter(target, old)

    def fail(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr("tinkerd.checkpoints.atomic.os.rename", fail)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(target, tiny_saved(1), overwrite=True)
    assert os.listdir(tmp_path) == ["c"]
    assert_tensors_equal(load_adapter(target).weights, old.weights)


CRASH_SCRIPT = """
import os, sys
import torch
from tinkerd.checkpoints import atomic, peft_format

target, seed, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = peft_format.AdapterInfo(rank=2, alpha=4.0, target_modules=("q_proj",), base_model="tiny")
name = "model.layers.0.self_attn.q_proj"
weights = {f"{name}.lora_A.weight": torch.full((2, 8), float(seed)),
           f"{name}.lora_B.weight": torch.zeros(8, 2)}
if when == "mid-write":
    real = peft_format.save_file
    def save_then_die(tensors, filename, **kw):
        real(tensors, filename, **kw)
        os._exit(17)  # a hard crash: no exception handlers, no cleanup
    peft_format.save_file = save_then_die
else:  # between moving the old checkpoint aside and renaming the new one in
    atomic.os.rename = lambda src, dst: os._exit(17)
peft_format.save_adapter(target, peft_format.SavedAdapter(info, weights), overwrite=True)
"""


def crash_during_save(target: Path, seed: int, when: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_SCRIPT), str(target), str(seed), when],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 17, result.stderr


def test_crash_mid_write_leaves_no_loadable_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "run" / "weights" / "c"
    crash_during_save(target, 0, "mid-write")
    assert not target.exists()
    leftovers = os.listdir(target.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(".c.tmp-")
    with pytest.raises(FileNotFoundError):
        load_adapter(target)
    # A hidden leftover is not a valid checkpoint name, so it can't be addressed by a path.
    with pytest.raises(ValueError):
        TinkerPath("run", "weights", leftovers[0])
    assert len(cleanup_leftovers(tmp_path)) == 1
    assert os.listdir(target.parent) == []
    save_adapter(target, tiny_saved(0))  # the name is free again
    assert checkpoint_exists(target)


def test_crash_mid_overwrite_recovers_the_old_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "run" / "weights" / "c"
    old = tiny_saved(0)
    save_adapter(target, old)
    crash_during_save(target, 1, "mid-overwrite")
    # The old one was moved aside and the new one not yet renamed in: nothing at the name...
    assert not checkpoint_exists(target)
    assert len(os.listdir(target.parent)) == 2
    # ...until the startup cleanup puts the old one back and drops the unfinished new one.
    assert len(cleanup_leftovers(tmp_path)) == 2
    assert os.listdir(target.parent) == ["c"]
    assert_tensors_equal(load_adapter(target).weights, old.weights)
