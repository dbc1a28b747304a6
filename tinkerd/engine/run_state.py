"""Durable run state: each training run's adapter and optimizer moments as of a known seq_id.

The scheduler writes it after a run is created or loaded, every `state_every` optim steps,
and before an idle run leaves memory. A run whose adapter is not in memory (released, or the
server restarted) is loaded back from it on its next use. After a crash, the api layer replays
the run's logged requests with larger seq_ids on top of it, so at most `state_every` optim
steps are ever recomputed. Directories are written atomically (checkpoints/atomic.py) in the
same PEFT layout as checkpoints, with the seq_id in tinkerd.json's metadata.
"""

import json
from pathlib import Path

from tinkerd.checkpoints.atomic import remove_dir
from tinkerd.checkpoints.peft_format import TINKERD_FILE, load_adapter, save_adapter
from tinkerd.engine.adapter_files import to_saved, to_state
from tinkerd.model.worker import AdapterState


class RunStates:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, model_id: str) -> Path:
        if "/" in model_id or model_id.startswith("."):
            raise ValueError(f"not a run id: {model_id!r}")
        return self.root / model_id

    def write(self, model_id: str, state: AdapterState, base_model: str, seq_id: int) -> None:
        """Replace the run's state with `state`, which includes every op up to `seq_id`."""
        saved = to_saved(state, base_model)
        saved.metadata = {"seq_id": seq_id}
        save_adapter(self.path(model_id), saved, overwrite=True)

    def seq_id(self, model_id: str) -> int | None:
        """The seq_id the stored state includes, or None if the run has no state."""
        own = self.path(model_id) / TINKERD_FILE
        if not own.exists():
            return None
        return int(json.loads(own.read_text())["metadata"]["seq_id"])

    def read(self, model_id: str) -> AdapterState | None:
        if self.seq_id(model_id) is None:
            return None
        return to_state(load_adapter(self.path(model_id), with_optimizer=True))

    def delete(self, model_id: str) -> None:
        remove_dir(self.path(model_id))
