"""Exports of a checkpoint for other runtimes: a merged Hugging Face model, or plain PEFT files.

`export_merged` writes the base model with the adapter folded into its weights, as
`save_pretrained` writes it (config, safetensors weights, generation config, tokenizer and, for
VL models, the processor files), loadable by `AutoModelForCausalLM.from_pretrained` (VL models:
their image-text-to-text class) with the logits tinkerd computes for base + adapter:

* the base model is loaded on CPU in float32, each LoRA pair's delta `scaling * B @ A` is added
  to its weight in float32, and the result is cast back to the base model's dtype;
* MoE experts (PEFT `target_parameters`, tensors under `.base_layer` wrappers) are merged into
  the 3-D expert parameters per expert, in the module's layout ([E, out, in], or [E, in, out]
  when it `is_transposed`, as gpt-oss);
* an `lm_head` LoRA on a model with tied input/output embeddings (SmolLM2, small Qwen3) unties
  them: the merged lm_head gets its own weight, the embedding stays the base one, and the
  config says `tie_word_embeddings: false` (`MergeReport.untied`, and the export's note);
* modules without LoRA (vision towers, routers, norms, expert biases) are written unchanged.

`export_peft` copies a checkpoint's PEFT files (what `save_weights_external` downloads already
are) with a note on which runtimes accept them; `drop_lm_head` removes an unembedding LoRA,
which stock vLLM refuses.

Both write through `atomic.atomic_dir`: an export directory is complete or absent.
"""

import json
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinkerd.checkpoints.atomic import atomic_dir
from tinkerd.checkpoints.peft_format import (
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    SavedAdapter,
    load_adapter,
)

# Inside a checkpoint directory: where the REST export caches the merged model (checkpoints are
# never modified, so the merge of one is always the same), so its files are downloadable with
# the checkpoint's signed URLs and go when the checkpoint goes.
MERGED_DIR = "merged"
NOTE_FILE = "TINKERD_EXPORT.md"
REPORT_FILE = "tinkerd_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# One merge at a time per process: each holds a float32 copy of the base model in memory.
MERGE_LOCK = threading.Lock()
_BASE_LAYER = ".base_layer"


@dataclass
class MergeReport:
    """What an export did (also written to the export as `tinkerd_export.json`)."""

    checkpoint: str
    base_model: str
    dtype: str
    merged: list[str] = field(default_factory=list)  # module paths / `<experts>/<param>`
    untied: bool = False  # lm_head untied from the input embedding
    notes: list[str] = field(default_factory=list)


def merge_into(model: nn.Module, adapter: SavedAdapter) -> tuple[list[str], bool]:
    """Add `adapter`'s deltas to `model`'s weights in place (float32 recommended); returns the
    merged targets and whether lm_head had to be untied from the input embedding."""
    scaling = adapter.info.alpha / adapter.info.rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.weights.items():
        path, which, _ = name.rsplit(".", 2)  # "<path>.lora_A.weight"
        pairs.setdefault(path, {})[which] = tensor
    merged: list[str] = []
    untied = False
    output = model.get_output_embeddings()
    for path in sorted(pairs):
        a, b = pairs[path].get("lora_A"), pairs[path].get("lora_B")
        if a is None or b is None:
            raise ValueError(f"LoRA pair for {path!r} is incomplete")
        a, b = a.to(torch.float32), b.to(torch.float32)
        module, param = _target(model, path)
        if param is None:  # a Linear
            weight = module.weight
            delta = scaling * (b @ a)
            if tuple(delta.shape) != tuple(weight.shape):
                raise ValueError(f"{path}: delta {tuple(delta.shape)} != {tuple(weight.shape)}")
            if module is output and _is_tied(model, weight):
                module.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                untied = True
            with torch.no_grad():
                module.weight.add_(delta.to(module.weight.dtype))
            merged.append(path)
            continue
        weight = getattr(module, param)
        n_experts = weight.shape[0]
        rank = a.shape[0] // n_experts
        a3 = a.view(n_experts, rank, a.shape[-1])  # expert e: rows e*r .. e*r+r
        b3 = b.view(b.shape[0], rank, n_experts).permute(2, 0, 1)  # expert e: cols e, E+e, ..
        delta = scaling * torch.bmm(b3, a3)  # [E, out, in]
        if getattr(module, "is_transposed", False):
            delta = delta.transpose(1, 2)  # gpt-oss: [E, in, out]
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"{path}: delta {tuple(delta.shape)} != {tuple(weight.shape)}")
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))
        merged.append(f"{path.removesuffix(_BASE_LAYER * path.count(_BASE_LAYER))}/{param}")
    if untied:
        _set_untied(model)
    return merged, untied


