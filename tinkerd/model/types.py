"""Plain data types the model layer takes and returns (no HTTP, no protobuf)."""

from dataclasses import dataclass, field

import torch


@dataclass
class Datum:
    """One training sequence: `tokens` (model_input) and per-token `loss_fn_inputs`.

    Row i of every input lines up with token i, which predicts the next token:
    `target_tokens[i]` is the token after `tokens[i]`. Inputs are (N,) or (N, K) tensors.
    """

    tokens: list[int]
    loss_fn_inputs: dict[str, torch.Tensor]


@dataclass
class ForwardBackwardInput:
    """One request's data for one adapter (None: the base model, forward only)."""

    adapter_id: str | None
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class ForwardBackwardOutput:
    """Per-datum outputs (`logprobs`, `elementwise_loss`) and metrics (`loss:sum`)."""

    loss_fn_outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class SamplingParams:
    """Tinker's SamplingParams. `stop`: None = EOS; [] = never stop; strings or token ids."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stop: tuple[str, ...] | tuple[int, ...] | None = None
    seed: int | None = None


@dataclass
class SampleInput:
    """One sample request: `num_samples` continuations of `prompt` from one adapter (or none)."""

    adapter_id: str | None
    prompt: list[int]
    params: SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"


@dataclass
class SampleOutput:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
