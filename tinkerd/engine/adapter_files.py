"""The glue between the model layer's AdapterState and the checkpoint layer's files."""

from pathlib import Path

from tinkerd.checkpoints.peft_format import AdapterInfo, SavedAdapter, load_adapter, save_adapter
from tinkerd.model.lora import LoraConfig
from tinkerd.model.worker import AdapterState


def to_saved(state: AdapterState, base_model: str) -> SavedAdapter:
    cfg = state.config
    info = AdapterInfo(
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=tuple(state.target_modules),
        base_model=base_model,
        train_attn=cfg.train_attn,
        train_mlp=cfg.train_mlp,
        train_unembed=cfg.train_unembed,
        seed=cfg.seed,
    )
    return SavedAdapter(info, state.weights, state.optimizer)


def to_state(saved: SavedAdapter) -> AdapterState:
    i = saved.info
    config = LoraConfig(i.rank, i.alpha, i.seed, i.train_attn, i.train_mlp, i.train_unembed)
    return AdapterState(config, list(i.target_modules), saved.weights, saved.optimizer)


def write_adapter(
    directory: Path, state: AdapterState, base_model: str, *, overwrite: bool = False
) -> int:
    """Save in PEFT format (optimizer state beside it when present); returns bytes written."""
    return save_adapter(directory, to_saved(state, base_model), overwrite=overwrite)


def read_adapter(directory: Path, *, with_optimizer: bool) -> AdapterState:
    return to_state(load_adapter(directory, with_optimizer=with_optimizer))
