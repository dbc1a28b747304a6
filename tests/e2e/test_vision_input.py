"""Image input end to end: the official SDK against `tinkerd serve` of a tiny Qwen2.5-VL
(and of a tiny Gemma 3, `test_gemma3_takes_images`).

The model is built in code (random init, saved with its image processor config and the
byte-level tokenizer): a 56x56 image is 4 image tokens. Training data carries an `ImageChunk`
(protobuf `Chunk.image`), sampling prompts one too (base64 JSON in /asample). Results are
compared with plain transformers run in this process on the same directory.
"""

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
import transformers as tf
from e2e_helpers import Server, run_server
from PIL import Image
from tinker import types
from transformers import AutoImageProcessor, GenerationConfig
from unit.vision_models import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    build_gemma3,
    build_qwen_vl,
    image_bytes,
)

TEXT_A = [ord(c) for c in "Look: "]
TEXT_B = [ord(c) for c in " what is it?"]
KEY = "tml-vision"


def model_input(
    data: bytes, expected_tokens: int = 4, tail: list[int] = TEXT_B
) -> types.ModelInput:
    return types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=[*TEXT_A, VISION_START]),
            types.ImageChunk(data=data, format="png", expected_tokens=expected_tokens),
            types.EncodedTextChunk(tokens=[VISION_END, *tail]),
        ]
    )


def full_sequence(n: int = 4) -> list[int]:
    return [*TEXT_A, VISION_START] + [0] * n + [VISION_END, *TEXT_B]


def image_datum(data: bytes, expected_tokens: int = 4) -> types.Datum:
    """SFT datum: model_input = seq[:-1] (image inside), targets seq[1:], 0 with weight 0 at
    image positions (the cookbook's rule)."""
    seq = full_sequence(expected_tokens)
    mi = model_input(data, expected_tokens, TEXT_B[:-1])
    start = len(TEXT_A) + 1
    n = expected_tokens
    weights = [0.0 if start - 1 <= i < start + n else 1.0 for i in range(len(seq) - 1)]
    return types.Datum(
        model_input=mi, loss_fn_inputs={"target_tokens": seq[1:], "weights": weights}
    )


def text_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def vl_server(vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(vl_dir, tmp_path_factory.mktemp("vl-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def sc(vl_server: Server) -> Iterator[tinker.ServiceClient]:
    client = vl_server.client(KEY)
    yield client


@pytest.fixture(scope="module")
def reference(vl_dir: Path) -> tuple[torch.nn.Module, object]:
    model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir, dtype=torch.float32)
    return model.eval(), AutoImageProcessor.from_pretrained(vl_dir)


def reference_inputs(reference: tuple, tokens: list[int], data: bytes) -> dict:
    _, processor = reference
    ids = torch.tensor([tokens])
    ids[ids == 0] = IMAGE_PAD  # the placeholders (no text token is 0 here)
    out = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    return {
        "input_ids": ids,
        "pixel_values": out["pixel_values"],
        "image_grid_thw": out["image_grid_thw"],
        "mm_token_type_ids": (ids == IMAGE_PAD).int(),
    }


def test_capabilities_report_image_input(sc: tinker.ServiceClient, vl_server: Server) -> None:
    rest = tinker.RestClient(base_url=vl_server.base_url, api_key=KEY)
    caps = rest.get_server_capabilities().result()
    assert vl_server.model in {m.model_name for m in caps.supported_models}
    # tinkerd's extra field (the SDK's type drops it): read the JSON.
    body = httpx.get(f"{vl_server.base_url}/api/v1/get_server_capabilities").json()
    assert body["supported_models"][0]["modalities"] == ["text", "image"]


def test_forward_with_image_equals_transformers(
    sc: tinker.ServiceClient, vl_server: Server, reference: tuple
) -> None:
    tc = sc.create_lora_training_client(base_model=vl_server.model, rank=4).result()
    data0, data1 = image_bytes(0), image_bytes(1)
    out = tc.forward([image_datum(data0)], "cross_entropy").result(timeout=120)
    got = out.loss_fn_outputs[0]["logprobs"].to_torch()
    seq = full_sequence()
    model, _ = reference
    with torch.no_grad():
        logits = model(**reference_inputs(reference, seq[:-1], data0)).logits[0].float()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # Same text, another image: another loss. Training steps with images run.
    losses = [
        tc.forward_backward([image_datum(d)], "cross_entropy").result(timeout=120)
        for d in (data0, data1)
    ]
    assert losses[0].metrics["loss:sum"] != pytest.approx(losses[1].metrics["loss:sum"])
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=60)


def test_image_errors_are_400s_naming_the_chunk(
    sc: tinker.ServiceClient, vl_server: Server
) -> None:
    tc = sc.create_lora_training_client(base_model=vl_server.model, rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="Expected 5 tokens, got 4 from image"):
        tc.forward([image_datum(image_bytes(0), 5)], "cross_entropy").result(timeout=60)
    with pytest.raises(
        tinker.BadRequestError, match=r"data\[1\].model_input\[1\]: image data is not a valid"
    ):
        datums = [image_datum(image_bytes(0)), image_datum(b"\x89PNG not really")]
        tc.forward(datums, "cross_entropy").result(timeout=60)
    sampler = sc.create_sampling_client(base_model=vl_server.model).result()
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    with pytest.raises(tinker.BadRequestError, match=r"prompt.chunks\[1\]: Expected 3 tokens"):
        sampler.sample(model_input(image_bytes(0), 3), 1, params).result(timeout=60)
    # The run goes on after its rejected requests.
    tc.forward([image_datum(image_bytes(0))], "cross_entropy").result(timeout=60)


def test_sampling_with_image_equals_generate(
    sc: tinker.ServiceClient, vl_server: Server, reference: tuple
) -> None:
    data = image_bytes(0)
    sampler = sc.create_sampling_client(base_model=vl_server.model).result()
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    prompt = model_input(data)
    got = sampler.sample(prompt, 1, params).result(timeout=120).sequences[0].tokens
    model, _ = reference
    config = GenerationConfig(
        max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=256
    )
    with torch.no_grad():
        ids = model.generate(
            **reference_inputs(reference, full_sequence(), data), generation_config=config
        )
    assert got == ids[0, len(full_sequence()) :].tolist()
    # compute_logprobs: None at the first position only; image positions score the image
    # token (as the model's processor and vLLM's prompt have it), as transformers does.
    lps = sampler.compute_logprobs(prompt).result(timeout=120)
    assert len(lps) == prompt.length and lps[0] is None
    inputs = reference_inputs(reference, full_sequence(), data)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    want = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
    np.testing.assert_allclose(lps[1:], want.tolist(), atol=1e-4)


def test_two_tenants_with_and_without_images(vl_server: Server) -> None:
    """One user's image rows and another's text rows in flight together equal solo runs."""
    a = (
        vl_server.client("tml-vision-a")
        .create_lora_training_client(base_model=vl_server.model, rank=4, seed=1)
        .result()
    )
    b = (
        vl_server.client("tml-vision-b")
        .create_lora_training_client(base_model=vl_server.model, rank=4, seed=2)
        .result()
    )
    img = [image_datum(image_bytes(3)), image_datum(image_bytes(4))]
    txt = [text_datum([ord(c) for c in "only text, a longer row than the image rows are"])]

    def lps(out: types.ForwardBackwardOutput) -> list[list[float]]:
        return [o["logprobs"].tolist() for o in out.loss_fn_outputs]

    solo_a = lps(a.forward(img, "cross_entropy").result(timeout=120))
    solo_b = lps(b.forward(txt, "cross_entropy").result(timeout=120))
    fa, fb = a.forward(img, "cross_entropy"), b.forward(txt, "cross_entropy")
    both_a, both_b = lps(fa.result(timeout=120)), lps(fb.result(timeout=120))
    for got, want in ((both_a, solo_a), (both_b, solo_b)):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)


