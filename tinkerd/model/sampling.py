"""Batched generation with a KV cache, each row with its own adapter, params and seed.

`sample` is the static batch: the path of models the continuous batch (sample_engine.py)
cannot serve, and the reference it is tested against. Both share this module's validation,
token choice and prompt outputs.

Each request's prompt is prefilled once (left-padded with the others), then its cache rows are
repeated for `num_samples`. Rows leave the batch as soon as they stop, so finished rows cost
nothing. Rows are kept sorted by adapter so LoRA segments stay contiguous. Each step chooses
every row's token in one batched call (`choose_tokens`): an inverse-CDF draw with one uniform
per row from the row's own generator, so a seed's tokens never depend on batch mates.

Logprob semantics (Tinker's, see docs/api.md): the logprob returned for a sampled token is taken
from the distribution the token was drawn from before truncation, softmax(logits / temperature):
temperature-scaled, not top-k/top-p filtered. At temperature 1 that equals the training
forward pass's target logprob. Greedy (temperature 0) reports the temperature-1 logprob.
Prompt logprobs are always at temperature 1 (like `compute_logprobs`).

Extras: `topk_sample_logprobs` reports the top K of that same (temperature-scaled,
pre-truncation) distribution per sampled token; `target_prompt_logprobs` scores chosen ids at
prompt positions (temperature 1, like prompt logprobs); `prompt_alt_tokens_k` draws K tokens
with replacement at the request's temperature (no top-k/top-p) at every prompt position after
the first, with their logprobs under that distribution (greedy: the argmax K times, with its
temperature-1 logprob), from a generator seeded by the request's seed;
`prompt_logprobs_last_n` scores only the last N prompt positions (earlier ones None).
"""

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tinkerd.model import vision
from tinkerd.model.lora import MultiLoraModel, segments_for
from tinkerd.model.training import body, unembed
from tinkerd.model.types import SampledSequence, SampleInput, SampleOutput, SamplingParams

log = logging.getLogger(__name__)

SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads sample indices over seeds


PROMPT_CHUNK = 512  # prompt positions per unembedding chunk

# Bound on the cells a request's top-K / target / alt-token outputs may have (len x K): a
# generous cap that keeps one request from asking for gigabytes of logprobs.
MAX_OUTPUT_CELLS = 1 << 22

# Samples one request may ask for: far above real use (RL groups are tens), and a bound on
# the rows one request can add to a shared decode batch.
MAX_NUM_SAMPLES = 1024

ALT_TOKENS_STREAM = 1 << 62  # row_seed index of the prompt_alt_tokens generator

DRAW_BLOCK = 256  # ids per block of the two-level inverse-CDF draw


@dataclass
class _Row:
    request: int
    adapter_id: str | None
    params: SamplingParams
    generator: torch.Generator
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    limit: int  # max new tokens for this row
    topk: int = 0  # topk_sample_logprobs
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_reason: str | None = None
    record_stability: bool = False
    behaviour_logprobs: list[float] = field(default_factory=list)
    base_logprobs: list[float] = field(default_factory=list)


class DrawnRow(Protocol):
    """What a row drawn by either sampler (this static batch, or sample_engine's continuous
    one) has recorded."""

    tokens: list[int]
    logprobs: list[float]
    topk: int
    topk_logprobs: list[list[tuple[int, float]]]
    stop_reason: str | None
    record_stability: bool
    behaviour_logprobs: list[float]
    base_logprobs: list[float]


def sampled_sequence(row: DrawnRow) -> SampledSequence:
    """A finished row as its request's output (no stop reason yet: it hit the limit)."""
    return SampledSequence(
        row.tokens,
        row.logprobs,
        row.stop_reason or "length",
        row.topk_logprobs if row.topk > 0 else None,
        row.behaviour_logprobs if row.record_stability else None,
        row.base_logprobs if row.record_stability else None,
    )


def row_seed(seed: int | None, sample_index: int) -> int:
    """Per-sample seed: same request + seed -> same tokens; no seed -> fresh randomness."""
    if seed is None:
        return secrets.randbits(63)
    return ((seed & (2**64 - 1)) * SEED_MIX + sample_index) % (2**63 - 1)


