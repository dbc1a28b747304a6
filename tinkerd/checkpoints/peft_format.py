"""LoRA adapters on disk in the standard PEFT layout, plus the state tinkerd needs to resume.

A checkpoint directory holds:

* `adapter_config.json` and `adapter_model.safetensors`: what `peft.PeftModel.from_pretrained`
  reads, so a checkpoint works directly with PEFT, vLLM and friends. Tensor names are PEFT's
  saved names, `base_model.model.<module path>.lora_A.weight` (no adapter name). MoE experts'
  fused 3-D weights are PEFT `target_parameters` (e.g. `experts.gate_up_proj`); their tensors
  sit under PEFT's nested wrappers (`...experts.base_layer.lora_A.weight`), shape [r*E, in] /
  [out, r*E]. tinkerd's own short name for such a target is `experts/gate_up_proj`.
* `tinkerd.json`: the Tinker LoRA options (train_attn/mlp/unembed, seed) that PEFT's config
  can't express, so the exact adapter can be rebuilt. Absent in plain PEFT adapters (external
  uploads); then the options are inferred from the tensor names.
* `optimizer.safetensors` (optional): AdamW moments as flat `<param name>.exp_avg` /
  `.exp_avg_sq` / `.step` tensors, for resuming training exactly.

This module deals in files, tensors and plain dicts only; the caller maps to and from the
model layer's types. Writes go through `atomic.atomic_dir`, so a checkpoint is complete or absent.
"""

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tinkerd.checkpoints.atomic import atomic_dir, remove_dir
from tinkerd.constants import EXPERT_TARGET_SEP, NON_TEXT_MODULES, module_kind

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TINKERD_FILE = "tinkerd.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)

PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
FORMAT_VERSION = 1

# Linear names that PEFT (>= 0.18 on transformers 5) rewrites, in `target_modules`, into expert
# `target_parameters` for MoE model types whose experts were fused in transformers 5 (its v4->v5
# adapter conversion: qwen2_moe-like and mixtral models; `gate` is their v4 router). In an adapter
# that targets experts, tinkerd lists such Linears as `target_parameters` `<name>.weight`
# instead (same math and tensor names under PEFT's ParamWrapper), so PEFT keeps the dense and
# shared-expert MLP LoRA instead of dropping it.
PEFT_MOE_RENAMED = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


@dataclass(frozen=True)
class AdapterInfo:
    """Everything about a saved adapter except its tensors (cheap to read: JSON only)."""

    rank: int
    alpha: float
    # Short names, as PEFT's `target_modules`; parameter targets as `experts/gate_up_proj`.
    target_modules: tuple[str, ...]
    base_model: str
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int | None = None
    has_optimizer: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass
class SavedAdapter:
    """An adapter as files hold it: tensors keyed `<module path>.lora_A.weight` etc."""

    info: AdapterInfo
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form, JSON-serialisable


def peft_targets(targets: tuple[str, ...] | list[str]) -> tuple[list[str], list[str] | None]:
    """(target_modules, target_parameters) for PEFT from tinkerd's short target names."""
    params = sorted(t.replace(EXPERT_TARGET_SEP, ".") for t in targets if EXPERT_TARGET_SEP in t)
    linears = [t for t in targets if EXPERT_TARGET_SEP not in t]
    if not params:
        return sorted(linears), None
    params += [f"{t}.weight" for t in linears if t in PEFT_MOE_RENAMED]
    return sorted(t for t in linears if t not in PEFT_MOE_RENAMED), sorted(params)


def tinkerd_targets(config: dict[str, Any]) -> tuple[str, ...]:
    """tinkerd's short target names from a PEFT config's target_modules / target_parameters."""
    targets = list(config.get("target_modules") or [])
    for param in config.get("target_parameters") or []:
        module, _, name = param.rpartition(".")
        if name == "weight" and module and "." not in module:
            targets.append(module)  # a Linear's weight (see PEFT_MOE_RENAMED)
        elif module:
            targets.append(f"{module.rpartition('.')[2]}{EXPERT_TARGET_SEP}{name}")
        else:
            raise ValueError(f"target_parameters entry {param!r} is not supported")
    return tuple(targets)


