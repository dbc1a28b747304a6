"""The vLLM side of tinkerd's vLLM sampler pool: a program run by the vLLM venv's python.

vLLM pins other transformers/fastapi versions than tinkerd, so it lives in its own venv and
this file imports only the standard library and vllm (it is run by path, never imported by
tinkerd). The control plane (`tinkerd/engine/vllm_sampler.py`) starts it as

    <vllm venv>/bin/python tinkerd/vllm_runner.py '<JSON engine settings>'

and speaks JSON lines: one request per line on stdin, one answer per line on the protocol
stream (the process's original stdout; everything libraries print goes to stderr instead).

First line out: {"ready": true, "vllm": VERSION, "device": "cpu" | "cuda" | ...} once the
engine is up (or {"ready": false, "error": ...}). Then, per request line {"id": N,
"requests": [...]}, one line {"id": N, "ok": true, "outputs": [...]} or {"id": N, "ok":
false, "error": TEXT}, as soon as its last request is done. Requests are batched
continuously: a line read while others decode joins the running engine at its next step, so
answers can come in another order than the lines.
A request:

    {"prompt": [ids], "max_tokens": int, "temperature": float, "seed": int | null,
     "stop_token_ids": [ids], "stop": [strings], "prompt_logprobs": bool,
     "lora": {"name": str, "id": int, "path": str} | null}

An output: {"tokens": [ids], "logprobs": [floats], "finish": "stop" | "length",
"prompt_logprobs": [null, floats...] | null}. Sampled-token logprobs are vLLM's
processed_logprobs (log_softmax(z / T); T = 1 for greedy), prompt logprobs are at
temperature 1. EOS handling is the caller's: vLLM's own EOS stop is off (`ignore_eos`) and the
caller lists every stopping id. {"op": "abort", "id": N}: the control side stopped waiting
for line N (its request timeout): its requests leave the engine (or the queue) and it gets no
answer. End of input (or {"op": "shutdown"}) ends the program.
"""

import json
import os
import queue
import sys
import threading
import traceback
from typing import Any, TextIO


def _protocol_stream() -> TextIO:
    """Keep the original stdout for the protocol and point fd 1 at stderr, so that whatever
    vLLM or its engine processes print can never corrupt an answer line."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _engine(settings: dict[str, Any]) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": settings["model"],
        "tokenizer": settings["model"],
        "dtype": settings.get("dtype", "float32"),
        "enable_lora": True,
        "max_lora_rank": int(settings.get("max_lora_rank", 64)),
        "max_loras": int(settings.get("max_loras", 4)),
        "max_cpu_loras": int(settings.get("max_cpu_loras", 16)),
        # Tinker's sampled-token logprob: log_softmax(z / T) (see the module docstring).
        "logprobs_mode": "processed_logprobs",
        "seed": int(settings.get("seed", 0)),
    }
    for key in ("max_model_len", "enforce_eager", "gpu_memory_utilization", "max_num_seqs"):
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    return LLM(**kwargs)


def _params(req: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    stop = list(req.get("stop") or [])
    return SamplingParams(
        n=1,
        temperature=float(req["temperature"]),
        max_tokens=int(req["max_tokens"]),
        seed=req.get("seed"),
        logprobs=0,
        prompt_logprobs=0 if req.get("prompt_logprobs") else None,
        ignore_eos=True,
        stop_token_ids=list(req.get("stop_token_ids") or []),
        stop=stop or None,
        include_stop_str_in_output=True,
        # Text is only needed to find stop strings.
        detokenize=bool(stop),
        skip_special_tokens=False,
    )


def _lora(spec: dict[str, Any] | None) -> Any:
    if spec is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(spec["name"], int(spec["id"]), spec["path"])


def _value(entry: Any, token: int) -> float | None:
    """The logprob of `token` in one position's {id: Logprob} mapping."""
    if entry is None:
        return None
    got = entry.get(token)
    if got is None:
        return None
    return float(got.logprob)  # -inf passes through (Python's json writes -Infinity)


def _output(req: dict[str, Any], result: Any) -> dict[str, Any]:
    completion = result.outputs[0]
    tokens = [int(t) for t in completion.token_ids]
    entries = completion.logprobs or [None] * len(tokens)
    logprobs = [_value(e, t) for e, t in zip(entries, tokens, strict=True)]
    prompt_logprobs = None
    if req.get("prompt_logprobs"):
        prompt = req["prompt"]
        got = result.prompt_logprobs or [None] * len(prompt)
        prompt_logprobs = [None] + [_value(e, t) for e, t in zip(got[1:], prompt[1:], strict=True)]
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "finish": "length" if completion.finish_reason == "length" else "stop",
        "prompt_logprobs": prompt_logprobs,
    }


class _Answer:
    """One request line: its outputs as they finish."""

    def __init__(self, message_id: int, size: int) -> None:
        self.id = message_id
        self.outputs: list[dict[str, Any] | None] = [None] * size
        self.left = size


