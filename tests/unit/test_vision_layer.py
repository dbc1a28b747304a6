"""Image input through the model layer, on tiny random-init VL models built in code
(Qwen2.5-VL, Qwen3-VL, Qwen2-VL, Qwen3-VL-MoE, Gemma 3, Qwen3.5), and its wire decoding.

Each model is saved with its image processor config. Qwen-VL: patch size, merge 2, temporal
patch 2 as its vision config, min/max pixels for 4 to 16 image tokens: a 56x56 image is 4
tokens. Gemma 3: every image is resized to 56x56, 4 soft tokens. Everything is compared
against plain transformers: forward with `pixel_values` (and `image_grid_thw` for Qwen-VL,
`token_type_ids` for Gemma 3's bidirectional attention within an image), and `generate` with
the same inputs.

Qwen3.5: a checkpoint that declares the multimodal `Qwen3_5ForConditionalGeneration` loads as
it and takes images through the same Qwen-VL path; a text-only Qwen3.5 (`Qwen3_5ForCausalLM`)
refuses them (`test_text_only_qwen3_5_refuses_images`).
"""

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tinker import types as T
from tinker.proto import request_conv
from transformers import GenerationConfig, Qwen3_5ForCausalLM
from vision_models import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    build_gemma3,
    build_qwen3_5,
    build_qwen_vl,
    image_bytes,
)

from tinkerd.api import codec
from tinkerd.api.codec import CodecError
from tinkerd.model.loading import BaseModel, load_base_model
from tinkerd.model.lora import LoraConfig, segments_for
from tinkerd.model.optimizer import AdamParams
from tinkerd.model.tiny import build_tiny_model
from tinkerd.model.types import (
    Datum,
    ForwardBackwardInput,
    ImageInput,
    SampleInput,
    SamplingParams,
)
from tinkerd.model.vision import ImageError, check_input
from tinkerd.model.worker import ModelWorker

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen2_vl", "qwen3_vl_moe", "gemma3", "qwen3_5"]


@pytest.fixture(scope="module", params=FAMILIES)
def vl_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    where = tmp_path_factory.mktemp(request.param)
    data_dir = tmp_path_factory.mktemp("data")
    if request.param == "qwen3_5":
        base = load_base_model(str(build_qwen3_5(where)), data_dir=data_dir)
        assert type(base.model).__name__ == "Qwen3_5ForConditionalGeneration"
        return base
    path = build_gemma3(where) if request.param == "gemma3" else build_qwen_vl(where, request.param)
    return load_base_model(str(path), data_dir=data_dir)


@pytest.fixture(scope="module")
def worker(vl_base: BaseModel) -> ModelWorker:
    return ModelWorker(vl_base)


TEXT_A = [ord(c) for c in "Look: "]
TEXT_B = [ord(c) for c in " what is it?"]


def image_tokens(data: bytes, n: int = 4, where: str = "data[0].model_input[1]") -> ImageInput:
    return ImageInput(len(TEXT_A) + 1, n, data, "png", where)


def image_sequence(n: int = 4) -> list[int]:
    """Text, vision_start, n placeholders (0), vision_end, text: as the codec builds it."""
    return TEXT_A + [VISION_START] + [0] * n + [VISION_END] + TEXT_B


def image_datum(data: bytes, n: int = 4) -> Datum:
    seq = image_sequence(n)
    tokens, targets = seq[:-1], seq[1:]
    image = image_tokens(data, n)
    # Image positions: target 0, weight 0 (the cookbook's rule); also the token before them.
    weights = torch.ones(len(targets))
    weights[image.position - 1 : image.position + n] = 0
    return Datum(
        tokens,
        {"target_tokens": torch.tensor(targets), "weights": weights},
        images=[image],
    )


def text_datum(tokens: list[int]) -> Datum:
    return Datum(
        tokens[:-1],
        {"target_tokens": torch.tensor(tokens[1:]), "weights": torch.ones(len(tokens) - 1)},
    )


def gemma(worker: ModelWorker) -> bool:
    return worker.vision is not None and worker.vision.kind == "gemma3"


