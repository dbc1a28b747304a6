"""Batched generation with a KV cache, each row with its own adapter, params and seed.

Each request's prompt is prefilled once (left-padded with the others), then its cache rows are
repeated for `num_samples`. Rows leave the batch as soon as they stop, so finished rows cost
nothing. Rows are kept sorted by adapter so LoRA segments stay contiguous.

Logprob semantics (Tinker's, see README): the logprob returned for a sampled token is taken
from the distribution the token was drawn from before truncation, softmax(logits / temperature):
temperature-scaled, not top-k/top-p filtered. At temperature 1 that equals the training
forward pass's target logprob. Greedy (temperature 0) reports the temperature-1 logprob.
Prompt logprobs are always at temperature 1 (like `compute_logprobs`).
"""

import math
import secrets
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from tinkerd.model.lora import MultiLoraModel, segments_for
from tinkerd.model.training import body, unembed
from tinkerd.model.types import SampledSequence, SampleInput, SampleOutput, SamplingParams

SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads sample indices over seeds


PROMPT_CHUNK = 512  # prompt positions per unembedding chunk


@dataclass
class _Row:
    request: int
    adapter_id: str | None
    params: SamplingParams
    generator: torch.Generator
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    limit: int  # max new tokens for this row
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


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
        (item.num_samples >= 1, f"num_samples must be >= 1, got {item.num_samples}"),
        (p.max_tokens >= 0, f"sampling_params.max_tokens must be >= 0, got {p.max_tokens}"),
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
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def choose_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[int, float]:
    """Draw one token from float32 `logits` (V,). Returns (token, logprob)."""
    if params.temperature == 0:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, -1)[token])
    logp = torch.log_softmax(logits / params.temperature, -1)
    filtered = logp
    if 0 < params.top_k < logp.shape[0]:
        kth = torch.topk(logp, params.top_k).values[-1]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        # Nucleus of the top-k-renormalized distribution (as HF and vLLM).
        sorted_lp, order = torch.sort(torch.log_softmax(filtered, -1), descending=True)
        cum = torch.cumsum(torch.exp(sorted_lp), 0)
        drop = (cum - torch.exp(sorted_lp)) >= params.top_p  # mass before this token
        drop[0] = False
        filtered = filtered.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(filtered, -1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logp[token])


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
    cache = DynamicCache()
    with lora.route(segments_for([r.adapter_id for r in reqs])):
        hidden = body(lora.model)(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        prompt_outputs = [_prompt_logprobs(lora, hidden[i], r) for i, r in enumerate(reqs)]
    with lora.route(segments_for([r.adapter_id for r in reqs])):
        next_logits = unembed(lora, hidden[:, -1]).float()

    rows: list[_Row] = []
    expand: list[int] = []
    for i, r in enumerate(reqs):
        stop_tokens, stop_strings = stop_conditions(r.params, eos_ids)
        limit = max(0, min(r.params.max_tokens, context_length - len(r.prompt)))
        for s in range(r.num_samples):
            gen = torch.Generator(device=device)
            gen.manual_seed(row_seed(r.params.seed, s))
            rows.append(_Row(i, r.adapter_id, r.params, gen, stop_tokens, stop_strings, limit))
            expand.append(i)
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
        for slot, i in enumerate(active):
            row = rows[i]
            if row.stop_reason is not None:
                new_tokens.append(pad_id)
                continue
            token, lp = choose_token(logits[slot], row.params, row.generator)
            row.tokens.append(token)
            row.logprobs.append(lp)
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
        sequences = [
            SampledSequence(row.tokens, row.logprobs, row.stop_reason or "length")
            for row in rows
            if row.request == i
        ]
        prompt_lp, topk = prompt_outputs[i]
        outputs[order[i]] = SampleOutput(sequences, prompt_lp, topk)
    return [o for o in outputs if o is not None]


def _prompt_logprobs(
    lora: MultiLoraModel, hidden_row: torch.Tensor, req: SampleInput
) -> tuple[list[float | None] | None, list[list[tuple[int, float]] | None] | None]:
    """Prompt logprobs (position 0: None) and top-K prompt logprobs, at temperature 1.

    Called inside the prefill's routing; `hidden_row` is one left-padded row."""
    k = req.topk_prompt_logprobs
    if not (req.prompt_logprobs or k > 0) or len(req.prompt) < 2:
        empty: list = [None] * len(req.prompt)
        return (empty if req.prompt_logprobs else None), (list(empty) if k > 0 else None)
    n = len(req.prompt)
    h = hidden_row[hidden_row.shape[0] - n : -1]  # positions predicting prompt[1:]
    targets = torch.tensor(req.prompt[1:], device=h.device).unsqueeze(1)
    prompt_lp: list[float | None] | None = [None] if req.prompt_logprobs else None
    topk: list[list[tuple[int, float]] | None] | None = [None] if k > 0 else None
    # Chunks of positions, so a long prompt never needs a full (length x vocab) float32 table.
    for start in range(0, h.shape[0], PROMPT_CHUNK):
        hc = h[start : start + PROMPT_CHUNK]
        # The prefill routing is per row; this unembedding is for one row only.
        with lora.route(segments_for([req.adapter_id] * hc.shape[0])):
            logp = torch.log_softmax(unembed(lora, hc).float(), -1)
        if prompt_lp is not None:
            prompt_lp.extend(
                logp.gather(1, targets[start : start + PROMPT_CHUNK]).squeeze(1).tolist()
            )
        if topk is not None:
            values, idx = torch.topk(logp, min(k, logp.shape[1]), dim=-1)
            topk.extend(
                list(zip(i, v, strict=True))
                for i, v in zip(idx.tolist(), values.tolist(), strict=True)
            )
    return prompt_lp, topk
