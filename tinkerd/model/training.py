"""One forward (and backward) pass over rows of many adapters and many loss functions.

All rows of all inputs go into one padded batch, sorted by adapter so LoRA segments are
contiguous. Right padding needs no attention mask under a causal model: real tokens never
attend to the pad positions after them. Logits are computed only at real positions (hidden
states are packed first), so padding costs body compute but no unembedding or softmax.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinkerd.model import vision
from tinkerd.model.lora import MultiLoraModel, segments_for
from tinkerd.model.losses import (
    LossFn,
    LossInputError,
    clip_bounds,
    get_loss,
    stable_reinforce_config,
)
from tinkerd.model.metrics import reduce_metrics
from tinkerd.model.types import Datum, ForwardBackwardInput, ForwardBackwardOutput

# Rows of logits per block in TargetLogprobs: 16 x 49k float32 = 3 MB, about an L2/L3 slice.
BLOCK_ROWS = 16

# Inputs with one value per target token: their shape must equal target_tokens'.
PER_TARGET_INPUTS = ("weights", "logprobs", "advantages", "sequence_ratio_mask")


@dataclass
class _Row:
    item: int  # index into the inputs
    datum: int  # index into that input's data
    adapter_id: str | None
    datum_ref: Datum


def validate_input(item: ForwardBackwardInput, vocab_size: int, context_length: int) -> None:
    """Raise LossInputError naming the field and problem; called before batching so one bad
    request never fails the others."""
    # loss_fn "custom": the uploaded loss declares its inputs (tinkerd.model.custom_loss).
    custom: Any = item.custom_loss
    required = custom.required if custom is not None else get_loss(item.loss_fn)[1]
    validate_loss_config(item.loss_fn, item.loss_fn_config)
    if not item.data:
        raise LossInputError("data is empty")
    for i, datum in enumerate(item.data):
        n = len(datum.tokens)
        if n == 0:
            raise LossInputError(f"data[{i}].model_input is empty")
        if n > context_length:
            raise LossInputError(
                f"data[{i}].model_input has {n} tokens; the model's context is {context_length}"
            )
        if min(datum.tokens) < 0 or max(datum.tokens) >= vocab_size:
            raise LossInputError(f"data[{i}].model_input has token ids outside [0, {vocab_size})")
        for key in required:
            if key not in datum.loss_fn_inputs:
                raise LossInputError(
                    f"data[{i}].loss_fn_inputs lacks {key!r} (required by {item.loss_fn})"
                )
        if custom is not None:
            custom.check_datum(i, datum.loss_fn_inputs)
        for key, value in datum.loss_fn_inputs.items():
            if custom is not None and key in custom.scalar_inputs:
                continue  # one value per datum, checked by check_datum
            if value.dim() == 0 or value.dim() > 2:
                raise LossInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] must be 1-D or 2-D, "
                    f"got shape {tuple(value.shape)}"
                )
            if value.shape[0] != n:
                raise LossInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] has length {value.shape[0]}, "
                    f"model_input has {n}"
                )
            if value.dim() == 2 and value.shape[1] == 0:
                raise LossInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}: no columns"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise LossInputError(f"data[{i}].loss_fn_inputs[{key!r}] has NaN or inf")
        targets = datum.loss_fn_inputs.get("target_tokens")
        if targets is not None:
            if targets.is_floating_point():
                raise LossInputError(f"data[{i}].loss_fn_inputs['target_tokens'] must be int64")
            if targets.numel() and (targets.min() < 0 or targets.max() >= vocab_size):
                raise LossInputError(
                    f"data[{i}].loss_fn_inputs['target_tokens'] has ids outside [0, {vocab_size})"
                )
            for key in PER_TARGET_INPUTS:
                value = datum.loss_fn_inputs.get(key)
                if value is not None and value.shape != targets.shape:
                    raise LossInputError(
                        f"data[{i}].loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}, "
                        f"target_tokens has {tuple(targets.shape)}"
                    )


def validate_loss_config(loss_fn: str, config: Mapping[str, float]) -> None:
    """Config errors found now, not halfway through a batch shared with other tenants."""
    for key, value in config.items():
        if not math.isfinite(value):
            raise LossInputError(f"loss_fn_config[{key!r}] must be finite, got {value}")
    if loss_fn == "dro" and "beta" not in config:
        raise LossInputError("dro needs loss_fn_config['beta']")
    if loss_fn in ("ppo", "cispo", "gspo"):
        clip_bounds(config)
    if loss_fn == "stable_reinforce":
        stable_reinforce_config(config)


def unembed(lora: MultiLoraModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, with the model's final softcapping if it has one."""
    logits = lora.model.get_output_embeddings()(hidden)
    cap = getattr(lora.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def body(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (`model.model` for Llama-like models)."""
    return getattr(model, model.base_model_prefix)


def target_logprobs(
    lora: MultiLoraModel, rows: list[_Row], pad_id: int, chunk_tokens: int = 1024
) -> list[torch.Tensor]:
    """Log-probs of every row's target tokens, shape (N,) or (N, K), in `rows` order.

    `rows` must be sorted by adapter. Softmax is taken in float32 in chunks of tokens so the
    full (tokens x vocab) float32 matrix never exists at once.
    """
    device = lora.model.get_output_embeddings().weight.device
    lengths = [len(r.datum_ref.tokens) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : lengths[i]] = torch.tensor(r.datum_ref.tokens, dtype=torch.long)
    ids = ids.to(device)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if any(r.datum_ref.images for r in rows):  # VL model: vision embeddings, M-RoPE positions
        images = [r.datum_ref.images for r in rows]
        inputs, _ = vision.model_inputs(body(lora.model), ids, images, [0] * len(rows), None)
    with lora.route(segments_for([r.adapter_id for r in rows])):
        hidden = body(lora.model)(**inputs, use_cache=False).last_hidden_state
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    packed = hidden[mask.to(device)] if width * len(rows) != sum(lengths) else hidden.flatten(0, 1)
    # Token-level segments for the unembedding (its input is packed tokens, not rows).
    token_adapters = [r.adapter_id for r, n in zip(rows, lengths, strict=True) for _ in range(n)]
    targets = [_targets_2d(r.datum_ref).to(device) for r in rows]
    k_max = max(t.shape[1] for t in targets)
    # (total tokens, K): rows with fewer target columns are padded with their first column.
    flat_targets = torch.cat(
        [
            t.expand(-1, k_max)
            if t.shape[1] == 1
            else torch.cat([t, t[:, :1].expand(-1, k_max - t.shape[1])], 1)
            for t in targets
        ]
    )
    pieces = []
    for i, (hidden_chunk, target_chunk) in enumerate(
        zip(packed.split(chunk_tokens), flat_targets.split(chunk_tokens), strict=True)
    ):
        adapters = token_adapters[i * chunk_tokens : (i + 1) * chunk_tokens]
        with lora.route(segments_for(adapters)):
            logits = unembed(lora, hidden_chunk)
        pieces.append(TargetLogprobs.apply(logits, target_chunk))
    out = torch.cat(pieces)
    results, offset = [], 0
    for r, t, n in zip(rows, targets, lengths, strict=True):
        lp = out[offset : offset + n, : t.shape[1]]
        offset += n
        raw = r.datum_ref.loss_fn_inputs.get("target_tokens")
        results.append(lp if raw is not None and raw.dim() == 2 else lp[:, 0])
    return results


class TargetLogprobs(torch.autograd.Function):
    """log_softmax(logits)[targets] in float32, with a lean, cache-blocked backward.

    Autograd's version keeps a float32 copy of the logits and makes several passes over
    tokens x vocab temporaries. This one saves only the logits as they are (bf16 under
    autocast) and works in blocks of rows small enough to stay in cache: the forward's
    logsumexp and the backward's softmax-minus-one-hot each read the logits once.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.cat(
            [torch.logsumexp(b.float(), dim=-1, keepdim=True) for b in logits.split(BLOCK_ROWS)]
        )
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(1, targets).float() - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            g = logits[rows].to(torch.float32, copy=True)
            g.sub_(lse[rows]).exp_().mul_(-grad[rows].sum(dim=-1, keepdim=True))
            g.scatter_add_(1, targets[rows], grad[rows])
            out[rows] = g
        return out, None


def _targets_2d(datum: Datum) -> torch.Tensor:
    t = datum.loss_fn_inputs.get("target_tokens")
    if t is None:
        # Every Tinker loss scores target_tokens; validate_input rejects datums without them.
        raise LossInputError("loss_fn_inputs lacks 'target_tokens'")
    return (t if t.dim() == 2 else t.unsqueeze(1)).long()


def forward_backward(
    lora: MultiLoraModel, inputs: list[ForwardBackwardInput], pad_id: int
) -> list[ForwardBackwardOutput]:
    """One forward over every datum of every input; backward of the sum of the losses of the
    inputs that are not forward-only. Gradients accumulate in the adapters' `.grad`."""
    rows = [
        _Row(i, j, item.adapter_id, datum)
        for i, item in enumerate(inputs)
        for j, datum in enumerate(item.data)
    ]
    order = sorted(range(len(rows)), key=lambda k: (rows[k].adapter_id or "", k))
    rows = [rows[k] for k in order]
    needs_grad = any(not item.forward_only for item in inputs)
    with torch.set_grad_enabled(needs_grad):
        lps = target_logprobs(lora, rows, pad_id)
        per_item: list[list[_RowResult]] = [[] for _ in inputs]
        total: torch.Tensor | None = None
        for row, lp in zip(rows, lps, strict=True):
            item = inputs[row.item]
            device_inputs = _to_device(row.datum_ref.loss_fn_inputs, lp.device)
            out = loss_fn_of(item)(lp, device_inputs, item.loss_fn_config)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            per_item[row.item].append(
                _RowResult(
                    row.datum,
                    lp.detach(),
                    loss.detach(),
                    {k: float(v) for k, v in metrics.items()},
                )
            )
            if not item.forward_only and item.adapter_id is not None:
                total = loss.sum() if total is None else total + loss.sum()
        if total is not None and total.requires_grad:
            total.backward()
    outputs = []
    for results in per_item:
        results.sort(key=lambda r: r.datum)
        loss_sum = math.fsum(float(r.loss.sum()) for r in results)
        metrics = reduce_metrics((r.metrics, 1) for r in results)
        metrics["loss:sum"] = loss_sum
        outputs.append(
            ForwardBackwardOutput(
                loss_fn_outputs=[
                    {"logprobs": r.logprobs.cpu(), "elementwise_loss": r.loss.float().cpu()}
                    for r in results
                ],
                metrics=metrics,
            )
        )
    return outputs


@dataclass
class _RowResult:
    datum: int
    logprobs: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, float]


def loss_fn_of(item: ForwardBackwardInput) -> LossFn:
    """The loss an input runs: a built-in by name, or the caller's uploaded custom loss."""
    if item.custom_loss is not None:
        return item.custom_loss
    return get_loss(item.loss_fn)[0]


def _to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {
        k: (v.to(device, torch.float32) if v.is_floating_point() else v.to(device))
        for k, v in inputs.items()
    }