def peft_config(info: AdapterInfo) -> dict[str, Any]:
    """The adapter_config.json PEFT 0.21 writes for a plain LoRA (unset options at defaults)."""
    alpha: float | int = int(info.alpha) if float(info.alpha).is_integer() else info.alpha
    target_modules, target_parameters = peft_targets(info.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": info.base_model,
        "r": info.rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
        "target_parameters": target_parameters,
        "trainable_token_indices": None,
        # Our lm_head LoRA leaves the (possibly tied) base weight shared and adds nothing to
        # embed_tokens. With True, PEFT 0.21 would also put a LoRA on embed_tokens (absent from
        # the file, so randomly initialised) and the outputs would no longer match.
        "ensure_weight_tying": False,
        "revision": None,
    }


def save_adapter(directory: Path, adapter: SavedAdapter, *, overwrite: bool = False) -> int:
    """Write `adapter` to `directory` atomically; returns the checkpoint's size in bytes.

    Raises FileExistsError if `directory` exists and overwrite is False.
    """
    bad = [k for k in adapter.weights if not k.endswith(LORA_SUFFIXES)]
    if bad:
        raise ValueError(f"weight names must end in .lora_A/B.weight, got e.g. {bad[0]!r}")
    info = replace(adapter.info, has_optimizer=adapter.optimizer is not None)
    with atomic_dir(Path(directory), overwrite=overwrite) as tmp:
        tensors = {PEFT_PREFIX + k: _plain(v) for k, v in adapter.weights.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if adapter.optimizer is not None:
            moments = {k: _plain(v) for k, v in adapter.optimizer.items()}
            save_file(moments, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, _exclude_non_text(peft_config(info), adapter.weights))
        own = {
            "format_version": FORMAT_VERSION,
            "rank": info.rank,
            "alpha": info.alpha,
            "seed": info.seed,
            "train_attn": info.train_attn,
            "train_mlp": info.train_mlp,
            "train_unembed": info.train_unembed,
            "target_modules": sorted(info.target_modules),
            "base_model": info.base_model,
            "has_optimizer": info.has_optimizer,
            "metadata": adapter.metadata,
        }
        # Written last: a directory with tinkerd.json was fully written (belt and braces; the
        # rename already guarantees it).
        _write_json(tmp / TINKERD_FILE, own)
    return checkpoint_size(Path(directory))


def read_adapter_info(directory: Path) -> AdapterInfo:
    """Read a checkpoint's JSON files only (for weights_info and listings)."""
    directory = _check_complete(Path(directory))
    config = _read_json(directory / CONFIG_FILE)
    _check_peft_config(directory, config)
    own_path = directory / TINKERD_FILE
    if own_path.exists():
        own = _read_json(own_path)
        return AdapterInfo(
            rank=int(own["rank"]),
            alpha=float(own["alpha"]),
            target_modules=tuple(own["target_modules"]),
            base_model=str(own["base_model"]),
            train_attn=bool(own["train_attn"]),
            train_mlp=bool(own["train_mlp"]),
            train_unembed=bool(own["train_unembed"]),
            seed=own.get("seed"),
            has_optimizer=bool(own.get("has_optimizer")),
        )
    if isinstance(config["target_modules"], str):
        raise ValueError(f"{directory / CONFIG_FILE}: regex target_modules are not supported")
    try:
        targets = tinkerd_targets(config)
    except ValueError as exc:
        raise ValueError(f"{directory / CONFIG_FILE}: {exc}") from exc
    return AdapterInfo(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=targets,
        base_model=str(config.get("base_model_name_or_path") or ""),
        has_optimizer=(directory / OPTIMIZER_FILE).exists(),
        # Refined from tensor names by load_adapter; a plain PEFT config can't say.
    )


def load_adapter(directory: Path, *, with_optimizer: bool = True) -> SavedAdapter:
    """Load a checkpoint written by `save_adapter` (or a plain PEFT LoRA adapter directory).

    Raises FileNotFoundError for a missing or incomplete directory, ValueError for contents
    tinkerd can't represent.
    """
    directory = Path(directory)
    info = read_adapter_info(directory)
    raw = load_file(str(directory / WEIGHTS_FILE))
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(LORA_SUFFIXES):
            weights[name] = tensor
        elif not name.endswith(".base_layer.weight"):
            # PEFT also saves lm_head's base weight when lm_head is targeted; that's the base
            # model's own weight, so it is ignored. Anything else is a feature we don't have.
            raise ValueError(f"{directory / WEIGHTS_FILE}: unsupported tensor {key!r}")
    if not weights:
        raise ValueError(f"{directory / WEIGHTS_FILE} holds no LoRA tensors")
    metadata: dict[str, Any] = {}
    own_path = directory / TINKERD_FILE
    if own_path.exists():
        metadata = dict(_read_json(own_path).get("metadata") or {})
    else:
        info = _infer_flags(info, weights)
    optimizer = None
    if with_optimizer and info.has_optimizer:
        if not (directory / OPTIMIZER_FILE).is_file():
            raise FileNotFoundError(f"checkpoint at {directory} lacks {OPTIMIZER_FILE}")
        optimizer = load_file(str(directory / OPTIMIZER_FILE))
    return SavedAdapter(info, weights, optimizer, metadata)


def delete_checkpoint(directory: Path) -> bool:
    """Remove a checkpoint directory (atomically invisible first); False if it didn't exist."""
    return remove_dir(Path(directory))


def copy_checkpoint(source: Path, target: Path, *, overwrite: bool = False) -> int:
    """Copy a checkpoint directory atomically; returns the copy's size in bytes.

    Files are hard-linked where the filesystem allows (no bytes duplicated; safe because
    checkpoints are never modified in place: writes and deletes go through renames), and
    copied otherwise.
    """
    source = _check_complete(Path(source))
    with atomic_dir(Path(target), overwrite=overwrite) as tmp:
        for path in sorted(source.rglob("*")):
            dest = tmp / path.relative_to(source)
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)
    return checkpoint_size(Path(target))


