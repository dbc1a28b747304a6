"""Sampling: sampling sessions, samples (with sequence records for `stable_reinforce`), and
the sampling clients' completion queues, clone ids and cancellation."""

from collections.abc import Callable
from typing import Any

from tinkerd.api import codec, stability
from tinkerd.api.checkpoint_service import CheckpointService
from tinkerd.api.service_base import (
    inflight_adapter_id,
)
from tinkerd.api.service_types import ApiError, Future, not_found
from tinkerd.checkpoints.peft_format import (
    read_adapter_info,
)
from tinkerd.engine.ops import (
    Sample,
    UserError,
)
from tinkerd.model.sampling import validate_sample_input
from tinkerd.model.types import SampleInput, SampleOutput, SamplingParams
from tinkerd.store.records import (
    SamplingSessionRecord,
    StabilityRecord,
)


class SamplingService(CheckpointService):
    def create_sampling_session(self, user: str, body: dict[str, Any]) -> str:
        session = self.session(body["session_id"], user)
        sampler_id = f"{session.session_id}:sample:{int(body['sampling_session_seq_id'])}"
        model_path = body.get("model_path")
        base_model = body.get("base_model")
        if model_path:
            tpath, _ = self.resolve_checkpoint(user, model_path)
            info = read_adapter_info(tpath.storage_dir(self.checkpoint_root))
            base_model = base_model or info.base_model
        if not base_model:
            raise ApiError(400, "either base_model or model_path is required")
        self.scheduler(base_model)
        if self.store.get_sampling_session(sampler_id) is None:
            self.store.create_sampling_session(
                SamplingSessionRecord(
                    sampling_session_id=sampler_id,
                    session_id=session.session_id,
                    user=user,
                    base_model=base_model,
                    model_path=model_path,
                )
            )
        return sampler_id

    def sampler(self, user: str, sampler_id: str) -> SamplingSessionRecord:
        rec = self.store.get_sampling_session(sampler_id, user)
        if rec is None:
            raise not_found(f"sampler {sampler_id!r}")
        return rec

    def sample(self, user: str, body: dict[str, Any]) -> Future:
        sampler_id = body.get("sampling_session_id")
        if sampler_id:
            sampler = self.sampler(user, sampler_id)
            base_model = sampler.base_model
        else:
            sampler, base_model = None, body.get("base_model")
            if not base_model and not body.get("model_path"):
                raise ApiError(400, "sampling_session_id, model_path or base_model is required")
        # A sampler's checkpoint, or one named in the request: either way own or public only.
        model_path = sampler.model_path if sampler is not None else body.get("model_path")
        adapter_id, snapshot_dir = None, None
        if model_path:
            tpath, _ = self.resolve_checkpoint(user, model_path)
            adapter_id, snapshot_dir = str(tpath), tpath.storage_dir(self.checkpoint_root)
            base_model = base_model or read_adapter_info(snapshot_dir).base_model
        elif sampler is not None and sampler.snapshot_of:
            adapter_id = (
                inflight_adapter_id(sampler.snapshot_of)
                if sampler.inflight
                else sampler.sampling_session_id
            )
        record = bool(body.get("record_stability_info") or False)
        if record and sampler is None:
            raise ApiError(
                400, "record_stability_info needs a sampling_session_id (records are per session)"
            )
        scheduler = self.scheduler(base_model)
        try:
            target, target_layout = None, None
            if body.get("target_prompt_logprobs") is not None:
                target, target_layout = codec.target_prompt_ids(body["target_prompt_logprobs"])
            last_n = body.get("prompt_logprobs_last_n")
            worker = scheduler.front
            no_images = None if worker.vision else f"model {base_model!r} does not take images"
            prompt, images = codec.model_input(body["prompt"], no_images=no_images)
            # An absent max_tokens takes what the context leaves (at most 128); a given one
            # must fit with the prompt (validate_sample_input).
            room = scheduler.front.info.context_length - len(prompt)
            item = SampleInput(
                adapter_id=adapter_id,
                prompt=prompt,
                params=sampling_params(body.get("sampling_params") or {}, max(1, min(128, room))),
                num_samples=int(body.get("num_samples", 1)),
                prompt_logprobs=bool(body.get("prompt_logprobs") or False),
                topk_prompt_logprobs=int(body.get("topk_prompt_logprobs") or 0),
                topk_sample_logprobs=int(body.get("topk_sample_logprobs") or 0),
                target_prompt_logprobs=target,
                prompt_alt_tokens_k=int(body.get("prompt_alt_tokens_k") or 0),
                prompt_logprobs_last_n=int(last_n) if last_n is not None else None,
                record_stability=record,
                prompt_images=images,
            )
            info = scheduler.front.info
            validate_sample_input(item, info.vocab_size, info.context_length)
            worker.check_images(item.prompt, item.prompt_images, "prompt")  # decodes them
        except (codec.CodecError, ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from exc

        def encode_for(request_id: str) -> Callable[[object], tuple[bytes, str]]:
            def encode(result: object) -> tuple[bytes, str]:
                assert isinstance(result, SampleOutput)
                if record and sampler is not None:
                    weights_run = sampler.snapshot_of or (str(model_path) if model_path else None)
                    self._record_stability(
                        stability.make_record(
                            request_id,
                            sampler.session_id,
                            user,
                            sampler.base_model,
                            weights_run,
                            item.prompt,
                            result,
                        )
                    )
                data = codec.encode_sample_response(
                    result,
                    prompt_logprobs_requested=item.prompt_logprobs,
                    topk_prompt_k=item.topk_prompt_logprobs,
                    topk_sample_k=item.topk_sample_logprobs,
                    target_layout=target_layout,
                )
                return data, "proto"

            return encode

        seq_id = body.get("seq_id")
        # A sample of a sampling session with a seq_id joins the session's completion queue
        # (the store numbers it when it finishes; see /retrieve_futures).
        queue = sampler_id if seq_id is not None else None
        rec = self._submit(
            user,
            "sample",
            body,
            scheduler,
            lambda rid: self._op(rid, Sample(item, snapshot_dir), encode_for(rid), queue=queue),
            model_id=queue,
            seq_id=int(seq_id) if seq_id is not None else None,
        )
        ids = [f"{rec.request_id}:{i}" for i in range(item.num_samples)]
        return Future(rec.request_id, sample_sequence_ids=ids)

    def _record_stability(self, rec: StabilityRecord) -> None:
        """Store a sample's sequence record before its result is visible (so a training
        request that names its sequences finds it); sweep when past the disk bound."""
        if not self.store.add_stability_record(rec):
            return
        if self._stability_bytes is None:
            self._stability_bytes = self.store.stability_bytes()
        else:
            self._stability_bytes += rec.size_bytes
        if self._stability_bytes > self.stability_max_bytes:
            self.sweep_stability_records()

    def sweep_stability_records(self) -> int:
        """Expired sequence records out, then the least recently used past the bound."""
        gone = stability.sweep(self.store, self.stability_max_bytes)
        self._stability_bytes = self.store.stability_bytes()
        return gone

    def completion_queue_start(
        self, user: str, sampler_id: str, client_id: int, prev_cursor: int
    ) -> int:
        """For a /retrieve_futures poll (404 for another user's sampler): record the client's
        acknowledgement `prev_cursor` (the SDK's poller sends the last cursor it processed)
        and answer where to read from. A fresh poller (cursor 0) of a client whose poller
        came before starts after what that one acknowledged, as the SDK trims seen events."""
        self.sampler(user, sampler_id)
        acked = self.store.acked_cursor(sampler_id, client_id)
        if prev_cursor > acked:
            self.store.ack_cursor(sampler_id, client_id, prev_cursor)
        return prev_cursor if prev_cursor > 0 else acked

    def join_sampling_session(self, user: str, sampler_id: str) -> int:
        """A clone id for a new client of the user's sampling session (never reused)."""
        self.sampler(user, sampler_id)
        return self.store.join_sampling_session(sampler_id)

    def cancel_future(self, user: str, request_id: str) -> bool:
        """Cancel a sample that has not started: out of its queue, its future failed (category
        user: the client gave it up). One that runs or has finished is left alone, so a
        repeat is harmless. Returns whether it was cancelled now."""
        rec = self.get_future(request_id, user)
        if rec.kind != "sample":
            raise ApiError(
                400,
                f"request {request_id!r} is a {rec.kind} request; only sample requests can be "
                "cancelled (training requests are part of their run's ordered log)",
            )
        if rec.status != "pending":
            return False
        for scheduler in self.schedulers.values():
            op = scheduler.cancel_sample(request_id)
            if op is not None:
                op.fail(UserError("sample request cancelled by its client before it started"))
                return True
        return False


def sampling_params(d: dict[str, Any], default_max_tokens: int = 128) -> SamplingParams:
    stop = d.get("stop")
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list):
        stop = tuple(stop)
    max_tokens = d.get("max_tokens")
    seed = d.get("seed")
    return SamplingParams(
        max_tokens=int(max_tokens) if max_tokens is not None else default_max_tokens,
        temperature=float(d.get("temperature", 1.0)),
        top_k=int(d.get("top_k", -1)),
        top_p=float(d.get("top_p", 1.0)),
        stop=stop,
        seed=int(seed) if seed is not None else None,
    )