def test_text_model_refuses_images(server: Server) -> None:
    """A model without a vision tower answers 400 "model X does not take images"."""
    sc = server.client(KEY)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="does not take images"):
        tc.forward([image_datum(image_bytes(0))], "cross_entropy").result(timeout=60)
    sampler = sc.create_sampling_client(base_model=server.model).result()
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    with pytest.raises(tinker.BadRequestError, match=r"prompt.chunks\[1\]: model .* does not"):
        sampler.sample(model_input(image_bytes(0)), 1, params).result(timeout=60)


def test_gemma3_takes_images(tmp_path: Path) -> None:
    """Gemma 3 (4 soft tokens per 56x56 image, image token 300): capability, forward equal to
    transformers' with `token_type_ids` (bidirectional within the image), greedy sampling equal
    to its `generate`."""
    model_dir = build_gemma3(tmp_path / "gemma3")
    data = image_bytes(0)
    (tmp_path / "server").mkdir()
    with run_server(model_dir, tmp_path / "server") as srv:
        body = httpx.get(f"{srv.base_url}/api/v1/get_server_capabilities").json()
        assert body["supported_models"][0]["modalities"] == ["text", "image"]
        sc = srv.client(KEY)
        tc = sc.create_lora_training_client(base_model=srv.model, rank=4).result()
        out = tc.forward([image_datum(data)], "cross_entropy").result(timeout=120)
        got = out.loss_fn_outputs[0]["logprobs"].to_torch()
        sampler = sc.create_sampling_client(base_model=srv.model).result()
        params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
        sampled = sampler.sample(model_input(data), 1, params).result(timeout=120)
    model = tf.Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")
    seq = full_sequence()
    ids = torch.tensor([seq])
    ids[ids == 0] = IMAGE_PAD
    types_ = (ids == IMAGE_PAD).long()
    config = GenerationConfig(
        max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=256
    )
    with torch.no_grad():
        logits = model.eval()(
            input_ids=ids[:, :-1],
            pixel_values=pixels["pixel_values"],
            token_type_ids=types_[:, :-1],
        ).logits[0]
        generated = model.generate(
            input_ids=ids,
            pixel_values=pixels["pixel_values"],
            token_type_ids=types_,
            generation_config=config,
        )
    want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert sampled.sequences[0].tokens == generated[0, len(seq) :].tolist()
