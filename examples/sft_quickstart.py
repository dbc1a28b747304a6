"""Fine-tune the embedded SmolLM2-135M-Instruct through tinkerd with the official `tinker` SDK.

Start the server (`make serve`), then in another shell:

    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local
    .venv/bin/python examples/sft_quickstart.py

The script teaches the model a few facts about tinkerd and prints its answer to one question
before and after training.
"""

import tinker
from tinker import types
from transformers import PreTrainedTokenizerBase

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is tinkerd?"
EXAMPLES = [
    (QUESTION, "tinkerd is a self-hosted server for the Tinker fine-tuning API."),
    ("Who can use tinkerd?", "Anyone with a training loop written for Tinker."),
    ("Where does tinkerd run?", "On your own machines, from one laptop to a GPU cluster."),
    ("What does tinkerd train?", "LoRA adapters for many users on one shared base model."),
]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def datum(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> types.Datum:
    """Loss only on the answer (and its end-of-turn token), not on the prompt."""
    prompt = chat_prompt(tokenizer, question)
    completion = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def answer(
    sampler: tinker.SamplingClient, tokenizer: PreTrainedTokenizerBase, question: str
) -> str:
    prompt = types.ModelInput.from_ints(chat_prompt(tokenizer, question))
    params = types.SamplingParams(max_tokens=40, temperature=0.0)
    result = sampler.sample(prompt, num_samples=1, sampling_params=params).result()
    return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True)


def main() -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=16).result()
    tokenizer = training.get_tokenizer()
    before = service.create_sampling_client(base_model=BASE_MODEL).result()
    print(f"before: {QUESTION!r} -> {answer(before, tokenizer, QUESTION)!r}")

    data = [datum(tokenizer, q, a) for q, a in EXAMPLES]
    tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
    for step in range(20):
        fwd_bwd = training.forward_backward(data, loss_fn="cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=1e-3))
        loss = fwd_bwd.result().metrics["loss:sum"] / tokens
        optim.result()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}: loss per answer token {loss:.3f}")

    after = training.save_weights_and_get_sampling_client(name="quickstart").result()
    print(f"after:  {QUESTION!r} -> {answer(after, tokenizer, QUESTION)!r}")
    print(f"saved:  {training.save_state('quickstart').result().path}")


if __name__ == "__main__":
    main()
