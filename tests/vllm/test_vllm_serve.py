"""`tinkerd serve --vllm-python`: the vLLM sampler pool wired into a live server, driven by the
official SDK (docs/vllm.md). A sampler snapshot of a trained LoRA run is published to vLLM as
adapter files; a plain greedy request runs there, one asking for top-K prompt logprobs stays on
tinkerd's sampler, and both give the same tokens. Needs the vLLM venv (`make vllm-venv` or
TINKERD_VLLM_PYTHON); slow (the engine starts in about a minute)."""

import sys
from pathlib import Path

from tinker import types

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))  # e2e_helpers: servers, SDK data
from e2e_helpers import run_server, sft_datum
from vllm_env import NEEDS_VLLM, VLLM_PYTHON

from tinkerd.constants import EMBEDDED_MODEL

pytestmark = NEEDS_VLLM


def test_samples_route_to_vllm_and_agree(tmp_path: Path) -> None:
    with run_server(Path(EMBEDDED_MODEL), tmp_path, TINKERD_VLLM_PYTHON=str(VLLM_PYTHON)) as server:
        sc = server.client()
        tc = sc.create_lora_training_client(base_model=EMBEDDED_MODEL, rank=8, seed=0).result()
        tok = tc.get_tokenizer()
        text = tok.encode("What is tinkerd? tinkerd is a self-hosted Tinker server.")
        for _ in range(4):
            tc.forward_backward([sft_datum(text)], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(tok.encode("What is tinkerd?"))
        greedy = types.SamplingParams(max_tokens=12, temperature=0.0)

        on_vllm = sampler.sample(prompt, 1, greedy).result()
        assert server.count_in_log("vLLM sampled 1 requests") == 1
        on_tinkerd = sampler.sample(
            prompt, 1, greedy, include_prompt_logprobs=True, topk_prompt_logprobs=2
        ).result()
        assert server.count_in_log("vLLM sampled") == 1  # top-K prompt logprobs stay here
        assert on_vllm.sequences[0].tokens == on_tinkerd.sequences[0].tokens
        assert len(on_vllm.sequences[0].tokens) > 0
        for a, b in zip(
            on_vllm.sequences[0].logprobs, on_tinkerd.sequences[0].logprobs, strict=True
        ):
            assert abs(a - b) < 1e-3
        # The base model samples on vLLM too.
        base = sc.create_sampling_client(base_model=EMBEDDED_MODEL).result()
        assert base.sample(prompt, 1, greedy).result().sequences[0].tokens
        assert server.count_in_log("vLLM sampled") == 2