def _target(model: nn.Module, path: str) -> tuple[nn.Module, str | None]:
    """The module a LoRA tensor path adapts and, for MoE experts, the 3-D parameter's name
    (PEFT nests one `.base_layer` per parameter registered after the targeted one)."""
    from tinkerd.model.moe_lora import expert_param_names

    depth = 0
    while path.endswith(_BASE_LAYER):
        path, depth = path.removesuffix(_BASE_LAYER), depth + 1
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"the base model has no module {path!r} (another base model?)") from exc
    names = expert_param_names(module)
    if names:
        if depth >= len(names):
            raise ValueError(f"{path}: {depth} base_layer wrappers for {len(names)} parameters")
        return module, names[len(names) - 1 - depth]
    if depth or not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise ValueError(f"{path!r} is neither a Linear nor a fused experts module")
    return module, None


def _is_tied(model: nn.Module, weight: torch.Tensor) -> bool:
    inputs = model.get_input_embeddings()
    other = getattr(inputs, "weight", None) if inputs is not None else None
    return other is not None and (other is weight or other.data_ptr() == weight.data_ptr())


def _set_untied(model: nn.Module) -> None:
    configs = [model.config]
    text = getattr(model.config, "get_text_config", lambda: None)()
    if text is not None and text is not model.config:
        configs.append(text)
    for config in configs:
        config.tie_word_embeddings = False


