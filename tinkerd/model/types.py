"""Plain data types the model layer takes and returns (no HTTP, no protobuf)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # sampling.py imports this module
    from tinkerd.model.sampling import Choice


@dataclass(frozen=True)
class ProvenanceSpan:
    """A run of `length` datum positions that claims to be positions [offset, offset + length)
    of a recorded sequence's prompt (`sampled=False`) or sampled tokens (`sampled=True`)."""

    sequence_id: str
    offset: int
    length: int
    sampled: bool


@dataclass
class ImageInput:
    """An image inside a model input: it fills `num_tokens` positions of the token list from
    `position` on (placeholders there; the model splices in its vision embeddings).

    `data`/`format`: the bytes as sent (png or jpeg). `pixel_values` (patches, features) and
    `grid_thw` (3,) are the model's image processor's output, set by `tinkerd.model.vision`
    (`grid_thw` is None for Gemma 3, whose images are always one fixed grid). `where` names
    the chunk for error messages (`data[0].model_input[1]`).
    """

    position: int
    num_tokens: int
    data: bytes
    format: str
    where: str = "image"
    pixel_values: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None


@dataclass
class Datum:
    """One training sequence: `tokens` (model_input) and per-token `loss_fn_inputs`.

    Row i of every input lines up with token i, which predicts the next token:
    `target_tokens[i]` is the token after `tokens[i]`. Inputs are (N,) or (N, K) tensors.
    Provenance (`Datum.with_provenance` of the SDK), when given, tiles `tokens`
    (`model_input_spans`) and `target_tokens` (`loss_fn_input_spans`).
    """

    tokens: list[int]
    loss_fn_inputs: dict[str, torch.Tensor]
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None
    # Image chunks, by position (their positions in `tokens` hold placeholders).
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class ForwardBackwardInput:
    """One request's data for one adapter (None: the base model, forward only)."""

    adapter_id: str | None
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False
    # loss_fn "custom": the caller's uploaded loss, rebuilt by the server (same signature as
    # the built-in losses of tinkerd.model.losses).
    custom_loss: Callable[..., Any] | None = None


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
    # Top-K (id, logprob) of the distribution each sampled token was drawn from.
    topk_sample_logprobs: int = 0
    # int64 (len(prompt) - 1, K): row i names ids to score at prompt position i + 1; -1 = none.
    target_prompt_logprobs: torch.Tensor | None = None
    # K draws at the request's temperature at every prompt position after the first.
    prompt_alt_tokens_k: int = 0
    # Score only the last N prompt positions (prompt_logprobs and topk_prompt_logprobs).
    prompt_logprobs_last_n: int | None = None
    # record_stability_info: also report each sampled token's logprob under the distribution
    # it was drawn from and under the untruncated temperature-1 one (SampledSequence).
    record_stability: bool = False
    # Per-token hook (token streaming): called on the scheduler thread as `on_token(sample
    # index, choice)` right after each token of each of this request's samples is drawn, in
    # order (`choice`: the token, its logprob, top-K; read it, do not keep or change its
    # lists). It must be quick and must not block; an exception it raises is logged and the
    # hook is dropped for the rest of the batch, which goes on for every request. Not on the
    # wire: only in-process callers (the OpenAI/Anthropic streams) set it. A batch that fails
    # and is retried sample by sample calls it again from the first token.
    on_token: "Callable[[int, Choice], None] | None" = None
    # Image chunks of the prompt, by position (as `Datum.images`).
    prompt_images: list[ImageInput] = field(default_factory=list)


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    # Per token: top-K (id, logprob), sorted descending (when topk_sample_logprobs > 0).
    topk_logprobs: list[list[tuple[int, float]]] | None = None
    # record_stability only. `behaviour_logprobs`: under the distribution the token was
    # actually drawn from (temperature, top-k and top-p applied and renormalized; 0.0 for a
    # greedy pick, which is certain). `base_logprobs`: under softmax(logits), temperature 1.
    behaviour_logprobs: list[float] | None = None
    base_logprobs: list[float] | None = None


@dataclass
class SampleOutput:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    # float32 (len(prompt) - 1, K), the request's target shape; 0.0 where the id was -1.
    target_prompt_logprobs: torch.Tensor | None = None
    # (len(prompt) - 1, K) int64 draws and their float32 logprobs.
    prompt_alt_tokens: torch.Tensor | None = None
    prompt_alt_logprobs: torch.Tensor | None = None
    # Optim steps of the training run behind the sampled adapter when it was frozen (None:
    # base model, or a checkpoint whose step is unknown).
    weights_step: int | None = None
