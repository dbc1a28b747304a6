"""OpenAI- and Anthropic-compatible inference (`/oai/api/v1`, `/anthropic/api`) against a live
`tinkerd serve`, driven by the official `openai` and `anthropic` SDKs.

Covers chat and legacy completions, streaming and not, n > 1, seeds, logprobs, stop strings,
usage, a trained checkpoint saved with the tinker SDK as `model` (and `<base>;<path>`), the
same answers as the SDK's own sampler, isolation (another user's checkpoint answers exactly
like a missing one), auth, and 400s naming the field in each API's error shape.
"""

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import tinker
from e2e_helpers import TINKERD, Server, adam, run_server, sft_datum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinker import types

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

KEY, OTHER_KEY = "tml-inference", "tml-inference-other"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{server.base_url}/oai/api/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def claude(server: Server) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(
        base_url=f"{server.base_url}/anthropic/api", api_key=KEY, max_retries=0
    )
    yield client
    client.close()


@pytest.fixture(scope="module")
def trained(
    server: Server, clients: Callable[[str], tinker.ServiceClient], tokenizer
) -> dict[str, str]:
    """A LoRA run of KEY's trained on one chat, saved as sampler weights and as state."""
    tc = clients(KEY).create_lora_training_client(base_model=server.model, rank=4, seed=3)
    tc = tc.result()
    chat = [*HELLO, {"role": "assistant", "content": "parrot parrot parrot"}]
    seq = tokenizer.encode(tokenizer.apply_chat_template(chat, tokenize=False))
    for _ in range(6):
        tc.forward_backward([sft_datum(seq)], "cross_entropy").result()
        tc.optim_step(adam(5e-2)).result()
    return {
        "sampler": tc.save_weights_for_sampler("inference").result().path,
        "state": tc.save_state("inference").result().path,
    }


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append((name, "\n".join(data)))
            name, data = None, []
    return events


# -- chat completions ----------------------------------------------------------------------------


def test_models_lists_the_served_models(oai: openai.OpenAI, server: Server) -> None:
    assert [m.id for m in oai.models.list().data] == [server.model]


def test_chat_completion(oai: openai.OpenAI, server: Server, tokenizer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}],
        },
    ]
    out = oai.chat.completions.create(model=server.model, messages=messages, max_tokens=7, seed=1)
    assert out.object == "chat.completion" and out.model == server.model
    assert out.id.startswith("chatcmpl-")
    [choice] = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    rendered = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi\n!"},
    ]
    prompt = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert 1 <= out.usage.completion_tokens <= 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 7


def test_seed_reproducible_and_n(oai: openai.OpenAI, server: Server) -> None:
    def ask(seed: int, n: int = 1) -> list[str]:
        out = oai.chat.completions.create(
            model=server.model, messages=HELLO, max_tokens=12, seed=seed, n=n, temperature=1.0
        )
        assert [c.index for c in out.choices] == list(range(n))
        return [c.message.content or "" for c in out.choices]

    assert ask(5) == ask(5)
    three = ask(5, n=3)
    assert three == ask(5, n=3) and three[0] == ask(5)[0]
    assert len(set(three)) > 1  # each sample draws with its own generator
    greedy = [
        oai.chat.completions.create(
            model=server.model, messages=HELLO, max_tokens=8, temperature=0
        ).choices[0]
        for _ in range(2)
    ]
    assert greedy[0].message.content == greedy[1].message.content


