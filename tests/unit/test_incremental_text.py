"""`IncrementalText` (tinkerd/api/inference.py), the streamed OpenAI/Anthropic text: it sends
only text that is final (no half characters, no possible start of a stop string, no EOS,
nothing after a stop string), and its deltas plus `finish` add up to exactly `to_choice`'s
non-streamed text, with each token's logprobs sent once, in order. And the sampler's
`SampleInput.on_token` hook that feeds it."""

import dataclasses
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from tinkerd.api.inference import IncrementalText, TextDelta, to_choice
from tinkerd.model.loading import embedded_model_dir, load_base_model
from tinkerd.model.sampling import Choice
from tinkerd.model.tiny import tiny_tokenizer
from tinkerd.model.types import SampledSequence, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id  # <|im_end|>


def byte_tokens(text: str) -> list[int]:
    """The tiny tokenizer's ids are bytes."""
    return list(text.encode("utf-8"))


def sampled(tokenizer, tokens: list[int], stop: list[str], eos: int) -> SampledSequence:
    """`tokens` as the sampler would return them: cut after EOS or after the token whose
    text completes a stop string (stop reason "stop"), else run to the end ("length")."""
    for i, token in enumerate(tokens):
        if token == eos or any(s in tokenizer.decode(tokens[: i + 1]) for s in stop):
            out = tokens[: i + 1]
            return SampledSequence(out, [-float(j) for j in range(len(out))], "stop")
    return SampledSequence(tokens, [-float(j) for j in range(len(tokens))], "length")


def stream(
    tokenizer, seq: SampledSequence, stop: list[str], eos: int
) -> tuple[list[TextDelta], TextDelta | None, object]:
    model = SimpleNamespace(tokenizer=tokenizer, info=SimpleNamespace(eos_token_ids=(eos,)))
    text = IncrementalText(tokenizer, (eos,), stop)
    deltas = [
        d
        for token, lp in zip(seq.tokens, seq.logprobs, strict=True)
        if (d := text.push(token, lp)) is not None
    ]
    choice = to_choice(model, seq, stop)  # type: ignore[arg-type]
    return deltas, text.finish(choice), choice


def check_adds_up(tokenizer, seq: SampledSequence, stop: list[str], eos: int) -> list[TextDelta]:
    deltas, last, choice = stream(tokenizer, seq, stop, eos)
    everything = [*deltas, *([last] if last else [])]
    assert "".join(d.text for d in everything) == choice.text
    sent = [p for d in everything for p in d.pieces]
    assert [(p.token, p.logprob) for p in sent] == [(p.token, p.logprob) for p in choice.pieces]
    assert all(d.text for d in deltas)
    return deltas


def test_multibyte_characters_wait_for_their_last_byte() -> None:
    tokens = byte_tokens("né€😀!")
    text = IncrementalText(TOKENIZER, (EOS,), ())
    got = [text.push(t) for t in tokens]
    shown = [d.text if d else None for d in got]
    # n | é = 2 bytes | € = 3 bytes | 😀 = 4 bytes | !
    assert shown == ["n", None, "é", None, None, "€", None, None, None, "😀", "!"]
    # Each token's logprobs go with the delta where its text starts: the leading bytes of a
    # character with the character.
    assert [len(d.pieces) for d in got if d] == [1, 2, 3, 4, 1]
    seq = sampled(TOKENIZER, tokens, [], EOS)
    check_adds_up(TOKENIZER, seq, [], EOS)


def test_incomplete_character_at_the_end_comes_with_finish() -> None:
    tokens = [*byte_tokens("ab"), 0xE2, 0x82]  # the first two bytes of €
    deltas, last, choice = stream(TOKENIZER, sampled(TOKENIZER, tokens, [], EOS), [], EOS)
    assert "".join(d.text for d in deltas) == "ab"
    assert last is not None and last.text == choice.text[2:] and last.text.startswith("\ufffd")
    assert len(last.pieces) == 2


def test_stop_string_is_held_back_then_cut() -> None:
    stop = ["lo w"]
    tokens = byte_tokens("hello world")
    text = IncrementalText(TOKENIZER, (EOS,), stop)
    shown = [d.text if (d := text.push(t)) else None for t in tokens]
    # "l", "lo", "lo " may start the stop string: held; "lo w" is it: cut, nothing more.
    assert shown == ["h", "e", None, "l", None, None, None, None, None, None, None]
    assert text.stopped and text.sent == "hel"
    seq = sampled(TOKENIZER, tokens, stop, EOS)
    assert seq.stop_reason == "stop" and len(seq.tokens) == len("hello w")
    check_adds_up(TOKENIZER, seq, stop, EOS)


def test_held_text_that_is_not_a_stop_string_goes_out() -> None:
    stop = ["lo w"]
    tokens = byte_tokens("hello there")
    text = IncrementalText(TOKENIZER, (EOS,), stop)
    shown = [d.text if (d := text.push(t)) else None for t in tokens]
    assert shown == ["h", "e", None, "l", None, None, "lo t", "h", "e", "r", "e"]
    check_adds_up(TOKENIZER, sampled(TOKENIZER, tokens, stop, EOS), stop, EOS)


def test_stop_string_inside_one_token_cuts_it() -> None:
    """A token that ends in the stop string gives its text before it; the stop string's tokens
    have no text, and no logprobs go out for them (as without streaming)."""
    tokenizer = load_smollm2()
    stop = [" world"]
    tokens = tokenizer.encode("Hello world and more", add_special_tokens=False)
    seq = sampled(tokenizer, tokens, stop, tokenizer.eos_token_id)
    deltas = check_adds_up(tokenizer, seq, stop, tokenizer.eos_token_id)
    assert "".join(d.text for d in deltas) == "Hello"


