"""The worker interface the scheduler drives, wherever the worker lives.

`ModelScheduler` calls only these operations. `LocalWorker` (engine/local_worker.py) runs them
in-process on a `ModelWorker`; `RayWorker` (engine/ray_worker.py) runs them in a Ray actor and
`GangWorker` (engine/gang.py) on a group of SPMD processes. Everything crossing this interface is
plain data. Checkpoint and run-state files are read and written by the worker itself, so
adapters and optimizer moments never cross a process link: the scheduler passes directory paths
(a filesystem every replica can reach). A worker that is gone (its process or machine died)
raises `ReplicaLost` from any call; the scheduler then moves its runs elsewhere.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams, OptimStepResult
from tinkerd.model.types import (
    ForwardBackwardInput,
    ForwardBackwardOutput,
    ImageInput,
    SampleInput,
    SampleOutput,
)
from tinkerd.model.vision import VisionSupport, check_input


class ReplicaLost(Exception):
    """The worker's process (or machine) is gone; whether the call ran is unknown. Never a
    user's or a request's fault: the scheduler re-places the runs and replays their requests."""


@dataclass
class ModelFront:
    """What the api layer needs about a served model, without its weights: its description,
    tokenizer and image support (validation and decoding happen before an op is queued)."""

    info: BaseModelInfo
    tokenizer: Any
    vision: VisionSupport | None
    source: str  # the model's directory or hub name (exports name it as the PEFT base)

    def check_images(self, tokens: list[int], images: list[ImageInput], what: str) -> None:
        """Raise ImageError (a ValueError) for images this model cannot take."""
        check_input(tokens, images, self.vision, self.info.name, what)


@runtime_checkable
class WorkerHandle(Protocol):
    """One replica of a base model. Not thread-safe: one scheduler thread calls it."""

    @property
    def info(self) -> BaseModelInfo: ...

    def front(self) -> ModelFront: ...

    def add_adapter(self, adapter_id: str, config: LoraConfig) -> None: ...

    def remove_adapter(self, adapter_id: str) -> None: ...

    def has_adapter(self, adapter_id: str) -> bool: ...

    def snapshot_adapter(self, source_id: str, snapshot_id: str) -> None: ...

    def forward_backward(
        self, inputs: list[ForwardBackwardInput]
    ) -> list[ForwardBackwardOutput]: ...

    def optim_step(self, adapter_id: str, params: AdamParams) -> OptimStepResult: ...

    def sample(self, inputs: list[SampleInput]) -> list[SampleOutput]: ...

    def has_pending_grads(self, adapter_id: str) -> bool: ...

    def adapter_bytes(self, adapter_id: str) -> int: ...

    def save_adapter(
        self,
        adapter_id: str,
        directory: Path,
        base_model: str,
        *,
        with_optimizer: bool,
        overwrite: bool = False,
    ) -> int:
        """Write the adapter in PEFT format to `directory`; returns the bytes written."""
        ...

    def load_adapter(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> None:
        """Create (or replace) a trainable adapter from a checkpoint directory."""
        ...

    def load_snapshot(self, snapshot_id: str, directory: Path) -> None:
        """Load a saved checkpoint as a frozen, sample-only adapter."""
        ...

    def write_state(
        self, model_id: str, root: Path, base_model: str, seq_id: int, *, wait: bool = True
    ) -> None:
        """Write the run's state (adapter + optimizer, as of `seq_id`) under `root`
        (engine/run_state.py). With wait=False the tensors are copied now and written in the
        background, in order; a failure is logged (replay covers it)."""
        ...

    def read_state(self, model_id: str, root: Path) -> bool:
        """Load the run's stored state from `root` if there is one; False if there is none."""
        ...

    def close(self) -> None:
        """Finish background writes and free the worker."""
        ...