def checkpoint_exists(directory: Path) -> bool:
    """True if `directory` holds a complete checkpoint (the files a loader requires)."""
    directory = Path(directory)
    return directory.is_dir() and all((directory / f).is_file() for f in REQUIRED_FILES)


def checkpoint_size(directory: Path) -> int:
    """Total bytes of the files in a checkpoint directory (the API's `size_bytes`)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def _exclude_non_text(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """For a multimodal model (its text stack under `language_model`), keep PEFT's short-name
    `target_modules` off the vision tower and projector, as tinkerd's LoRA is (module_kind):
    Qwen2.5-VL's vision MLP is also called gate/up/down_proj, SigLIP's attention q/k/v_proj."""
    if config.get("exclude_modules") or not any("language_model" in k.split(".") for k in weights):
        return config
    names = "|".join(sorted(NON_TEXT_MODULES))
    return {**config, "exclude_modules": rf"(.*\.)?({names})(\..*)?"}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its memory (safetensors refuses shared storage)."""
    return tensor.detach().to("cpu").contiguous().clone()


def _check_complete(directory: Path) -> Path:
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint at {directory}")
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        missing_list = ", ".join(missing)
        raise FileNotFoundError(f"incomplete checkpoint at {directory}: missing {missing_list}")
    return directory


def _check_peft_config(directory: Path, config: dict[str, Any]) -> None:
    """Refuse PEFT options whose math differs from plain LoRA (tinkerd can't run them)."""
    where = directory / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for option in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"):
        if config.get(option):
            raise ValueError(f"{where}: {option}=true is not supported")
    for option in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(option):
            raise ValueError(f"{where}: {option} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config.get('bias')!r} is not supported")
    if "r" not in config or "lora_alpha" not in config or "target_modules" not in config:
        raise ValueError(f"{where}: needs r, lora_alpha and target_modules")


def _infer_flags(info: AdapterInfo, weights: dict[str, torch.Tensor]) -> AdapterInfo:
    """train_attn/mlp/unembed for an adapter without tinkerd.json, from its module paths."""
    # "<module path>.lora_A.weight" -> the module path the model layer classified.
    kinds = {module_kind(name.rsplit(".", 2)[0]) or "unembed" for name in weights}
    return replace(
        info,
        train_attn="attn" in kinds,
        train_mlp="mlp" in kinds,
        train_unembed="unembed" in kinds,
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
