"""Which sample requests the vLLM pool may serve (fast; no vLLM needed): `vllm_unsupported`,
the fresh LoRA id per adapter version, and a runner that cannot start."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tinkerd.engine.vllm_sampler import (
    VllmConfig,
    VllmError,
    VllmProcess,
    _LoraVersions,
    vllm_unsupported,
)
from tinkerd.model.types import ImageInput, SampleInput, SamplingParams

PROMPT = [1, 2, 3, 4]


def item(**fields: object) -> SampleInput:
    params = fields.pop("params", SamplingParams(max_tokens=8, temperature=1.0))
    return SampleInput(fields.pop("adapter_id", None), PROMPT, params, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=3),
        SamplingParams(temperature=0.0),
        # Greedy ignores truncation (token and temperature-1 logprob are the same either way).
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5),
        SamplingParams(temperature=1.0, stop=("\n\n", "User:")),
        SamplingParams(temperature=1.0, stop=(2, 7)),
        SamplingParams(temperature=1.0, stop=()),
    ],
)
def test_served_by_vllm(params: SamplingParams) -> None:
    assert vllm_unsupported(item(params=params)) is None
    assert vllm_unsupported(item(params=params, adapter_id="run:1", num_samples=8)) is None
    served = item(params=params, prompt_logprobs=True, prompt_logprobs_last_n=2)
    assert vllm_unsupported(served) is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"params": SamplingParams(temperature=1.0, top_k=20)}, "top-k/top-p"),
        ({"params": SamplingParams(temperature=0.7, top_p=0.9)}, "top-k/top-p"),
        ({"params": SamplingParams(temperature=1e-7)}, "treats it as greedy"),
        ({"topk_sample_logprobs": 3}, "topk_sample_logprobs"),
        ({"prompt_logprobs": True, "topk_prompt_logprobs": 5}, "topk_prompt_logprobs"),
        (
            {"target_prompt_logprobs": torch.zeros((len(PROMPT) - 1, 2), dtype=torch.int64)},
            "target_prompt_logprobs",
        ),
        ({"prompt_alt_tokens_k": 4}, "prompt_alt_tokens_k"),
        ({"record_stability": True}, "record_stability_info"),
        (
            {"prompt_images": [ImageInput(position=1, num_tokens=2, data=b"", format="png")]},
            "image input",
        ),
        ({"on_token": lambda index, choice: None}, "token streaming"),
    ],
)
def test_routed_to_tinkerd(fields: dict[str, object], reason: str) -> None:
    got = vllm_unsupported(item(**fields))
    assert got is not None and reason in got, got


def write_weights(directory: Path, payload: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "adapter_model.safetensors.tmp"
    tmp.write_bytes(payload)
    tmp.replace(directory / "adapter_model.safetensors")  # a new file, as write_adapter does


def test_fresh_lora_id_per_adapter_version(tmp_path: Path) -> None:
    """vLLM caches an adapter by its int id: a rewritten directory must get a new one, an
    unchanged one keeps its id, and different adapters never share one."""
    versions = _LoraVersions()
    a, b = tmp_path / "a", tmp_path / "b"
    write_weights(a, b"one")
    write_weights(b, b"one")
    first = versions.request("run-a", a)
    assert first["path"] == str(a)
    assert versions.request("run-a", a) == first
    other = versions.request("run-b", b)
    assert other["id"] != first["id"]
    write_weights(a, b"second version")
    rewritten = versions.request("run-a", a)
    assert rewritten["id"] not in (first["id"], other["id"])
    assert rewritten["name"] != first["name"]
    with pytest.raises(ValueError, match="no adapter"):
        versions.request("run-c", tmp_path / "missing")


def test_runner_that_cannot_start_fails_with_its_reason(tmp_path: Path) -> None:
    """tinkerd's own interpreter has no vllm: the runner answers not-ready and exits, and the
    error names the cause and the log."""
    config = VllmConfig(
        python=Path(sys.executable),
        model_dir=tmp_path,
        start_timeout=120,
        log_path=tmp_path / "vllm.log",
    )
    with pytest.raises(VllmError, match="failed to start: ModuleNotFoundError") as err:
        VllmProcess(config)
    assert str(tmp_path / "vllm.log") in str(err.value)


def test_hung_runner_times_requests_out(tmp_path: Path) -> None:
    """A runner that starts and then never answers (alive, reading its input): each request
    line fails after `request_timeout`, through `generate` and through `send`'s callback (the
    pool's path), the runner is told to abort each, and closing it still ends the process."""
    hung = tmp_path / "hung-python"
    seen = tmp_path / "lines"
    ready = '{"ready": true, "vllm": "hung", "device": "cpu"}'
    # Reads its input (keeping each line) and keeps its output open, never answering.
    hung.write_text(
        f"#!/bin/sh\necho '{ready}'\nwhile read -r line; do echo \"$line\" >> {seen}; done\n"
    )
    hung.chmod(0o755)
    config = VllmConfig(python=hung, model_dir=tmp_path, request_timeout=0.5, start_timeout=60)
    process = VllmProcess(config)
    try:
        assert process.version == "hung" and process.alive
        answers: list[object] = []
        process.send([{"prompt": PROMPT}], answers.append)
        with pytest.raises(VllmError, match="no answer within the request timeout"):
            process.generate([{"prompt": PROMPT}])
        assert len(answers) == 1 and isinstance(answers[0], VllmError)
        assert process.alive  # timed out, not dead: later requests are still sent
        # The aborts were written before the callers heard of the timeouts; the script may
        # not have copied them to its file yet.
        deadline = time.monotonic() + 30
        while True:
            text = seen.read_text() if seen.exists() else ""
            lines = [json.loads(line) for line in text.splitlines()]
            sent = [line["id"] for line in lines if "requests" in line]
            aborted = [line["id"] for line in lines if line.get("op") == "abort"]
            if len(aborted) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(sent) == 2 and sorted(aborted) == sorted(sent)
    finally:
        process.close(timeout=10)
    assert process.proc.poll() is not None
