"""The in-process worker: a `ModelWorker` plus the file I/O of checkpoints and run states.

The default server path: no Ray, no copies. A Ray actor holds one of these too
(engine/ray_worker.py), so the same code writes a run's files wherever its replica lives.
"""

import logging
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tinkerd.engine.adapter_files import read_adapter, write_adapter
from tinkerd.engine.run_state import RunStates
from tinkerd.engine.worker_handle import ModelFront
from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams, OptimStepResult
from tinkerd.model.sample_engine import Deltas
from tinkerd.model.types import (
    ForwardBackwardInput,
    ForwardBackwardOutput,
    SampleInput,
    SampleOutput,
)
from tinkerd.model.worker import ModelWorker

log = logging.getLogger(__name__)


class LocalWorker:
    """Implements `WorkerHandle` on a `ModelWorker` in this process."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker
        # State files are written off the caller's thread, in order (one writer).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-state")
        self._run_states: dict[Path, RunStates] = {}

    @property
    def info(self) -> BaseModelInfo:
        return self.worker.info

    def front(self) -> ModelFront:
        base = self.worker.base
        source = getattr(base.model, "name_or_path", "") or base.info.name
        return ModelFront(base.info, base.tokenizer, self.worker.vision, source)

    def add_adapter(self, adapter_id: str, config: LoraConfig) -> None:
        self.worker.add_adapter(adapter_id, config)

    def remove_adapter(self, adapter_id: str) -> None:
        self.worker.remove_adapter(adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return self.worker.has_adapter(adapter_id)

    def snapshot_adapter(self, source_id: str, snapshot_id: str) -> None:
        self.worker.snapshot_adapter(source_id, snapshot_id)

    def forward_backward(self, inputs: list[ForwardBackwardInput]) -> list[ForwardBackwardOutput]:
        return self.worker.forward_backward(inputs)

    def optim_step(self, adapter_id: str, params: AdamParams) -> OptimStepResult:
        return self.worker.optim_step(adapter_id, params)

    def sample(self, inputs: list[SampleInput]) -> list[SampleOutput]:
        return self.worker.sample(inputs)

    # Continuous batching (model/sample_engine.py): the scheduler admits requests to the
    # running decode batch and decodes in time slices; see ModelWorker for the semantics.

    def sample_admit(self, keys: list[Hashable], inputs: list[SampleInput]) -> None:
        self.worker.sample_admit(keys, inputs)

    def sample_step(self, max_seconds: float | None) -> tuple[dict[Hashable, SampleOutput], Deltas]:
        return self.worker.sample_step(max_seconds)

    def sample_active(self) -> int:
        return self.worker.sample_active()

    def sample_cancel(self, keys: list[Hashable]) -> None:
        self.worker.sample_cancel(keys)

    def sample_abort(self) -> list[Hashable]:
        return self.worker.sample_abort()

    def prefix_cache_stats(self) -> tuple[int, int]:
        return self.worker.prefix_cache_stats()

    def has_pending_grads(self, adapter_id: str) -> bool:
        return self.worker.has_pending_grads(adapter_id)

    def adapter_bytes(self, adapter_id: str) -> int:
        return self.worker.adapter_bytes(adapter_id)

    def save_adapter(
        self,
        adapter_id: str,
        directory: Path,
        base_model: str,
        *,
        with_optimizer: bool,
        overwrite: bool = False,
    ) -> int:
        state = self.worker.export_adapter(adapter_id, with_optimizer=with_optimizer)
        return write_adapter(Path(directory), state, base_model, overwrite=overwrite)

    def load_adapter(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> None:
        state = read_adapter(Path(directory), with_optimizer=with_optimizer)
        self.worker.import_adapter(adapter_id, state)

    def load_snapshot(self, snapshot_id: str, directory: Path) -> None:
        self.worker.import_snapshot(
            snapshot_id, read_adapter(Path(directory), with_optimizer=False)
        )

    def write_state(
        self, model_id: str, root: Path, base_model: str, seq_id: int, *, wait: bool = True
    ) -> None:
        state = self.worker.export_adapter(model_id, with_optimizer=True)  # copied now
        run_states = self._states(root)

        def write() -> None:
            try:
                run_states.write(model_id, state, base_model, seq_id)
            except Exception:
                log.exception("run %s: writing its state failed (replay covers it)", model_id)
                raise

        written: Future[None] = self._writer.submit(write)
        if wait:
            written.result()

    def read_state(self, model_id: str, root: Path) -> bool:
        self._writer.submit(lambda: None).result()  # writes queued before this are on disk
        state = self._states(root).read(model_id)
        if state is None:
            return False
        self.worker.import_adapter(model_id, state)
        return True

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _states(self, root: Path) -> RunStates:
        root = Path(root)
        if root not in self._run_states:
            self._run_states[root] = RunStates(root)
        return self._run_states[root]
