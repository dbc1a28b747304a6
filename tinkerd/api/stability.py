"""Sequence records (`record_stability_info`) and the provenance check of `stable_reinforce`.

A sample request with `record_stability_info` leaves one `StabilityRecord`: the prompt, each
sequence's sampled tokens, and the sampler's own logprobs of them (under the distribution it
drew from, and under the untruncated temperature-1 one). A `stable_reinforce` datum says, by
provenance spans, which recorded positions its tokens are; the server checks every claim
against the record and takes the behaviour logprobs from it, never from the client.

Records belong to the Tinker session that sampled them and live one day after their last use
(each training request that uses one starts its day again); a periodic sweep deletes expired
ones and, past `max_bytes` in all, the least recently used. Nothing is held in memory: a
training request reads the records it names.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import torch

from tinkerd.model.types import Datum, ProvenanceSpan, SampleOutput
from tinkerd.store.records import StabilityRecord
from tinkerd.store.store import Store

# Tinker's rule: usable for one day after the last use.
RECORD_TTL = timedelta(days=1)


class ProvenanceError(ValueError):
    """A stable_reinforce datum whose provenance does not hold (a 400 naming the place)."""


def make_record(
    request_id: str,
    session_id: str,
    user: str,
    base_model: str,
    weights_run: str | None,
    prompt: list[int],
    output: SampleOutput,
) -> StabilityRecord:
    """The record of one finished sample request."""
    seqs = output.sequences
    tokens = np.array([t for s in seqs for t in s.tokens], dtype="<i4").tobytes()
    behaviour = [x for s in seqs for x in s.behaviour_logprobs or []]
    base = [x for s in seqs for x in s.base_logprobs or []]
    prompt_bytes = np.array(prompt, dtype="<i4").tobytes()
    behaviour_bytes = np.array(behaviour, dtype="<f4").tobytes()
    base_bytes = np.array(base, dtype="<f4").tobytes()
    return StabilityRecord(
        request_id=request_id,
        session_id=session_id,
        user=user,
        base_model=base_model,
        weights_run=weights_run,
        weights_step=output.weights_step,
        prompt=prompt_bytes,
        lengths=[len(s.tokens) for s in seqs],
        tokens=tokens,
        behaviour_logprobs=behaviour_bytes,
        base_logprobs=base_bytes,
        size_bytes=len(prompt_bytes) + len(tokens) + len(behaviour_bytes) + len(base_bytes),
    )


@dataclass
class _Sequence:
    """One recorded sequence, decoded."""

    prompt: np.ndarray
    tokens: np.ndarray
    behaviour: np.ndarray
    base: np.ndarray
    weights_step: int  # -1: not a snapshot of the training run that trains on it


def _sequences(rec: StabilityRecord, run_id: str) -> list[_Sequence]:
    prompt = np.frombuffer(rec.prompt, dtype="<i4")
    tokens = np.frombuffer(rec.tokens, dtype="<i4")
    behaviour = np.frombuffer(rec.behaviour_logprobs, dtype="<f4")
    base = np.frombuffer(rec.base_logprobs, dtype="<f4")
    step = rec.weights_step if rec.weights_run == run_id and rec.weights_step is not None else -1
    out, start = [], 0
    for n in rec.lengths:
        sl = slice(start, start + n)
        out.append(_Sequence(prompt, tokens[sl], behaviour[sl], base[sl], step))
        start += n
    return out


def _split_id(sequence_id: str) -> tuple[str, int] | None:
    request_id, _, index = sequence_id.rpartition(":")
    if not request_id or not index.isdigit():
        return None
    return request_id, int(index)


def attach_stability_inputs(
    store: Store, data: list[Datum], session_id: str, user: str, run_id: str
) -> list[Datum]:
    """Check every datum's provenance against the session's records and return the data with
    the server's per-target inputs (`losses.STABILITY_INPUTS`) set. Marks the records used."""
    wanted = {
        parsed[0]
        for datum in data
        for span in (datum.model_input_spans or []) + (datum.loss_fn_input_spans or [])
        if (parsed := _split_id(span.sequence_id)) is not None
    }
    records = store.stability_records(
        sorted(wanted), session_id, user, datetime.now(UTC) - RECORD_TTL
    )
    decoded = {rid: _sequences(rec, run_id) for rid, rec in records.items()}
    out = [_checked(i, datum, decoded) for i, datum in enumerate(data)]
    store.touch_stability_records(sorted(records))
    return out


def _lookup(span: ProvenanceSpan, decoded: dict[str, list[_Sequence]], where: str) -> _Sequence:
    parsed = _split_id(span.sequence_id)
    seqs = decoded.get(parsed[0]) if parsed else None
    if parsed is None or seqs is None or parsed[1] >= len(seqs):
        raise ProvenanceError(
            f"{where}: unknown or expired sequence_id {span.sequence_id!r} (sequences are "
            "recorded by samples with record_stability_info, belong to the session that "
            "sampled them, and expire one day after their last use)"
        )
    return seqs[parsed[1]]