class _Batcher:
    """Continuous batching over vLLM's engine: requests join at the next step.

    vllm 0.32 with enable_lora computes prompt logprobs through the LoRA logits layer with the
    batch's per-request mapping (one row per request), which fails against the prompt's
    positions (einsum size mismatch, the engine dies) unless the batch has a single request.
    So a request with prompt logprobs waits until the engine is empty and runs alone, and
    requests arriving meanwhile wait for it (in arrival order).
    """

    def __init__(self, llm: Any, out: TextIO) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.out = out
        self.inflight: dict[str, tuple[_Answer, int, dict[str, Any]]] = {}  # vLLM id -> slot
        self.held: list[tuple[_Answer, int, dict[str, Any]]] = []  # waiting for an empty engine
        self.alone = False  # a prompt-logprobs request is in the engine

    def busy(self) -> bool:
        return bool(self.inflight or self.held)

    def add(self, message: dict[str, Any]) -> None:
        requests = message["requests"]
        answer = _Answer(message["id"], len(requests))
        if not requests:
            _send(self.out, {"id": answer.id, "ok": True, "outputs": []})
            return
        self.held.extend((answer, i, r) for i, r in enumerate(requests))
        self._release()

    def _release(self) -> None:
        """Move held requests into the engine: plain ones while no alone one runs; an alone
        one only into an empty engine."""
        while self.held and not self.alone:
            req = self.held[0][2]
            if req.get("prompt_logprobs"):
                if self.inflight:
                    return
                self.alone = True
                self._enqueue([self.held.pop(0)])
                return
            plain = 0
            while plain < len(self.held) and not self.held[plain][2].get("prompt_logprobs"):
                plain += 1
            batch, self.held = self.held[:plain], self.held[plain:]
            self._enqueue(batch)

    def _enqueue(self, batch: list[tuple[_Answer, int, dict[str, Any]]]) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        for slot in batch:
            answer, i, req = slot
            key = f"{answer.id}:{i}"  # outputs carry this id back
            params = _params(req)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            try:
                self.engine.add_request(
                    key,
                    TokensPrompt(prompt_token_ids=list(req["prompt"])),
                    params,
                    lora_request=_lora(req.get("lora")),
                )
            except Exception as exc:  # this line's request is bad: fail that line only
                traceback.print_exc()
                self._fail(answer, f"{type(exc).__name__}: {exc}")
                continue
            self.inflight[key] = slot

    def _fail(self, answer: _Answer, error: str) -> None:
        if answer.left < 0:
            return  # already answered
        self._drop(answer)
        _send(self.out, {"id": answer.id, "ok": False, "error": error, "fatal": False})

    def abort(self, message_id: int) -> None:
        """Line `message_id`'s requests leave the engine and the queue, unanswered."""
        slots = [*self.inflight.values(), *self.held]
        answer = next((s[0] for s in slots if s[0].id == message_id and s[0].left >= 0), None)
        if answer is not None:
            dropped = self._drop(answer)
            print(f"aborted request line {message_id} ({dropped} requests)", file=sys.stderr)
        self._release()

    def _drop(self, answer: _Answer) -> int:
        """Take the line's requests out of the engine and the queue; mark it answered."""
        answer.left = -1
        drop = [k for k, slot in self.inflight.items() if slot[0] is answer]
        if drop:
            self.engine.abort_request(drop)
        for key in drop:
            del self.inflight[key]
        held = len(self.held)
        self.held = [slot for slot in self.held if slot[0] is not answer]
        self.alone = any(s[2].get("prompt_logprobs") for s in self.inflight.values())
        return len(drop) + held - len(self.held)

    def step(self) -> None:
        for result in self.engine.step():
            if not result.finished or result.request_id not in self.inflight:
                continue
            answer, i, req = self.inflight.pop(result.request_id)
            if req.get("prompt_logprobs"):
                self.alone = False
            if answer.left < 0:
                continue
            answer.outputs[i] = _output(req, result)
            answer.left -= 1
            if answer.left == 0:
                _send(self.out, {"id": answer.id, "ok": True, "outputs": answer.outputs})
        self._release()

    def fail_all(self, error: str, fatal: bool) -> None:
        answers = {id(s[0]): s[0] for s in [*self.inflight.values(), *self.held]}
        for answer in answers.values():
            if answer.left >= 0:
                answer.left = -1
                _send(self.out, {"id": answer.id, "ok": False, "error": error, "fatal": fatal})
        self.inflight.clear()
        self.held.clear()
        self.alone = False


def _read_lines(lines: "queue.Queue[str | None]") -> None:
    for line in sys.stdin:
        lines.put(line)
    lines.put(None)


def main() -> int:
    out = _protocol_stream()
    settings = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    try:
        import vllm

        llm = _engine(settings)
    except Exception as exc:
        traceback.print_exc()
        _send(out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    from vllm.platforms import current_platform

    _send(out, {"ready": True, "vllm": vllm.__version__, "device": current_platform.device_type})
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(lines,), daemon=True).start()
    batcher = _Batcher(llm, out)
    while True:
        # Wait for input only while nothing decodes; otherwise take what has arrived.
        try:
            line = lines.get(block=not batcher.busy())
        except queue.Empty:
            line = ""
        while line:
            if line.strip():
                message = json.loads(line)
                if message.get("op") == "shutdown":
                    return 0
                if message.get("op") == "abort":
                    batcher.abort(message["id"])
                else:
                    batcher.add(message)
            try:
                line = lines.get_nowait()
            except queue.Empty:
                line = ""
        if line is None:
            return 0
        if not batcher.inflight:
            continue
        try:
            if not batcher.engine.has_unfinished_requests():
                raise RuntimeError("vLLM has none of the requests it was given")
            batcher.step()
        except Exception as exc:
            traceback.print_exc()
            # A dead engine answers every later request with the same error: exit instead,
            # so the control side sees the runner gone (and routes to tinkerd's sampler).
            fatal = type(exc).__name__ == "EngineDeadError"
            batcher.fail_all(f"{type(exc).__name__}: {exc}", fatal)
            if fatal:
                return 2


if __name__ == "__main__":
    sys.exit(main())