def test_eos_text_is_never_sent() -> None:
    tokens = [*byte_tokens("hi"), EOS]
    text = IncrementalText(TOKENIZER, (EOS,), ())
    shown = [d.text if (d := text.push(t)) else None for t in tokens]
    assert shown == ["h", "i", None]
    deltas, last, choice = stream(TOKENIZER, sampled(TOKENIZER, tokens, [], EOS), [], EOS)
    assert choice.text == "hi" and last is None
    assert "<|im_end|>" not in "".join(d.text for d in deltas)


def test_legacy_offsets_follow_the_text() -> None:
    tokens = byte_tokens("aé b")
    text = IncrementalText(TOKENIZER, (EOS,), ())
    offsets = []
    for t in tokens:
        if (d := text.push(t)) is not None:
            at = d.offset
            for p in d.pieces:
                offsets.append(at)
                at += len(p.text)
    assert offsets == [0, 1, 1, 2, 3]  # the first byte of é starts at é, as to_choice's


def test_finish_does_not_contradict_what_was_sent(caplog: pytest.LogCaptureFixture) -> None:
    """If the final text does not continue what went out, nothing more goes out (warning)."""
    text = IncrementalText(TOKENIZER, (EOS,), ())
    for t in byte_tokens("abc"):
        text.push(t)
    other = SampledSequence(byte_tokens("xyz"), [0.0] * 3, "length")
    model = SimpleNamespace(tokenizer=TOKENIZER, info=SimpleNamespace(eos_token_ids=(EOS,)))
    assert text.finish(to_choice(model, other, ())) is None  # type: ignore[arg-type]
    assert "does not lead to its final text" in caplog.text


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_add_up(seed: int) -> None:
    """Random bytes (broken UTF-8 included), stop strings and EOS: the deltas and `finish`
    are exactly the non-streamed text and logprobs."""
    rng = random.Random(seed)
    alphabet = [*byte_tokens("ab é€ "), 0xE2, 0x82, 0xF0, 0x9F, 0x80, 0xFF]
    tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 40))]
    if rng.random() < 0.3:
        tokens.insert(rng.randrange(len(tokens) + 1), EOS)
    stop = rng.choice([[], ["a b"], ["é"], ["b", "€ a"], ["ab", "\u20ac"]])
    check_adds_up(TOKENIZER, sampled(TOKENIZER, tokens, stop, EOS), stop, EOS)


def load_smollm2():
    """The embedded SmolLM2's tokenizer, when the test data dir has it converted already."""
    root = Path(os.environ.get("TINKERD_TEST_DATA_DIR", Path(__file__).parents[2] / ".test-data"))
    path = embedded_model_dir(root)
    if not (path / "tokenizer.json").exists():
        pytest.skip("the embedded SmolLM2 is not converted in .test-data")
    return AutoTokenizer.from_pretrained(path)


def test_smollm2_text_adds_up() -> None:
    tokenizer = load_smollm2()
    eos = tokenizer.eos_token_id
    text = "Paris is the capital of France. Émile — naïve café 😀 done"
    tokens = [*tokenizer.encode(text, add_special_tokens=False), eos]
    for stop in ([], ["capital"], ["é 😀", "zz"], ["done"]):
        seq = sampled(tokenizer, tokens, stop, eos)
        check_adds_up(tokenizer, seq, stop, eos)


@pytest.mark.parametrize("seed", range(10))
def test_smollm2_random_tokens_add_up(seed: int) -> None:
    tokenizer = load_smollm2()
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]
    text = tokenizer.decode(tokens)
    start = rng.randrange(len(text))
    stop = rng.choice([[], [text[start : start + rng.randint(1, 4)]], ["e", "th"]])
    stop = [s for s in stop if s]
    check_adds_up(tokenizer, sampled(tokenizer, tokens, stop, eos), stop, eos)


# -- the sampler's on_token hook ---------------------------------------------------------------


def test_on_token_hook_sees_every_token_in_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`SampleInput.on_token` is called for each drawn token of each sample, in order, with
    its logprob and top-K; a hook that raises is dropped without harming the batch."""
    worker = ModelWorker(load_base_model(str(tiny_model_dir), data_dir=tmp_path))
    params = SamplingParams(max_tokens=12, seed=3, stop=[])
    seen: list[tuple[int, int, float, int]] = []

    def record(sample: int, drawn: Choice) -> None:
        seen.append((sample, drawn.token, drawn.logprob, len(drawn.topk or ())))

    calls = []

    def broken(sample: int, drawn: Choice) -> None:
        calls.append(sample)
        raise RuntimeError("a client's hook failed")

    prompt = byte_tokens("hello")
    plain = SampleInput(None, prompt, params, num_samples=2, topk_sample_logprobs=2)
    hooked = dataclasses.replace(plain, on_token=record)
    failing = dataclasses.replace(plain, on_token=broken)
    want, got, despite = worker.sample([plain, hooked, failing])
    assert calls == [0]  # dropped after its first failure
    for out in (got, despite):
        assert [s.tokens for s in out.sequences] == [s.tokens for s in want.sequences]
    for i, seq in enumerate(got.sequences):
        mine = [(t, lp, k) for s, t, lp, k in seen if s == i]
        assert mine == [(t, lp, 2) for t, lp in zip(seq.tokens, seq.logprobs, strict=True)]