def _claimed(span: ProvenanceSpan, seq: _Sequence, where: str) -> slice:
    """The recorded positions a span claims, checked to exist."""
    source = seq.tokens if span.sampled else seq.prompt
    what = "sampled tokens" if span.sampled else "prompt"
    if span.offset + span.length > len(source):
        raise ProvenanceError(
            f"{where}: positions [{span.offset}, {span.offset + span.length}) are outside "
            f"sequence {span.sequence_id!r}'s {what} ({len(source)} tokens)"
        )
    return slice(span.offset, span.offset + span.length)


def _check_tokens(
    actual: np.ndarray, span: ProvenanceSpan, seq: _Sequence, where: str, start: int
) -> None:
    source = seq.tokens if span.sampled else seq.prompt
    expected = source[_claimed(span, seq, where)]
    bad = np.flatnonzero(actual != expected)
    if bad.size:
        k = int(bad[0])
        what = "sampled token" if span.sampled else "prompt token"
        raise ProvenanceError(
            f"{where}: position {start + k} is token {int(actual[k])}, but sequence "
            f"{span.sequence_id!r}'s {what} at offset {span.offset + k} is {int(expected[k])}"
        )


def _tile(spans: list[ProvenanceSpan], n: int, where: str) -> None:
    total = sum(s.length for s in spans)
    if total != n:
        raise ProvenanceError(f"{where} cover {total} positions; the field has {n}")


def _checked(i: int, datum: Datum, decoded: dict[str, list[_Sequence]]) -> Datum:
    if datum.model_input_spans is None or datum.loss_fn_input_spans is None:
        raise ProvenanceError(
            f"data[{i}]: stable_reinforce needs provenance on every datum "
            "(Datum.with_provenance: model_input_spans and loss_fn_input_spans)"
        )
    for key in ("target_tokens", "advantages"):
        if key not in datum.loss_fn_inputs:
            raise ProvenanceError(
                f"data[{i}].loss_fn_inputs lacks {key!r} (required by stable_reinforce)"
            )
    targets = datum.loss_fn_inputs["target_tokens"]
    advantages = datum.loss_fn_inputs["advantages"]
    if advantages.shape != targets.shape:
        raise ProvenanceError(
            f"data[{i}].loss_fn_inputs['advantages'] has shape {tuple(advantages.shape)}, "
            f"target_tokens has {tuple(targets.shape)}"
        )
    if targets.dim() != 1:
        raise ProvenanceError(f"data[{i}].loss_fn_inputs['target_tokens'] must be 1-D")
    tokens = np.asarray(datum.tokens, dtype=np.int64)
    _tile(datum.model_input_spans, len(tokens), f"data[{i}].model_input_spans")
    _tile(datum.loss_fn_input_spans, len(targets), f"data[{i}].loss_fn_input_spans")
    pos = 0
    for k, span in enumerate(datum.model_input_spans):
        where = f"data[{i}].model_input_spans[{k}]"
        seq = _lookup(span, decoded, where)
        _check_tokens(tokens[pos : pos + span.length], span, seq, where, pos)
        pos += span.length

    n = len(targets)
    behaviour = torch.zeros(n)
    base = torch.zeros(n)
    sampled = torch.zeros(n)
    index = torch.full((n,), -1.0)
    step = torch.full((n,), -1.0)
    numbering: dict[str, int] = {}
    target_np = targets.numpy()
    pos = 0
    for k, span in enumerate(datum.loss_fn_input_spans):
        where = f"data[{i}].loss_fn_input_spans[{k}]"
        seq = _lookup(span, decoded, where)
        _check_tokens(target_np[pos : pos + span.length], span, seq, where, pos)
        if span.sampled and span.length:
            claimed = _claimed(span, seq, where)
            rows = slice(pos, pos + span.length)
            behaviour[rows] = torch.from_numpy(seq.behaviour[claimed].astype(np.float32))
            base[rows] = torch.from_numpy(seq.base[claimed].astype(np.float32))
            sampled[rows] = 1.0
            index[rows] = numbering.setdefault(span.sequence_id, len(numbering))
            step[rows] = seq.weights_step
        pos += span.length

    off = torch.nonzero((advantages != 0) & (sampled == 0))
    if off.numel():
        p = int(off[0, 0])
        raise ProvenanceError(
            f"data[{i}].loss_fn_inputs['advantages'][{p}] is {float(advantages[p])} on a "
            "prompt position; stable_reinforce only accepts nonzero advantages on sampled tokens"
        )
    inputs = dict(datum.loss_fn_inputs)
    inputs.update(
        behaviour_logprobs=behaviour,
        base_logprobs=base,
        sampled_mask=sampled,
        sequence_index=index,
        weights_step=step,
    )
    return Datum(datum.tokens, inputs, datum.model_input_spans, datum.loss_fn_input_spans)


def sweep(store: Store, max_bytes: int) -> int:
    """Delete expired records, then the least recently used past `max_bytes`."""
    return store.sweep_stability_records(datetime.now(UTC) - RECORD_TTL, max_bytes)
