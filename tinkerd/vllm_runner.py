"""The vLLM side of tinkerd's vLLM sampler pool: a program run by the vLLM venv's python.

vLLM pins other transformers/fastapi versions than tinkerd, so it lives in its own venv and
this file imports only the standard library and vllm (it is run by path, never imported by
tinkerd). The control plane (`tinkerd/engine/vllm_sampler.py`) starts it as

    <vllm venv>/bin/python tinkerd/vllm_runner.py '<JSON engine settings>'

and speaks JSON lines: one request per line on stdin, one answer per line on the protocol
stream (the process's original stdout; everything libraries print goes to stderr instead).

First line out: {"ready": true, "vllm": VERSION} once the engine is up (or {"ready": false,
"error": ...}). Then, per request line {"id": N, "requests": [...]}, one line {"id": N, "ok":
true, "outputs": [...]} or {"id": N, "ok": false, "error": TEXT}. A request:

    {"prompt": [ids], "max_tokens": int, "temperature": float, "seed": int | null,
     "stop_token_ids": [ids], "stop": [strings], "prompt_logprobs": bool,
     "lora": {"name": str, "id": int, "path": str} | null}

An output: {"tokens": [ids], "logprobs": [floats], "finish": "stop" | "length",
"prompt_logprobs": [null, floats...] | null}. Sampled-token logprobs are vLLM's
processed_logprobs (log_softmax(z / T); T = 1 for greedy), prompt logprobs are at
temperature 1. EOS handling is the caller's: vLLM's own EOS stop is off (`ignore_eos`) and the
caller lists every stopping id. End of input (or {"op": "shutdown"}) ends the program.
"""

import json
import os
import sys
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


def _generate(llm: Any, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All requests without prompt logprobs in one batch; each with them alone.

    vllm 0.32 with enable_lora computes prompt logprobs through the LoRA logits layer with the
    batch's per-request mapping (one row per request), which fails against the prompt's
    positions (einsum size mismatch, the engine dies) unless the batch has a single request.
    """
    outputs: list[dict[str, Any] | None] = [None] * len(requests)
    plain = [i for i, r in enumerate(requests) if not r.get("prompt_logprobs")]
    groups = [plain] if plain else []
    groups += [[i] for i, r in enumerate(requests) if r.get("prompt_logprobs")]
    for group in groups:
        for i, out in zip(group, _run(llm, [requests[i] for i in group]), strict=True):
            outputs[i] = out
    return [out for out in outputs if out is not None]


def _run(llm: Any, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from vllm.inputs import TokensPrompt

    results = llm.generate(
        [TokensPrompt(prompt_token_ids=list(r["prompt"])) for r in requests],
        sampling_params=[_params(r) for r in requests],
        lora_request=[_lora(r.get("lora")) for r in requests],
        use_tqdm=False,
    )
    return [_output(r, res) for r, res in zip(requests, results, strict=True)]


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
    _send(out, {"ready": True, "vllm": vllm.__version__})
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if message.get("op") == "shutdown":
            break
        try:
            outputs = _generate(llm, message["requests"])
            _send(out, {"id": message["id"], "ok": True, "outputs": outputs})
        except Exception as exc:
            traceback.print_exc()
            # A dead engine answers every later request with the same error: exit instead,
            # so the control side sees the runner gone (and routes to tinkerd's sampler).
            fatal = type(exc).__name__ == "EngineDeadError"
            error = f"{type(exc).__name__}: {exc}"
            _send(out, {"id": message["id"], "ok": False, "error": error, "fatal": fatal})
            if fatal:
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