def reference_inputs(worker: ModelWorker, datum: Datum) -> dict[str, torch.Tensor]:
    """What a transformers user passes: input_ids with the image token, pixel_values, and the
    grid (Qwen-VL) or token types (Gemma 3: 1 at image positions)."""
    ids = torch.tensor([datum.tokens])
    pixels, grids = [], []
    for image in datum.images:
        ids[0, image.position : image.position + image.num_tokens] = IMAGE_PAD
        processor = worker.vision.processor()
        pil = Image.open(io.BytesIO(image.data)).convert("RGB")
        out = processor(images=[pil], return_tensors="pt")
        pixels.append(out["pixel_values"])
        grids.append(out.get("image_grid_thw"))
    if gemma(worker):
        return {
            "input_ids": ids,
            "pixel_values": torch.cat(pixels),
            "token_type_ids": (ids == IMAGE_PAD).long(),
        }
    return {
        "input_ids": ids,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
        "mm_token_type_ids": (ids == IMAGE_PAD).int(),
    }


def prepared(worker: ModelWorker, datum: Datum) -> Datum:
    worker.check_images(datum.tokens, datum.images, "data[0].model_input")
    return datum


def forward_logprobs(worker: ModelWorker, data: list[Datum], adapter: str | None = None):
    (out,) = worker.forward_backward(
        [ForwardBackwardInput(adapter, [prepared(worker, d) for d in data], forward_only=True)]
    )
    return out


# ------------------------------------------------------------------------------------------


def test_capability_and_token_count(worker: ModelWorker) -> None:
    assert worker.vision is not None and worker.vision.image_token_id == IMAGE_PAD
    datum = prepared(worker, image_datum(image_bytes(0)))
    image = datum.images[0]
    patch = worker.base.model.config.vision_config.patch_size
    if gemma(worker):  # one 56x56 image, 4 soft tokens, whatever its size
        assert image.grid_thw is None and image.pixel_values.shape == (1, 3, 56, 56)
        big_tokens = 4
    else:
        assert image.grid_thw.tolist() == [1, 4, 4]
        assert image.pixel_values.shape == (16, 3 * 2 * patch * patch)
        # A larger image has more tokens: 112x84 -> 12 (resized to a multiple of 2 patches).
        big_tokens = 12
    # The image positions now hold the image token (the codec sent placeholders 0).
    assert datum.tokens[image.position : image.position + 4] == [IMAGE_PAD] * 4
    big = ImageInput(0, 1, image_bytes(1, (112, 84), "JPEG"), "jpeg", "prompt.chunks[0]")
    with pytest.raises(
        ImageError, match=rf"prompt.chunks\[0\]: Expected 1 tokens, got {big_tokens} from"
    ):
        check_input([0], [big], worker.vision, "m", "prompt")


def test_forward_logprobs_equal_the_models_own(worker: ModelWorker) -> None:
    datum = image_datum(image_bytes(0))
    out = forward_logprobs(worker, [datum])
    model = worker.base.model
    with torch.no_grad():
        logits = model(**reference_inputs(worker, datum)).logits[0].float()
    targets = datum.loss_fn_inputs["target_tokens"][:, None]
    want = torch.log_softmax(logits, -1).gather(1, targets)
    torch.testing.assert_close(out.loss_fn_outputs[0]["logprobs"], want[:, 0], atol=1e-5, rtol=0)
    if gemma(worker):
        # The image's tokens see each other both ways: a causal-only forward differs.
        causal = {k: v for k, v in reference_inputs(worker, datum).items() if k != "token_type_ids"}
        with torch.no_grad():
            logits = model(**causal).logits[0].float()
        other = torch.log_softmax(logits, -1).gather(1, targets)
        assert not torch.allclose(other[:, 0], want[:, 0], atol=1e-3)


def test_loss_changes_with_the_image_only(worker: ModelWorker) -> None:
    a = forward_logprobs(worker, [image_datum(image_bytes(0))])
    b = forward_logprobs(worker, [image_datum(image_bytes(1))])
    again = forward_logprobs(worker, [image_datum(image_bytes(0))])
    assert a.metrics["loss:sum"] != pytest.approx(b.metrics["loss:sum"], abs=1e-6)
    assert a.metrics["loss:sum"] == pytest.approx(again.metrics["loss:sum"], abs=1e-6)
    # Text before the image does not see it (causal): same logprobs there.
    lp_a, lp_b = a.loss_fn_outputs[0]["logprobs"], b.loss_fn_outputs[0]["logprobs"]
    first = len(TEXT_A) + 1
    torch.testing.assert_close(lp_a[: first - 1], lp_b[: first - 1])
    assert not torch.allclose(lp_a[first + 4 :], lp_b[first + 4 :])