def stop_conditions(
    params: SamplingParams, eos_ids: tuple[int, ...]
) -> tuple[frozenset[int], tuple[str, ...]]:
    """EOS always stops, and stop strings or ids stop too; only `stop=[]` disables stopping
    (the cookbook's role_colon parser expects EOS-terminated responses under string stops)."""
    if params.stop is None:
        return frozenset(eos_ids), ()
    if len(params.stop) == 0:
        return frozenset(), ()
    tokens = frozenset(s for s in params.stop if isinstance(s, int)) | frozenset(eos_ids)
    strings = tuple(s for s in params.stop if isinstance(s, str))
    return tokens, strings


def validate_sample_input(item: SampleInput, vocab_size: int, context_length: int) -> None:
    """Raise ValueError naming the field and problem, before the request joins a batch."""
    n = len(item.prompt)
    p = item.params
    checks = [
        (n > 0, "prompt is empty"),
        (
            n == 0 or (min(item.prompt) >= 0 and max(item.prompt) < vocab_size),
            f"prompt has token ids outside [0, {vocab_size})",
        ),
        (n < context_length, f"prompt has {n} tokens; the model's context is {context_length}"),
        (
            1 <= item.num_samples <= MAX_NUM_SAMPLES,
            f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, got {item.num_samples}",
        ),
        (p.max_tokens >= 1, f"sampling_params.max_tokens must be >= 1, got {p.max_tokens}"),
        (
            n + p.max_tokens <= context_length,
            f"prompt ({n} tokens) + sampling_params.max_tokens ({p.max_tokens}) exceeds the "
            f"model's context of {context_length} tokens",
        ),
        (
            math.isfinite(p.temperature) and p.temperature >= 0,
            f"sampling_params.temperature must be >= 0, got {p.temperature}",
        ),
        (p.top_k == -1 or p.top_k >= 1, f"sampling_params.top_k must be -1 or >= 1, got {p.top_k}"),
        (0 < p.top_p <= 1, f"sampling_params.top_p must be in (0, 1], got {p.top_p}"),
        (
            item.topk_prompt_logprobs >= 0,
            f"topk_prompt_logprobs must be >= 0, got {item.topk_prompt_logprobs}",
        ),
        (
            item.topk_prompt_logprobs * n <= MAX_OUTPUT_CELLS,
            f"topk_prompt_logprobs={item.topk_prompt_logprobs} x {n} prompt tokens exceeds "
            f"{MAX_OUTPUT_CELLS} cells",
        ),
        (
            item.topk_sample_logprobs >= 0,
            f"topk_sample_logprobs must be >= 0, got {item.topk_sample_logprobs}",
        ),
        (
            item.topk_sample_logprobs * max(p.max_tokens, 0) * max(item.num_samples, 0)
            <= MAX_OUTPUT_CELLS,
            f"topk_sample_logprobs={item.topk_sample_logprobs} x max_tokens x num_samples "
            f"exceeds {MAX_OUTPUT_CELLS} cells",
        ),
        (
            item.prompt_alt_tokens_k >= 0,
            f"prompt_alt_tokens_k must be >= 0, got {item.prompt_alt_tokens_k}",
        ),
        (
            item.prompt_alt_tokens_k * n <= MAX_OUTPUT_CELLS,
            f"prompt_alt_tokens_k={item.prompt_alt_tokens_k} x {n} prompt tokens exceeds "
            f"{MAX_OUTPUT_CELLS} cells",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    _validate_stop(p.stop, vocab_size)
    last_n = item.prompt_logprobs_last_n
    if last_n is not None:
        if not item.prompt_logprobs:
            raise ValueError("prompt_logprobs_last_n requires prompt_logprobs to be true")
        if not 1 <= last_n <= n - 1:
            raise ValueError(
                f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {n - 1}, "
                f"got {last_n}"
            )
    if item.target_prompt_logprobs is not None:
        _validate_target(item.target_prompt_logprobs, n, vocab_size)


def _validate_stop(stop: tuple[str, ...] | tuple[int, ...] | None, vocab_size: int) -> None:
    """Stop strings must be non-empty (an empty one would match at once) and stop ids real."""
    for i, s in enumerate(stop or ()):
        if isinstance(s, str):
            if not s:
                raise ValueError(f"sampling_params.stop[{i}] is an empty string")
        elif isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < vocab_size:
            raise ValueError(
                f"sampling_params.stop[{i}] = {s!r} is not a token id in [0, {vocab_size})"
            )


def _validate_target(target: torch.Tensor, n: int, vocab_size: int) -> None:
    what = "target_prompt_logprobs"
    if target.dtype != torch.int64:
        raise ValueError(f"{what} must be an int64 tensor of token ids, got {target.dtype}")
    if target.dim() != 2 or target.shape[0] != n - 1 or target.shape[1] < 1:
        raise ValueError(
            f"{what} must have shape [len(prompt) - 1, K] = [{n - 1}, K >= 1], "
            f"got {list(target.shape)}"
        )
    named = target[target != -1]
    if named.numel() == 0:
        raise ValueError(f"{what} names no token id (every cell is -1)")
    if int(named.min()) < 0 or int(named.max()) >= vocab_size:
        raise ValueError(f"{what} has ids outside [0, {vocab_size}) (use -1 for no request)")
    distinct = int(torch.unique(named).numel())
    if distinct * n > MAX_OUTPUT_CELLS:
        raise ValueError(
            f"{what}: {distinct} distinct ids x {n} prompt tokens exceeds {MAX_OUTPUT_CELLS} cells"
        )


def choose_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[int, float]:
    """Draw one token from float32 `logits` (V,). Returns (token, logprob)."""
    choice = choose_token_topk(logits, params, generator, 0)
    return choice.token, choice.logprob


@dataclass
class Choice:
    """A drawn token and what is reported about it (see `SampledSequence`)."""

    token: int
    logprob: float  # under softmax(logits / T), before truncation (Tinker's sampled logprob)
    topk: list[tuple[int, float]] | None
    behaviour_logprob: float  # under the distribution actually drawn from
    base_logprob: float  # under softmax(logits), temperature 1, untruncated


@dataclass(frozen=True)
class Draw:
    """What one row's token choice needs: its params, its own generator (so its tokens depend
    on its seed alone, never on batch mates) and its `topk_sample_logprobs`."""

    params: SamplingParams
    generator: torch.Generator
    topk: int = 0


def choose_token_topk(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, k: int
) -> Choice:
    """`choose_token`, plus the top `k` (id, logprob) of the distribution the logprob is
    taken from (None when k == 0) and the token's behaviour and temperature-1 logprobs."""
    return choose_tokens(logits.unsqueeze(0), [Draw(params, generator, k)])[0]


def choose_tokens(logits: torch.Tensor, draws: list[Draw]) -> list[Choice]:
    """One token for every row of float32 `logits` (N, V), row i drawn as `draws[i]` says.

    The whole step shares one log_softmax, one truncation pass per kind (top-k, top-p) over
    the rows that ask for it, one softmax and one inverse-CDF draw: row i's token is the first
    id whose cumulative probability exceeds u * total, with u = rand() from row i's generator
    (one draw per sampled row per step; greedy rows draw nothing).
    """
    n = logits.shape[0]
    if n == 0:
        return []
    device = logits.device
    vocab = logits.shape[1]
    temps = [d.params.temperature for d in draws]
    if all(t in (0, 1) for t in temps):
        scaled = logits
    else:
        scale = torch.tensor([t if t > 0 else 1.0 for t in temps], device=device)
        scaled = logits / scale.to(logits.dtype).unsqueeze(1)
    # No truncation and no top-k lists (the usual RL draw): one softmax serves both the draw
    # and the logprobs (taken as log of the drawn token's probability), one pass over the
    # vocabulary's exp instead of two.
    plain = all(d.topk == 0 and not _truncates(d.params, vocab) for d in draws)
    if plain:
        probs = torch.softmax(scaled, -1)
    else:
        logp = torch.log_softmax(scaled, -1)  # reported: temperature-scaled, before truncation
    tokens = torch.zeros(n, dtype=torch.long, device=device)
    behaviour = torch.zeros(n, dtype=torch.float64, device=device)  # greedy: certain, 0
    greedy = [i for i, t in enumerate(temps) if t == 0]
    if greedy:
        g = torch.tensor(greedy, device=device)
        tokens[g] = logits[g].argmax(-1)
    drawn = [i for i, t in enumerate(temps) if t > 0]
    if drawn:
        everyone = len(drawn) == n
        d = torch.tensor(drawn, device=device)
        if plain:
            weights = probs if everyone else probs[d]
        else:
            filtered = _truncate(logp if everyone else logp[d], [draws[i].params for i in drawn])
            weights = torch.exp(filtered)
        u = torch.stack(
            [
                torch.rand((), dtype=torch.float64, generator=draws[i].generator, device=device)
                for i in drawn
            ]
        )
        picked, mass = _inverse_cdf(weights, u)
        tokens[d] = picked
        at = picked.unsqueeze(1)
        weight_logp = weights.gather(1, at).log() if plain else filtered.gather(1, at)
        # log of the token's probability under the renormalized (truncated) distribution
        behaviour[d] = weight_logp.squeeze(1).double() - mass.log()
    chosen = tokens.unsqueeze(1)
    logprob = (probs.gather(1, chosen).log() if plain else logp.gather(1, chosen)).squeeze(1)
    base = logprob.clone()  # temperature 1 and greedy rows: logp is the temperature-1 one
    scaled_rows = [i for i, t in enumerate(temps) if t not in (0, 1)]
    if scaled_rows:
        s = torch.tensor(scaled_rows, device=device)
        base[s] = torch.log_softmax(logits[s], -1).gather(1, chosen[s]).squeeze(1)
    topk = [None] * n if plain else _topk_lists(logp, [d.topk for d in draws])
    return [
        Choice(t, lp, k, b, p1)
        for t, lp, k, b, p1 in zip(
            tokens.tolist(),
            logprob.tolist(),
            topk,
            behaviour.tolist(),
            base.tolist(),
            strict=True,
        )
    ]


def _truncates(params: SamplingParams, vocab: int) -> bool:
    """The row's top-k or top-p removes part of the vocabulary (see `_truncate`)."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def _truncate(logp: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`logp` (N, V) with ids outside each row's top-k, then outside the nucleus (top-p) of
    the top-k-renormalized distribution (as HF and vLLM), set to -inf."""
    vocab = logp.shape[1]
    top_k = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if top_k:
        r = torch.tensor(top_k, device=logp.device)
        sub = logp[r]
        values = torch.topk(sub, max(params[i].top_k for i in top_k), dim=-1).values
        ks = torch.tensor([params[i].top_k - 1 for i in top_k], device=logp.device)
        kth = values.gather(1, ks.unsqueeze(1))
        logp = logp.index_put((r,), sub.masked_fill(sub < kth, float("-inf")))
    top_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if top_p:
        r = torch.tensor(top_p, device=logp.device)
        sub = logp[r]
        ps = torch.tensor([params[i].top_p for i in top_p], device=logp.device)
        sorted_lp, order = torch.sort(torch.log_softmax(sub, -1), dim=-1, descending=True)
        mass = torch.exp(sorted_lp)
        drop = (torch.cumsum(mass, -1) - mass) >= ps.to(mass.dtype).unsqueeze(1)  # mass before
        drop[:, 0] = False
        mask = torch.zeros_like(drop).scatter(1, order, drop)
        logp = logp.index_put((r,), sub.masked_fill(mask, float("-inf")))
    return logp


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's id: the first whose cumulative weight exceeds u[i] * total (the row's summed
    `weights`, which need not be normalized), and that total; running sums in float64.

    Two levels, so no full-vocabulary float64 cumsum is needed: block sums find the block,
    a cumsum inside it the id. Either search lands on an element where the cumulative sum
    rose, so the id has nonzero weight; where rounding puts the target at or past a total,
    the search falls back to the first element reaching it, which also has nonzero weight.
    """
    n, vocab = weights.shape
    pad = -vocab % DRAW_BLOCK
    blocks = (F.pad(weights, (0, pad)) if pad else weights).view(n, -1, DRAW_BLOCK)
    # Block sums in float32 (a float64 sum over the whole vocabulary takes 20x longer on
    # CPU, measured), then the running sum over blocks in float64.
    cdf = blocks.sum(-1).double().cumsum(-1)  # (n, blocks)
    total = cdf[:, -1:].contiguous()
    x = u.unsqueeze(1) * total
    b = torch.minimum(torch.searchsorted(cdf, x, right=True), torch.searchsorted(cdf, total))
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b.unsqueeze(2).expand(n, 1, DRAW_BLOCK)).squeeze(1)
    inner = inner.cumsum(-1, dtype=torch.float64)
    end = inner[:, -1:].contiguous()
    y = (x - before).clamp(min=0)
    i = torch.minimum(torch.searchsorted(inner, y, right=True), torch.searchsorted(inner, end))
    return (b * DRAW_BLOCK + i).squeeze(1), total.squeeze(1)


def _topk_lists(logp: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]] | None]:
    """Each row's top `ks[i]` (id, logprob) of `logp` (None where ks[i] == 0)."""
    out: list[list[tuple[int, float]] | None] = [None] * len(ks)
    rows = [i for i, k in enumerate(ks) if k > 0]
    if not rows:
        return out
    vocab = logp.shape[1]
    r = torch.tensor(rows, device=logp.device)
    values, idx = torch.topk(logp[r], min(max(ks[i] for i in rows), vocab), dim=-1)
    for i, ids, vals in zip(rows, idx.tolist(), values.tolist(), strict=True):
        k = min(ks[i], vocab)
        out[i] = list(zip(ids[:k], vals[:k], strict=True))
    return out


def _stopped_by_string(tokenizer: object, row: _Row) -> bool:
    if not row.stop_strings:
        return False
    window = max(len(s) for s in row.stop_strings) + 2
    text = tokenizer.decode(row.tokens[-window:])
    return any(s in text for s in row.stop_strings)


@torch.no_grad()
def sample(
    lora: MultiLoraModel,
    tokenizer: object,
    inputs: list[SampleInput],
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
    context_length: int,
) -> list[SampleOutput]:
    """Generate for every input in one batch; outputs in input order."""
    device = lora.model.get_output_embeddings().weight.device
    order = sorted(range(len(inputs)), key=lambda i: (inputs[i].adapter_id or "", i))
    reqs = [inputs[i] for i in order]
    width = max(len(r.prompt) for r in reqs)
    ids = torch.full((len(reqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
        attn[i, width - len(r.prompt) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    prefill: dict[str, torch.Tensor] = {"input_ids": ids, "position_ids": positions}
    if any(r.prompt_images for r in reqs):
        # VL rows: vision embeddings and M-RoPE positions (3, B, L); text after the prompt
        # continues at its real length + the row's rope delta (0 for rows without images).
        offsets = [width - len(r.prompt) for r in reqs]
        images = [r.prompt_images for r in reqs]
        prefill, deltas = vision.model_inputs(body(lora.model), ids, images, offsets, attn)
        positions = positions + deltas.unsqueeze(1)
    # With the config the cache has a layer of the right kind per decoder layer: linear-
    # attention layers (Qwen3.5) keep their conv/recurrent state, sliding ones their window.
    cache = DynamicCache(config=lora.model.config)
    with lora.route(segments_for([r.adapter_id for r in reqs])):
        hidden = body(lora.model)(
            **prefill,
            attention_mask=attn,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        prompt_outputs = [_prompt_extras(lora, hidden[i], r) for i, r in enumerate(reqs)]
    with lora.route(segments_for([r.adapter_id for r in reqs])):
        next_logits = unembed(lora, hidden[:, -1]).float()

    rows: list[_Row] = []
    expand: list[int] = []
    hooks = [r.on_token for r in reqs]  # SampleInput.on_token, per request (None: dropped)
    sample_of: list[int] = []  # each row's sample index within its request
    for i, r in enumerate(reqs):
        stop_tokens, stop_strings = stop_conditions(r.params, eos_ids)
        limit = max(0, min(r.params.max_tokens, context_length - len(r.prompt)))
        for s in range(r.num_samples):
            gen = torch.Generator(device=device)
            gen.manual_seed(row_seed(r.params.seed, s))
            rows.append(
                _Row(
                    i,
                    r.adapter_id,
                    r.params,
                    gen,
                    stop_tokens,
                    stop_strings,
                    limit,
                    topk=r.topk_sample_logprobs,
                    record_stability=r.record_stability,
                )
            )
            expand.append(i)
            sample_of.append(s)
    index = torch.tensor(expand, dtype=torch.long, device=device)  # long even if empty
    cache.reorder_cache(index)
    attn = attn[index]
    logits = next_logits[index]
    last_pos = positions[index, -1]
    active = list(range(len(rows)))
    for i in active:
        if rows[i].limit == 0:
            rows[i].stop_reason = "length"

    while True:
        new_tokens = []
        live = [slot for slot, i in enumerate(active) if rows[i].stop_reason is None]
        draws = [Draw(r.params, r.generator, r.topk) for r in (rows[active[s]] for s in live)]
        chosen = choose_tokens(logits if len(live) == len(active) else logits[live], draws)
        choice_of = dict(zip(live, chosen, strict=True))
        for slot, i in enumerate(active):
            row = rows[i]
            if row.stop_reason is not None:
                new_tokens.append(pad_id)
                continue
            choice = choice_of[slot]
            token = choice.token
            row.tokens.append(token)
            row.logprobs.append(choice.logprob)
            if choice.topk is not None:
                row.topk_logprobs.append(choice.topk)
            if row.record_stability:
                row.behaviour_logprobs.append(choice.behaviour_logprob)
                row.base_logprobs.append(choice.base_logprob)
            hook = hooks[row.request]
            if hook is not None:
                try:
                    hook(sample_of[i], choice)
                except Exception:  # a caller's hook never breaks the batch for the others
                    log.warning("on_token hook failed; dropped for this batch", exc_info=True)
                    hooks[row.request] = None
            new_tokens.append(token)
            if token in row.stop_tokens or _stopped_by_string(tokenizer, row):
                row.stop_reason = "stop"
            elif len(row.tokens) >= row.limit:
                row.stop_reason = "length"
        keep = [slot for slot, i in enumerate(active) if rows[i].stop_reason is None]
        if not keep:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=device)
            cache.reorder_cache(sel)
            attn, last_pos = attn[sel], last_pos[sel]
            new_tokens = [new_tokens[s] for s in keep]
            active = [active[s] for s in keep]
        step_ids = torch.tensor(new_tokens, device=device).unsqueeze(1)
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        last_pos = last_pos + 1
        with lora.route(segments_for([rows[i].adapter_id for i in active])):
            hidden = body(lora.model)(
                input_ids=step_ids,
                attention_mask=attn,
                position_ids=last_pos.unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            logits = unembed(lora, hidden[:, -1]).float()

    outputs: list[SampleOutput | None] = [None] * len(inputs)
    for i in range(len(reqs)):
        sequences = [sampled_sequence(row) for row in rows if row.request == i]
        extras = prompt_outputs[i]
        outputs[order[i]] = SampleOutput(
            sequences,
            extras.prompt_logprobs,
            extras.topk_prompt_logprobs,
            target_prompt_logprobs=extras.target_prompt_logprobs,
            prompt_alt_tokens=extras.alt_tokens,
            prompt_alt_logprobs=extras.alt_logprobs,
        )
    return [o for o in outputs if o is not None]


def first_needed_position(req: SampleInput) -> int:
    """The first prompt position whose hidden state the request's prompt outputs need
    (len(prompt) - 1, the last, when it asks for none): KV before it may come from a cache."""
    n = len(req.prompt)
    needed = [n - 1]
    if req.prompt_logprobs or req.topk_prompt_logprobs > 0:
        needed.append(n - 1 - req.prompt_logprobs_last_n if req.prompt_logprobs_last_n else 0)
    if req.prompt_alt_tokens_k > 0:
        needed.append(0)
    target = req.target_prompt_logprobs
    if target is not None:
        named = torch.nonzero((target >= 0).any(dim=1)).flatten()
        if named.numel():
            needed.append(int(named[0]))
    return max(0, min(needed))


@dataclass
class _PromptExtras:
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    target_prompt_logprobs: torch.Tensor | None = None
    alt_tokens: torch.Tensor | None = None
    alt_logprobs: torch.Tensor | None = None


def _prompt_extras(
    lora: MultiLoraModel, hidden_row: torch.Tensor, req: SampleInput, offset: int = 0
) -> _PromptExtras:
    """Everything computed from the prompt's own positions: prompt logprobs (position 0:
    None; before the last N: None), top-K prompt logprobs (both at temperature 1), target id
    logprobs (temperature 1) and alternative-token draws (at the request's temperature).

    Called inside the prefill's routing; `hidden_row` is one left-padded row, whose last
    len(prompt) - offset positions are prompt positions offset.. (a prefix served from the
    prefix cache has no hidden states: `first_needed_position` must be >= offset). Row j of
    the (len(prompt) - 1)-row outputs is the distribution after prompt[:j + 1], over
    prompt[j + 1].
    """
    n = len(req.prompt)
    rows = n - 1
    k = req.topk_prompt_logprobs
    alt_k = req.prompt_alt_tokens_k
    target = req.target_prompt_logprobs
    # First row scored for prompt_logprobs / topk_prompt_logprobs.
    first = rows - req.prompt_logprobs_last_n if req.prompt_logprobs_last_n else 0
    out = _PromptExtras()
    if req.prompt_logprobs:
        out.prompt_logprobs = [None] * (1 + first) if rows > 0 else [None]
    if k > 0:
        out.topk_prompt_logprobs = [None] * (1 + first) if rows > 0 else [None]
    starts: list[int] = []
    if (req.prompt_logprobs or k > 0) and rows > 0:
        starts.append(first)
    device = hidden_row.device
    if target is not None:
        target = target.to(device)
        out.target_prompt_logprobs = torch.zeros(target.shape, dtype=torch.float32)
        named_rows = torch.nonzero((target >= 0).any(dim=1)).flatten()
        if named_rows.numel():
            starts.append(int(named_rows[0]))  # earlier rows name nothing: not scored
    generator = None
    if alt_k > 0:
        out.alt_tokens = torch.zeros((rows, alt_k), dtype=torch.int64)
        out.alt_logprobs = torch.zeros((rows, alt_k), dtype=torch.float32)
        if rows > 0:
            starts.append(0)
            generator = torch.Generator(device=device)
            generator.manual_seed(row_seed(req.params.seed, ALT_TOKENS_STREAM))
    if not starts:
        return out
    if min(starts) < offset:
        raise ValueError(f"prompt extras need positions from {min(starts)}, have {offset}..")
    # Positions offset..n-2 (predicting prompt[offset + 1:]), indexed from `offset`.
    h = hidden_row[hidden_row.shape[0] - (n - offset) : -1]
    targets = torch.tensor(req.prompt[1:], device=device).unsqueeze(1)
    temperature = req.params.temperature
    # Chunks of positions, so a long prompt never needs a full (length x vocab) float32 table.
    for start in range(min(starts), rows, PROMPT_CHUNK):
        end = min(start + PROMPT_CHUNK, rows)
        hc = h[start - offset : end - offset]
        # The prefill routing is per row; this unembedding is for one row only.
        with lora.route(segments_for([req.adapter_id] * hc.shape[0])):
            logits = unembed(lora, hc).float()
        logp = torch.log_softmax(logits, -1)
        a = max(first, start) - start  # first row of this chunk that is scored
        if out.prompt_logprobs is not None and a < end - start:
            out.prompt_logprobs.extend(
                logp[a:].gather(1, targets[start + a : end]).squeeze(1).tolist()
            )
        if out.topk_prompt_logprobs is not None and a < end - start:
            values, idx = torch.topk(logp[a:], min(k, logp.shape[1]), dim=-1)
            out.topk_prompt_logprobs.extend(
                list(zip(i, v, strict=True))
                for i, v in zip(idx.tolist(), values.tolist(), strict=True)
            )
        if target is not None and out.target_prompt_logprobs is not None:
            ids = target[start:end]
            got = logp.gather(1, ids.clamp(min=0))
            got = torch.where(ids >= 0, got, torch.zeros_like(got))
            out.target_prompt_logprobs[start:end] = got.cpu()
        if generator is not None and out.alt_tokens is not None and out.alt_logprobs is not None:
            if temperature == 0:
                draws = logits.argmax(-1, keepdim=True).expand(-1, alt_k)
                alt_lp = logp.gather(1, draws)
            else:
                logp_t = torch.log_softmax(logits / temperature, -1)
                draws = torch.multinomial(
                    torch.exp(logp_t), alt_k, replacement=True, generator=generator
                )
                alt_lp = logp_t.gather(1, draws)
            out.alt_tokens[start:end] = draws.cpu()
            out.alt_logprobs[start:end] = alt_lp.cpu()
    return out
