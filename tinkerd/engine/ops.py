"""Operations the engine executes for acknowledged requests, and how it reports back.

An `Op` wraps one request (one future). Training ops of a run carry its `seq_id` and run in
that order; sample ops are independent. The engine calls `on_done(result)` or
`on_error(exc)` exactly once, from its worker thread; the api layer turns that into a stored
future result.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.model.lora import LoraConfig
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.types import ForwardBackwardInput, SampleInput


class UserError(ValueError):
    """The request is wrong (reported with category "user"), not the server."""


@dataclass(frozen=True)
class CreateAdapter:
    config: LoraConfig


@dataclass(frozen=True)
class ForwardBackward:
    input: ForwardBackwardInput

    def tokens(self) -> int:
        return sum(len(d.tokens) for d in self.input.data)


@dataclass(frozen=True)
class OptimStep:
    params: AdamParams


@dataclass(frozen=True)
class SaveAdapter:
    """Write the run's adapter to `directory` (PEFT format); result: size in bytes."""

    directory: Path
    with_optimizer: bool
    base_model: str
    overwrite: bool = False


@dataclass(frozen=True)
class SnapshotAdapter:
    """Freeze the run's current weights in memory as sampler `snapshot_id`."""

    snapshot_id: str


@dataclass(frozen=True)
class LoadAdapter:
    """Create the op's run (or replace its weights) from a checkpoint directory."""

    directory: Path
    with_optimizer: bool


@dataclass(frozen=True)
class Sample:
    """Sample `input`; if its adapter is a saved snapshot not yet in memory, load it from
    `snapshot_dir` first."""

    input: SampleInput
    snapshot_dir: Path | None = None


Action = CreateAdapter | ForwardBackward | OptimStep | SaveAdapter | SnapshotAdapter | LoadAdapter


@dataclass
class Op:
    request_id: str
    action: Action | Sample
    on_done: Callable[[object], None]
    on_error: Callable[[Exception], None]
    model_id: str | None = None
    seq_id: int | None = None
    finished: bool = field(default=False, compare=False)

    def done(self, result: object) -> None:
        if not self.finished:
            self.finished = True
            self.on_done(result)

    def fail(self, exc: Exception) -> None:
        if not self.finished:
            self.finished = True
            self.on_error(exc)