def test_mixed_batch_equals_separate_runs(worker: ModelWorker) -> None:
    """Rows with and without images, of two adapters, right-padded in one batch."""
    if not worker.has_adapter("a"):
        worker.add_adapter("a", LoraConfig(rank=4, seed=1))
    text = text_datum([ord(c) for c in "plain text row, longer than the others"])
    img0, img1 = image_datum(image_bytes(0)), image_datum(image_bytes(1))
    alone = [
        forward_logprobs(worker, [img0]).loss_fn_outputs[0]["logprobs"],
        forward_logprobs(worker, [text], "a").loss_fn_outputs[0]["logprobs"],
        forward_logprobs(worker, [img1], "a").loss_fn_outputs[0]["logprobs"],
    ]
    items = [
        ForwardBackwardInput(None, [prepared(worker, img0)], forward_only=True),
        ForwardBackwardInput(
            "a", [prepared(worker, text), prepared(worker, img1)], forward_only=True
        ),
    ]
    outs = worker.forward_backward(items)
    got = [outs[0].loss_fn_outputs[0]["logprobs"]] + [
        o["logprobs"] for o in outs[1].loss_fn_outputs
    ]
    for g, w in zip(got, alone, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_training_with_images_lowers_the_loss(worker: ModelWorker) -> None:
    worker.add_adapter("train", LoraConfig(rank=8, seed=0))
    data = [prepared(worker, image_datum(image_bytes(0)))]
    losses = []
    for _ in range(4):
        (res,) = worker.forward_backward([ForwardBackwardInput("train", data)])
        worker.optim_step("train", AdamParams(learning_rate=1e-2))
        losses.append(res.metrics["loss:sum"])
    assert losses[-1] < losses[0], losses
    worker.remove_adapter("train")


def sample_input(data: bytes | None, max_tokens: int = 6, **kw: object) -> SampleInput:
    if data is None:
        return SampleInput(
            None,
            [ord(c) for c in "text only prompt"],
            SamplingParams(max_tokens, 0.0, stop=()),
            **kw,
        )
    prompt = image_sequence()
    image = ImageInput(len(TEXT_A) + 1, 4, data, "png", "prompt.chunks[1]")
    return SampleInput(
        None, prompt, SamplingParams(max_tokens, 0.0, stop=()), prompt_images=[image], **kw
    )


def generate_reference(worker: ModelWorker, item: SampleInput, max_tokens: int) -> list[int]:
    datum = Datum(item.prompt, {}, images=item.prompt_images)
    inputs = reference_inputs(worker, datum)
    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=256
    )
    with torch.no_grad(), worker.lora.route(segments_for([None])):
        ids = worker.base.model.generate(**inputs, generation_config=config)
    return ids[0, len(item.prompt) :].tolist()


def test_greedy_with_image_equals_generate(worker: ModelWorker) -> None:
    item = sample_input(image_bytes(0))
    worker.validate_sample(item)
    (out,) = worker.sample([item])
    assert out.sequences[0].tokens == generate_reference(worker, item, 6)


def test_mixed_sample_batch_equals_separate_runs(worker: ModelWorker) -> None:
    """Left-padded prefill of rows with and without images, different lengths, then decode
    steps with each image row's rope delta; also prompt logprobs (at image positions: of the
    image token, as transformers scores the model's own input ids)."""
    items = [
        sample_input(image_bytes(0), prompt_logprobs=True),
        sample_input(None, 8),
        sample_input(image_bytes(2), 4),
    ]
    for item in items:
        worker.validate_sample(item)
    alone = [worker.sample([item])[0] for item in items]
    together = worker.sample(items)
    for a, t in zip(alone, together, strict=True):
        assert a.sequences[0].tokens == t.sequences[0].tokens
    assert together[0].sequences[0].tokens == generate_reference(worker, items[0], 6)
    plp = together[0].prompt_logprobs
    assert plp is not None and plp[0] is None
    assert plp[1:] == pytest.approx(alone[0].prompt_logprobs[1:], abs=1e-5)
    datum = Datum(items[0].prompt, {}, images=items[0].prompt_images)
    inputs = reference_inputs(worker, datum)
    with torch.no_grad():
        logits = worker.base.model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    want = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(plp[1:]), want, atol=1e-5, rtol=0)


def test_image_errors(worker: ModelWorker) -> None:
    bad = ImageInput(1, 4, b"not an image", "png", "data[2].model_input[1]")
    with pytest.raises(ImageError, match=r"data\[2\].model_input\[1\]: image data is not a valid"):
        check_input([1, 0, 0, 0, 0], [bad], worker.vision, "m", "data[2].model_input")
    gif = io.BytesIO()
    Image.new("RGB", (56, 56)).save(gif, format="GIF")
    with pytest.raises(ImageError, match="not png or jpeg"):
        check_input(
            [0] * 4, [ImageInput(0, 4, gif.getvalue(), "png", "x")], worker.vision, "m", "p"
        )
    # The image pad token outside an image chunk would be taken for an image.
    with pytest.raises(ImageError, match="placeholder token 300 at position 1"):
        check_input([1, IMAGE_PAD], [], worker.vision, "m", "prompt")