def test_chat_logprobs_match_the_tinker_sampler(
    oai: openai.OpenAI, server: Server, clients, tokenizer
) -> None:
    """Same prompt, seed and settings: the same tokens and logprobs as the SDK's sampler (one
    engine, one batch queue)."""
    out = oai.chat.completions.create(
        model=server.model, messages=HELLO, max_tokens=6, seed=11, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:
        tops = [a.logprob for a in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-6
        assert isinstance(t.bytes, list) and all(0 <= b < 256 for b in t.bytes)
    prompt = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    sampler = clients(KEY).create_sampling_client(base_model=server.model).result()
    params = types.SamplingParams(max_tokens=6, seed=11, temperature=1.0)
    [seq] = sampler.sample(types.ModelInput.from_ints(ids), 1, params).result().sequences
    eos = tokenizer.eos_token_id
    want = [lp for tok, lp in zip(seq.tokens, seq.logprobs, strict=True) if tok != eos]
    assert [t.logprob for t in content] == pytest.approx(want[: len(content)], abs=1e-4)
    assert out.usage.completion_tokens == len(seq.tokens)


def test_chat_streaming_equals_non_streaming(oai: openai.OpenAI, server: Server) -> None:
    kwargs = {"model": server.model, "messages": HELLO, "max_tokens": 10, "seed": 4, "n": 2}
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(
        oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    texts, finish, roles = ["", ""], [None, None], set()
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
            if ch.delta.role:
                roles.add(ch.index)
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices] and roles == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_chat_stream_ends_with_done(server: Server) -> None:
    body = {"model": server.model, "messages": HELLO, "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.base_url}/oai/api/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == (None, "[DONE]")
    first = json.loads(events[0][1])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[-2][1])["choices"][0]["finish_reason"] in ("stop", "length")


def _stop_in(text: str) -> str | None:
    """Two characters from inside `text` (no U+FFFD), to stop at, or None."""
    return next(
        (text[k : k + 2] for k in range(1, len(text) - 2) if "\ufffd" not in text[k : k + 2]),
        None,
    )


def _chat_chunks(chunks: list, n: int) -> tuple[list[str], list, list]:
    """Each choice's text, finish reason and logprobs.content, from chat chunks."""
    texts, finish, logprobs = [""] * n, [None] * n, [[] for _ in range(n)]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
            if ch.logprobs and ch.logprobs.content:
                logprobs[ch.index] += ch.logprobs.content
    return texts, finish, logprobs


def test_streams_add_up_to_the_answer_with_stops(
    oai: openai.OpenAI, claude: anthropic.Anthropic, server: Server
) -> None:
    """With stop strings and n=2, each choice's streamed deltas add up to exactly the
    non-streamed text, with the same finish reasons and the same per-token logprobs (chat,
    legacy completions, Anthropic messages)."""
    base = {"model": server.model, "messages": HELLO, "max_tokens": 24, "seed": 7, "n": 2}
    free = oai.chat.completions.create(**base)
    stop = _stop_in(free.choices[0].message.content or "") or "zz"
    for stops in ([stop], [stop, "q"]):
        kwargs = {**base, "stop": stops, "logprobs": True, "top_logprobs": 2}
        whole = oai.chat.completions.create(**kwargs)
        texts, finish, logprobs = _chat_chunks(
            list(oai.chat.completions.create(**kwargs, stream=True)), 2
        )
        assert texts == [c.message.content for c in whole.choices]
        assert finish == [c.finish_reason for c in whole.choices]
        for got, want in zip(logprobs, [c.logprobs.content for c in whole.choices], strict=True):
            assert [t.token for t in got] == [t.token for t in want]
            assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-4)
            assert [len(t.top_logprobs) for t in got] == [len(t.top_logprobs) for t in want]
    assert whole.choices[0].finish_reason == "stop"  # the stop string was met
    # Legacy completions: two prompts x n=2, interleaved by index.
    kwargs = {
        "model": server.model,
        "prompt": ["abc", "hello"],
        "max_tokens": 24,
        "seed": 7,
        "n": 2,
        "stop": [stop],
        "logprobs": 1,
    }
    whole = oai.completions.create(**kwargs)
    texts, finish = [""] * 4, [None] * 4
    tokens: list[list] = [[] for _ in range(4)]
    offsets: list[list] = [[] for _ in range(4)]
    for chunk in oai.completions.create(**kwargs, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            finish[ch.index] = ch.finish_reason or finish[ch.index]
            if ch.logprobs:
                tokens[ch.index] += ch.logprobs.token_logprobs
                offsets[ch.index] += ch.logprobs.text_offset
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    for got, want in zip(tokens, [c.logprobs.token_logprobs for c in whole.choices], strict=True):
        assert got == pytest.approx(want, abs=1e-4)  # batches may differ: float noise
    assert offsets == [c.logprobs.text_offset for c in whole.choices]
    # Anthropic, with and without the stop sequence.
    for stops in ([], [stop]):
        ask = {
            "model": server.model,
            "max_tokens": 24,
            "messages": HELLO,
            "stop_sequences": stops,
            "extra_body": {"seed": 7},
        }
        message = claude.messages.create(**ask)
        with claude.messages.stream(**ask) as stream:
            pieces = [text for text in stream.text_stream]
            streamed = stream.get_final_message()
        assert "".join(pieces) == message.content[0].text == streamed.content[0].text
        assert (streamed.stop_reason, streamed.stop_sequence) == (
            message.stop_reason,
            message.stop_sequence,
        )


def test_tokens_are_streamed_as_they_are_sampled(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A long generation's deltas arrive while it runs, not all at its end. The server's
    scheduler turns decode for at most 1 ms (`TINKERD_SAMPLE_SLICE_MS`), so it streams every
    few tokens. What is asserted needs no absolute duration: the time from the first content
    delta to the last is at least a quarter of how long the same generation takes to decode
    (non-streamed, 400 tokens minus 1 token, best of 3 each). Sending everything at the end
    would put every delta within a millisecond of the last."""
    with run_server(tiny_model_dir, tmp_path, TINKERD_SAMPLE_SLICE_MS="1") as srv:
        oai = openai.OpenAI(base_url=f"{srv.base_url}/oai/api/v1", api_key=KEY, max_retries=0)
        for seed in range(20):  # a seed that runs to max_tokens (the tiny model may draw EOS)
            body = {
                "model": srv.model,
                "messages": HELLO,
                "max_tokens": 400,
                "temperature": 1.0,
                "seed": seed,
            }
            if oai.chat.completions.create(**body).choices[0].finish_reason == "length":
                break
        else:
            pytest.skip("every seed drew EOS early")

        def best_of_3(max_tokens: int) -> float:
            times = []
            for _ in range(3):
                start = time.monotonic()
                oai.chat.completions.create(**{**body, "max_tokens": max_tokens})
                times.append(time.monotonic() - start)
            return min(times)

        decode = best_of_3(400) - best_of_3(1)
        url = f"{srv.base_url}/oai/api/v1/chat/completions"
        headers = {"Authorization": f"Bearer {KEY}"}
        arrivals, text = [], ""
        with httpx.stream(
            "POST", url, json={**body, "stream": True}, headers=headers, timeout=120
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                [choice] = json.loads(line[5:])["choices"]
                if choice["delta"].get("content"):
                    arrivals.append(time.monotonic())
                    text += choice["delta"]["content"]
        assert text == oai.chat.completions.create(**body).choices[0].message.content
        oai.close()
    assert len(arrivals) >= 8
    spread = arrivals[-1] - arrivals[0]
    assert spread >= decode / 4, f"deltas over {spread:.3f} s of a {decode:.3f} s decode"


def _ascii_in(text: str) -> str | None:
    return next((ch for ch in text[1:] if ch.isascii() and ch.isalnum()), None)


def test_stop_strings(oai: openai.OpenAI, claude: anthropic.Anthropic, server: Server) -> None:
    """A stop string ends the text just before it (finish_reason stop; Anthropic: stop_reason
    stop_sequence naming it); usage still counts every sampled token."""
    for seed in range(20):
        free = oai.chat.completions.create(
            model=server.model, messages=HELLO, max_tokens=24, seed=seed
        )
        text = free.choices[0].message.content or ""
        stop = _ascii_in(text)
        if stop:
            break
    else:
        pytest.skip("the tiny model wrote no ASCII letter in 20 tries")
    cut = oai.chat.completions.create(
        model=server.model, messages=HELLO, max_tokens=24, seed=seed, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    message = claude.messages.create(
        model=server.model,
        max_tokens=24,
        messages=HELLO,
        stop_sequences=[stop],
        extra_body={"seed": seed},
    )
    assert message.content[0].text == text[: text.index(stop)]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


# -- legacy completions ------------------------------------------------------------------------


def test_completions(oai: openai.OpenAI, server: Server, tokenizer, clients) -> None:
    ids = tokenizer.encode("the quick brown fox")
    out = oai.completions.create(
        model=server.model, prompt=[ids, ids[:3]], max_tokens=5, n=2, seed=2, logprobs=2
    )
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == len(ids) + 3
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        # top 2 and the sampled token, by text (bytes of partial characters share one)
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
        assert lp.text_offset == sorted(lp.text_offset)
    sampler = clients(KEY).create_sampling_client(base_model=server.model).result()
    params = types.SamplingParams(max_tokens=5, seed=2, temperature=1.0)
    res = sampler.sample(types.ModelInput.from_ints(ids), 2, params).result()
    for c, seq in zip(out.choices[:2], res.sequences, strict=True):
        n = len(c.logprobs.token_logprobs)
        assert c.logprobs.token_logprobs == pytest.approx(seq.logprobs[:n], abs=1e-4)
    # A text prompt, echoed, and the same by streaming.
    text = oai.completions.create(model=server.model, prompt="abc", max_tokens=4, seed=9, echo=True)
    assert text.choices[0].text.startswith("abc") and text.usage.prompt_tokens == 3
    streamed = "".join(
        ch.text
        for chunk in oai.completions.create(
            model=server.model, prompt="abc", max_tokens=4, seed=9, echo=True, stream=True
        )
        for ch in chunk.choices
    )
    assert streamed == text.choices[0].text
    default = oai.completions.create(model=server.model, prompt="abc", seed=1)
    assert default.usage.completion_tokens <= 16  # the legacy endpoint's default max_tokens


# -- anthropic messages ---------------------------------------------------------------------------


def test_messages(claude: anthropic.Anthropic, server: Server) -> None:
    kwargs = {
        "model": server.model,
        "max_tokens": 9,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "extra_body": {"seed": 3, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
    }
    message = claude.messages.create(**kwargs)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == server.model
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.content[0].type == "text"
    assert 1 <= message.usage.output_tokens <= 9
    counted = claude.messages.count_tokens(
        model=server.model, system=kwargs["system"], messages=kwargs["messages"]
    )
    assert counted.input_tokens == message.usage.input_tokens
    with claude.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == message.content[0].text
    assert streamed.stop_reason == message.stop_reason
    assert streamed.usage.output_tokens == message.usage.output_tokens
    # A final assistant message is a prefill: the answer continues it (one more prompt token).
    prefilled = claude.messages.count_tokens(
        model=server.model,
        system=kwargs["system"],
        messages=[*kwargs["messages"], {"role": "assistant", "content": "o"}],
    )
    assert prefilled.input_tokens == counted.input_tokens + 1


def test_raw_message_events(server: Server) -> None:
    body = {"model": server.model, "max_tokens": 4, "messages": HELLO, "stream": True}
    url = f"{server.base_url}/anthropic/api/v1/messages"
    with httpx.stream("POST", url, json=body, headers={"x-api-key": KEY}, timeout=60) as response:
        assert response.status_code == 200
        events = sse_events(response)
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) <= {"content_block_delta"}
    for name, data in events:
        assert json.loads(data)["type"] == name
    delta = json.loads(events[-2][1])
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 1 <= delta["usage"]["output_tokens"] <= 4


# -- checkpoints as models ------------------------------------------------------------------------


def test_trained_checkpoint_as_model(
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    server: Server,
    trained: dict[str, str],
    clients,
    tokenizer,
) -> None:
    """A sampler checkpoint (or training state) saved with the tinker SDK answers as `model`,
    alone or as `<base>;<path>`, exactly as the SDK's sampling client of that path does."""
    prompt = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    sampler = clients(KEY).create_sampling_client(model_path=trained["sampler"]).result()
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    [seq] = sampler.sample(types.ModelInput.from_ints(ids), 1, params).result().sequences
    want = tokenizer.decode([t for t in seq.tokens if t != tokenizer.eos_token_id])
    base = oai.chat.completions.create(
        model=server.model, messages=HELLO, max_tokens=8, temperature=0
    )
    assert base.choices[0].message.content != want  # the checkpoint's answer is its own
    for model in (
        trained["sampler"],
        f"{server.model};{trained['sampler']}",
        trained["state"],
    ):
        out = oai.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
        assert out.model == model and out.choices[0].message.content == want
    message = claude.messages.create(
        model=trained["sampler"], max_tokens=8, messages=HELLO, extra_body={"temperature": 0}
    )
    assert message.content[0].text == want


def test_other_users_checkpoint_is_not_found(
    server: Server, trained: dict[str, str], tokenizer
) -> None:
    """Another key's checkpoint answers exactly like one that does not exist, in both APIs."""
    ghost = trained["sampler"].replace(trained["sampler"].split("/")[2], "0" * 8 + ":train:0")
    intruder = openai.OpenAI(
        base_url=f"{server.base_url}/oai/api/v1", api_key=OTHER_KEY, max_retries=0
    )
    bodies = []
    for path in (trained["sampler"], ghost, f"{server.model};{trained['sampler']}"):
        with pytest.raises(openai.NotFoundError) as err:
            intruder.chat.completions.create(model=path, messages=HELLO, max_tokens=2)
        bodies.append(json.dumps(err.value.body).replace(path.split(";")[-1], "<path>"))
    assert bodies[0] == bodies[1] == bodies[2] and "not found" in bodies[0]
    claude = anthropic.Anthropic(
        base_url=f"{server.base_url}/anthropic/api", api_key=OTHER_KEY, max_retries=0
    )
    answers = []
    for path in (trained["sampler"], ghost):
        for call in (claude.messages.create, claude.messages.count_tokens):
            kwargs = {"max_tokens": 2} if call == claude.messages.create else {}
            with pytest.raises(anthropic.NotFoundError) as err:
                call(model=path, messages=HELLO, **kwargs)
            body = err.value.body
            assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
            answers.append(json.dumps(body).replace(path, "<path>"))
    assert answers[0] == answers[2] and answers[1] == answers[3]
    intruder.close()
    claude.close()


# -- auth and bad input ----------------------------------------------------------------------------


def test_auth(server: Server) -> None:
    """No key: 401 in each API's shape. The key works as Bearer and as x-api-key on both."""
    oai_url = f"{server.base_url}/oai/api/v1/chat/completions"
    msg_url = f"{server.base_url}/anthropic/api/v1/messages"
    chat = {"model": server.model, "messages": HELLO, "max_tokens": 2}
    message = {**chat}
    for headers in ({}, {"Authorization": "Bearer not-a-tml-key"}, {"Authorization": KEY}):
        r = httpx.post(oai_url, json=chat, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["message"]
        r = httpx.post(msg_url, json=message, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{server.base_url}/oai/api/v1/models", timeout=30)
    assert r.status_code == 401
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.post(oai_url, json=chat, headers=headers, timeout=60).status_code == 200
        assert httpx.post(msg_url, json=message, headers=headers, timeout=60).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{server.base_url}/oai/api/v1", api_key="wrong", max_retries=0
        ).models.list()


OAI_BAD = [
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
    ({"stop": [""]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    ({"model": "tinker://not-a-path"}, "model"),
    ({"model": ";"}, "model"),
]


@pytest.mark.parametrize(("change", "param"), OAI_BAD, ids=[p for _, p in OAI_BAD])
def test_openai_bad_requests(server: Server, change: dict, param: str) -> None:
    body = {"model": server.model, "messages": HELLO, "max_tokens": 2, **change}
    r = httpx.post(
        f"{server.base_url}/oai/api/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and param.split("[")[0] in error["message"]


ANTHROPIC_BAD = [
    ({"max_tokens": None}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"tools": [{"name": "f", "input_schema": {}}]}, "tools"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "output_config"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        "messages[0].content[0].type",
    ),
    ({"max_tokens": 100_000}, "max_tokens"),
]


@pytest.mark.parametrize(("change", "field"), ANTHROPIC_BAD, ids=[f for _, f in ANTHROPIC_BAD])
def test_anthropic_bad_requests(server: Server, change: dict, field: str) -> None:
    body = {"model": server.model, "messages": HELLO, "max_tokens": 2, **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(
        f"{server.base_url}/anthropic/api/v1/messages",
        json=body,
        headers={"x-api-key": KEY},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert field in r.json()["error"]["message"]


def test_unknown_model_and_malformed_json(server: Server) -> None:
    url = f"{server.base_url}/oai/api/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, json={"model": "no/such", "messages": HELLO}, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url, content=b"{nope", headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        f"{server.base_url}/anthropic/api/v1/messages/count_tokens",
        json={"model": "no/such", "messages": HELLO},
        headers={"x-api-key": KEY},
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_model_without_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Chat and messages need the model's chat template (a 400 saying so); completions work."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with run_server(plain, tmp_path) as srv:
        client = openai.OpenAI(base_url=f"{srv.base_url}/oai/api/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=srv.model, messages=HELLO, max_tokens=2)
        assert "no chat template" in err.value.body["message"]
        assert err.value.body["param"] == "model"
        done = client.completions.create(model=srv.model, prompt="abc", max_tokens=2)
        assert done.usage.completion_tokens >= 1
        r = httpx.post(
            f"{srv.base_url}/anthropic/api/v1/messages",
            json={"model": srv.model, "messages": HELLO, "max_tokens": 2},
            headers={"x-api-key": KEY},
        )
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        client.close()


# -- the embedded model ---------------------------------------------------------------------------


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_smollm2_answers(data_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct through its own chat template: a greedy answer in words that
    ends at its EOS (`<|im_end|>`, not shown), via both APIs."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Converted once into the shared test data dir (not within the server's startup timeout).
    launcher = [str(TINKERD)] if TINKERD.exists() else [sys.executable, "-m", "tinkerd.cli"]
    prepare = [*launcher, "prepare-model", "--model", name, "--data-dir", str(data_dir)]
    subprocess.run(prepare, check=True, capture_output=True, timeout=900)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "models").symlink_to((data_dir / "models").resolve())
    with run_server(Path(name), tmp_path) as srv:
        client = openai.OpenAI(base_url=f"{srv.base_url}/oai/api/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(
            model=name, messages=messages, max_tokens=48, temperature=0
        )
        text = out.choices[0].message.content or ""
        assert "Paris" in text and "<|im_end|>" not in text
        assert out.choices[0].finish_reason == "stop"
        claude = anthropic.Anthropic(
            base_url=f"{srv.base_url}/anthropic/api", api_key=KEY, max_retries=0
        )
        message = claude.messages.create(
            model=name, max_tokens=48, messages=messages, extra_body={"temperature": 0}
        )
        assert message.content[0].text == text and message.stop_reason == "end_turn"
        client.close()
        claude.close()


# -- fuzzing -------------------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)
CONTENT = st.one_of(
    st.text(max_size=20),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image", "image_url", ""]), "text": st.text()}
        ),
        max_size=3,
    ),
    ANY_VALUE,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"]),
        "content": CONTENT,
    }
)
FIELDS = [
    "temperature",
    "top_p",
    "top_k",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "stop_sequences",
    "seed",
    "logprobs",
    "top_logprobs",
    "echo",
    "system",
    "stream",
    "tools",
    "response_format",
]
SMALL = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(-2, 400),
    "n": st.integers(0, 3),
    "max_tokens": st.integers(-1, 4),
    "max_completion_tokens": st.integers(-1, 4),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
    "stop_sequences": st.lists(st.text(max_size=3), max_size=2),
    "top_logprobs": st.integers(-1, 21),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 6)),
}


@st.composite
def bodies(draw: st.DrawFn, model: str) -> dict:
    """Mostly plausible bodies, each with a few fields wrong in type or range."""
    body: dict = {
        "model": draw(st.sampled_from([model, model, "nope", "tinker://x/sampler_weights/y", ""])),
        "messages": draw(st.lists(MESSAGE, max_size=3)),
        "prompt": draw(
            st.one_of(st.text(max_size=10), st.lists(st.integers(-2, 400), max_size=5), ANY_VALUE)
        ),
        "max_tokens": draw(st.integers(1, 3)),
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        strategy = SMALL.get(name, ANY_VALUE)
        body[name] = draw(st.one_of(strategy, strategy, ANY_VALUE))
    return body


ROUTES = [
    ("/oai/api/v1/chat/completions", "openai"),
    ("/oai/api/v1/completions", "openai"),
    ("/anthropic/api/v1/messages", "anthropic"),
    ("/anthropic/api/v1/messages/count_tokens", "anthropic"),
]


@pytest.mark.parametrize(("route", "api"), ROUTES, ids=[r for r, _ in ROUTES])
def test_fuzz_no_server_errors(server: Server, route: str, api: str) -> None:
    """No body gets a 5xx; every 4xx is in the API's error shape with a message."""
    url = f"{server.base_url}{route}"

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies(server.model))
    def run(body: dict) -> None:
        r = httpx.post(url, json=body, headers={"x-api-key": KEY}, timeout=120)
        assert r.status_code < 500, f"{r.status_code} {r.text[:1000]} for {body!r:.1000}"
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"]
            if api == "anthropic":
                assert r.json()["type"] == "error" and error["type"]
            else:
                assert {"type", "param", "code"} <= set(error)

    run()