def _base_dtype(config: object) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def export_merged(
    checkpoint_dir: Path,
    base_source: str,
    out_dir: Path,
    *,
    checkpoint: str = "",
    dtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Write `base_source` (a model dir or hub name) with the adapter at `checkpoint_dir`
    merged into `out_dir` (atomically). `dtype`: of the written weights (default: the base's)."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from tinkerd.model.loading import model_class

    adapter = load_adapter(Path(checkpoint_dir), with_optimizer=False)
    remote = {"trust_remote_code": trust_remote_code}
    with MERGE_LOCK:
        if Path(out_dir).exists() and not overwrite:  # before the slow part
            raise FileExistsError(f"export already exists: {out_dir}")
        config = AutoConfig.from_pretrained(base_source, **remote)
        target_dtype = DTYPES[dtype] if dtype else _base_dtype(config)
        cls = model_class(config)
        model = cls.from_pretrained(base_source, dtype=torch.float32, **remote)
        model.eval()
        merged, untied = merge_into(model, adapter)
        model.to(target_dtype)
        model.config.dtype = target_dtype
        report = MergeReport(
            checkpoint=checkpoint or str(checkpoint_dir),
            base_model=adapter.info.base_model or base_source,
            dtype=str(target_dtype).removeprefix("torch."),
            merged=merged,
            untied=untied,
        )
        if untied:
            report.notes.append(
                "the base model ties lm_head to the input embedding; the adapter changes "
                "lm_head, so the export unties them (separate lm_head weight, "
                "tie_word_embeddings=false)"
            )
        shipped = list(getattr(config, "architectures", None) or [])
        if shipped and type(model).__name__ not in shipped:
            report.notes.append(
                f"the base checkpoint is {shipped[0]}; tinkerd serves it as "
                f"{type(model).__name__}, and the export is that class (parts it does not load, "
                "such as a vision tower, are not included)"
            )
        with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base_source, **remote).save_pretrained(tmp)
            if cls.__name__ != "AutoModelForCausalLM":  # VL: image processor etc. too
                try:
                    AutoProcessor.from_pretrained(base_source, **remote).save_pretrained(tmp)
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    report.notes.append(f"processor files not written: {exc}")
            _write_report(tmp, report, _merged_note(report))
        del model
    return report


def export_peft(
    checkpoint_dir: Path,
    out_dir: Path,
    *,
    checkpoint: str = "",
    drop_lm_head: bool = False,
    overwrite: bool = False,
) -> MergeReport:
    """Copy a checkpoint's PEFT files (adapter_config.json, adapter_model.safetensors) into
    `out_dir`, with a note; `drop_lm_head` removes the unembedding LoRA (stock vLLM refuses
    one), which changes the adapter's outputs."""
    checkpoint_dir = Path(checkpoint_dir)
    adapter = load_adapter(checkpoint_dir, with_optimizer=False)  # checks the files
    config = json.loads((checkpoint_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    report = MergeReport(
        checkpoint=checkpoint or str(checkpoint_dir),
        base_model=adapter.info.base_model,
        dtype=str(next(iter(adapter.weights.values())).dtype).removeprefix("torch."),
    )
    unembed = sorted({k.rsplit(".", 2)[0] for k in adapter.weights} & {"lm_head"})
    experts = bool(config.get("target_parameters"))
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        if unembed and drop_lm_head:
            tensors = load_file(str(checkpoint_dir / WEIGHTS_FILE))
            kept = {
                k: v
                for k, v in tensors.items()
                if not k.removeprefix(PEFT_PREFIX).startswith("lm_head.")
            }
            save_file(kept, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            config["target_modules"] = [t for t in config["target_modules"] if t != "lm_head"]
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            report.notes.append(
                "lm_head LoRA dropped (--drop-lm-head): outputs differ from tinkerd's"
            )
        else:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(checkpoint_dir / name, tmp / name)
            if unembed:
                report.notes.append(
                    "the adapter has an lm_head LoRA (train_unembed=True): PEFT and "
                    "transformers load it; stock vLLM refuses it (lm_head is not a LoRA target "
                    "there): export with --drop-lm-head (outputs change), or serve the merged "
                    "model (`tinkerd export merged`), or train with train_unembed=False"
                )
        report.merged = sorted({k.rsplit(".", 2)[0] for k in adapter.weights})
        if experts:
            report.notes.append(
                "MoE experts are PEFT target_parameters (PEFT >= 0.17 loads them); check that "
                "your vLLM/SGLang version loads expert LoRA, else use the merged export"
            )
        _write_report(tmp, report, _peft_note(report))
    return report


def _write_report(directory: Path, report: MergeReport, note: str) -> None:
    data: dict[str, Any] = asdict(report)
    (directory / REPORT_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (directory / NOTE_FILE).write_text(note, encoding="utf-8")


def _merged_note(report: MergeReport) -> str:
    lines = [
        "# Merged model exported by tinkerd",
        "",
        f"Checkpoint `{report.checkpoint}` merged into base model `{report.base_model}`",
        f"(merged in float32 on CPU, written as {report.dtype}; {len(report.merged)} targets).",
        "Load it with `transformers.AutoModelForCausalLM.from_pretrained(this_dir)`, or serve",
        "it with vLLM/SGLang as a plain model. For llama.cpp, convert it with llama.cpp's",
        "`convert_hf_to_gguf.py this_dir`.",
    ]
    return "\n".join([*lines, *_notes(report)]) + "\n"


def _peft_note(report: MergeReport) -> str:
    lines = [
        "# LoRA adapter exported by tinkerd (PEFT format)",
        "",
        f"Checkpoint `{report.checkpoint}`, base model `{report.base_model}`.",
        "Load with `peft.PeftModel.from_pretrained(base, this_dir)`, or serve with",
        "`vllm serve BASE --enable-lora --lora-modules name=this_dir` (vLLM) or",
        "`--lora-paths name=this_dir` (SGLang). Tensor names are PEFT's",
        "(`base_model.model.<module>.lora_A.weight`).",
    ]
    return "\n".join([*lines, *_notes(report)]) + "\n"


def _notes(report: MergeReport) -> list[str]:
    return ["", "Notes:", *(f"- {n}" for n in report.notes)] if report.notes else []


def is_merged_export(directory: Path) -> bool:
    """True if `directory` holds a complete merged export (written last: the report)."""
    return (Path(directory) / REPORT_FILE).is_file() and (Path(directory) / "config.json").is_file()