def test_text_only_qwen3_5_refuses_images(tmp_path: Path) -> None:
    base = load_base_model(str(build_qwen3_5(tmp_path / "q35")), data_dir=tmp_path / "data")
    text_only = Qwen3_5ForCausalLM(base.model.config.text_config).eval().requires_grad_(False)
    worker = ModelWorker(dataclasses.replace(base, model=text_only))
    assert worker.vision is None
    image = ImageInput(0, 4, image_bytes(0), "png", "prompt.chunks[0]")
    with pytest.raises(ImageError, match=r"prompt.chunks\[0\]: model .* does not take images"):
        worker.check_images([0] * 4, [image], "prompt")


def test_text_model_refuses_images(tmp_path: Path) -> None:
    base = load_base_model(str(build_tiny_model(tmp_path / "tiny")), data_dir=tmp_path / "data")
    worker = ModelWorker(base)
    assert worker.vision is None
    image = ImageInput(0, 4, image_bytes(0), "png", "prompt.chunks[0]")
    with pytest.raises(ImageError, match=r"prompt.chunks\[0\]: model .* does not take images"):
        worker.check_images([0] * 4, [image], "prompt")


# ------------------------------------------------------------------------------------------
# Wire decoding (codec): protobuf Chunk.image and JSON image chunks, as the SDK sends them


def sdk_image_input(data: bytes, expected: int | None = 4) -> T.ModelInput:
    return T.ModelInput(
        chunks=[
            T.EncodedTextChunk(tokens=[1, 2]),
            T.ImageChunk(data=data, format="png", expected_tokens=expected),
            T.EncodedTextChunk(tokens=[3]),
        ]
    )


def test_codec_decodes_proto_image_chunks() -> None:
    datum = T.Datum(model_input=sdk_image_input(b"PNGDATA"), loss_fn_inputs={"weights": [1.0] * 7})
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="s:train:0",
        seq_id=1,
    )
    body = request_conv.forward_backward_request_to_proto(request).SerializeToString()
    got = codec.decode_forward_backward(body, None, no_images=None).data[0]
    assert got.tokens == [1, 2, 0, 0, 0, 0, 3]
    (image,) = got.images
    assert (image.position, image.num_tokens, image.data, image.format) == (2, 4, b"PNGDATA", "png")
    assert image.where == "data[0].model_input[1]"
    # Without the model's consent, the chunk is refused with the reason given.
    with pytest.raises(CodecError, match=r"data\[0\].model_input\[1\]: model 'm' does not take"):
        codec.decode_forward_backward(body, None, no_images="model 'm' does not take images")


def test_codec_decodes_json_image_chunks() -> None:
    wire = json.loads(json.dumps(sdk_image_input(b"PNGDATA").model_dump(mode="json")))
    tokens, images = codec.model_input(wire, no_images=None)
    assert tokens == [1, 2, 0, 0, 0, 0, 3]
    assert images[0].data == b"PNGDATA" and images[0].where == "prompt.chunks[1]"
    with pytest.raises(CodecError, match=r"prompt.chunks\[1\]: image inputs are not supported"):
        codec.model_input(wire)


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        (
            {"type": "image", "data": "!!", "format": "png", "expected_tokens": 4},
            "not valid base64",
        ),
        ({"type": "image", "data": "UE5H", "format": "gif", "expected_tokens": 4}, "format"),
        ({"type": "image", "data": "UE5H", "format": "png"}, "expected_tokens is required"),
        ({"type": "image", "data": "UE5H", "format": "png", "expected_tokens": 0}, "between 1"),
        ({"type": "image", "data": "", "format": "png", "expected_tokens": 4}, "empty"),
        (
            {"type": "image_asset_pointer", "location": "/x.png", "format": "png"},
            r"image_asset_pointer chunks are not supported; send the image bytes \(ImageChunk\)",
        ),
        ({"type": "dmel", "dmel": "UE5H"}, "audio"),
    ],
)
def test_codec_image_chunk_errors(chunk: dict, match: str) -> None:
    wire = {"chunks": [{"type": "encoded_text", "tokens": [1]}, chunk]}
    with pytest.raises(CodecError, match=r"prompt.chunks\[1\]: .*" + match):
        codec.model_input(wire, no_images=None)
