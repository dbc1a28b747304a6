"""Image input for vision-language models: Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE, and Qwen3.5 / Qwen3.5-MoE loaded as their multimodal class) and Gemma 3 (4B+).

A model input is tokens plus images at positions (`ImageInput`): an image fills
`expected_tokens` positions of the token list, as the SDK counts `ModelInput.length`. Here:

* `prepare_images` decodes each image with PIL (png or jpeg, bounded in bytes and pixels),
  runs the model's own image processor (`AutoImageProcessor` from the model's directory) and
  checks that the number of image tokens it gives equals the client's `expected_tokens`
  (hosted Tinker's message: "Expected 63 tokens, got 70 from image"). Qwen-VL:
  `grid_t * grid_h * grid_w / merge_size**2` (the image's size decides it); Gemma 3:
  `mm_tokens_per_image` (256 on the real models: every image is resized to one square,
  without pan-and-scan crops).
* `check_input` writes the model's image token at every image position of the token list, as
  the model's own processor (and vLLM's prompt) has it: prompt logprobs there score that token.
* `model_inputs` builds the VL forward's inputs for a padded batch: `pixel_values`
  concatenated in row order (the order the model scatters them into its image positions), and
  - Qwen-VL: each image's `image_grid_thw`, and M-RoPE `position_ids` (3, B, L) from the
    model's own `get_rope_index` (rows without images get plain positions), plus each row's
    rope delta: text after the images continues at `len(real tokens) + delta`, which decode
    steps use;
  - Gemma 3: `token_type_ids` (1 at image positions), from which the model attends
    bidirectionally within each image's span (causally elsewhere); positions stay plain.
"""

import io
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from tinkerd.model.types import ImageInput

log = logging.getLogger(__name__)

# Bounds on one image: its encoded bytes, its decoded width x height (checked from the header,
# before the pixels are decoded) and the tokens a chunk may claim.
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 25_000_000
MAX_IMAGE_TOKENS = 1 << 16

# model_type values of the configs whose models take images here, by how they take them.
QWEN_VL_TYPES = frozenset(
    {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"}
)
GEMMA3_TYPES = frozenset({"gemma3"})

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg"}


class ImageError(ValueError):
    """An image input that cannot be used; the message names the chunk (a 400)."""


class VisionSupport:
    """What a served model needs to take images: its ids, how its image processor's output
    counts tokens, and the processor (loaded from `source`, the model's directory or hub
    name, on first use)."""

    def __init__(self, config: Any, source: str, name: str) -> None:
        self.name = name
        self.source = source
        self.kind = "gemma3" if config.model_type in GEMMA3_TYPES else "qwen_vl"
        self.image_token_id = int(config.image_token_id)
        video = getattr(config, "video_token_id", None)
        self.placeholder_ids = frozenset(
            {self.image_token_id} | ({int(video)} if video is not None else set())
        )
        if self.kind == "gemma3":
            self.merge_size = 1
            self.tokens_per_image = int(config.mm_tokens_per_image)
        else:
            self.merge_size = int(config.vision_config.spatial_merge_size)
            self.tokens_per_image = 0
        self._processor: Any = None
        self._lock = threading.Lock()

    def processor(self) -> Any:
        with self._lock:
            if self._processor is None:
                from transformers import AutoImageProcessor

                try:
                    self._processor = AutoImageProcessor.from_pretrained(self.source)
                except (OSError, ValueError) as exc:
                    raise ImageError(
                        f"model {self.name!r} has no image processor config "
                        f"(preprocessor_config.json) at {self.source}: {exc}"
                    ) from exc
            return self._processor

    def process(self, pil: Any) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The image's pixel values, its grid (Qwen-VL; None for Gemma 3) and token count."""
        if self.kind == "gemma3":
            out = self.processor()(images=[pil], return_tensors="pt", do_pan_and_scan=False)
            return out["pixel_values"], None, self.tokens_per_image
        out = self.processor()(images=[pil], return_tensors="pt")
        grid = out["image_grid_thw"][0].long()
        return out["pixel_values"], grid, self.num_tokens(grid)

    def num_tokens(self, grid_thw: torch.Tensor) -> int:
        return int(grid_thw.prod()) // self.merge_size**2


def vision_support(model: Any, source: str, name: str) -> VisionSupport | None:
    """The model's image support, or None for a model that does not take images."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if kind in QWEN_VL_TYPES:
        # The text-only classes of a VL config (Qwen3_5ForCausalLM) have no vision tower.
        if not hasattr(inner, "get_rope_index") or not hasattr(inner, "visual"):
            return None
    elif kind in GEMMA3_TYPES:
        if getattr(inner, "vision_tower", None) is None:
            return None
    else:
        return None
    return VisionSupport(config, source, name)


def decode_image(image: ImageInput) -> Any:
    """The image as an RGB PIL image; ImageError (naming the chunk) for bad or oversized data."""
    from PIL import Image, UnidentifiedImageError

    where = image.where
    if len(image.data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{where}: image has {len(image.data)} bytes; at most {MAX_IMAGE_BYTES}")
    try:
        pil = Image.open(io.BytesIO(image.data))
        kind = _PIL_FORMATS.get(pil.format or "")
        if kind is None:
            raise ImageError(f"{where}: image data is {pil.format}, not png or jpeg")
        width, height = pil.size
        if width * height > MAX_IMAGE_PIXELS or min(width, height) < 1:
            raise ImageError(
                f"{where}: image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels"
            )
        pil.load()
        return pil.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{where}: image data is not a valid png or jpeg image: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: image is too large: {exc}") from exc


def prepare_images(images: Sequence[ImageInput], support: VisionSupport) -> None:
    """Decode and process every image not yet processed; check its token count."""
    for image in images:
        if image.pixel_values is not None:
            continue
        pil = decode_image(image)
        try:
            pixel_values, grid, got = support.process(pil)
        except ImageError:
            raise
        except Exception as exc:  # the processor's own refusal (e.g. an image too small)
            raise ImageError(f"{image.where}: the image processor failed: {exc}") from exc
        if got != image.num_tokens:
            raise ImageError(
                f"{image.where}: Expected {image.num_tokens} tokens, got {got} from image"
            )
        image.pixel_values = pixel_values
        image.grid_thw = grid


def check_input(
    tokens: list[int],
    images: Sequence[ImageInput],
    support: VisionSupport | None,
    model_name: str,
    what: str,
) -> None:
    """Validate one model input's images (and process them): the model takes images, they
    sit in order inside the tokens, and no text position holds the image pad token (the model
    would take it for an image). `what` names the input (`data[0].model_input`, `prompt`).
    The image positions of `tokens` then hold the image token."""
    if support is None:
        if images:
            raise ImageError(f"{images[0].where}: model {model_name!r} does not take images")
        return
    end = 0
    for image in images:
        if image.position < end or image.num_tokens < 1:
            raise ImageError(f"{image.where}: image chunks must be in order and not overlap")
        end = image.position + image.num_tokens
    if end > len(tokens):
        raise ImageError(f"{what}: an image chunk runs past the end of the input")
    inside: set[int] = set()
    for image in images:
        inside.update(range(image.position, image.position + image.num_tokens))
    stray = () if support.placeholder_ids.isdisjoint(tokens) else enumerate(tokens)
    for i, t in stray:
        if t in support.placeholder_ids and i not in inside:
            raise ImageError(
                f"{what} has the image placeholder token {t} at position {i} outside an image "
                "chunk; send images as image chunks"
            )
    prepare_images(images, support)
    for p in inside:
        tokens[p] = support.image_token_id


def model_inputs(
    inner: Any,
    ids: torch.Tensor,
    rows: Sequence[Sequence[ImageInput]],
    offsets: Sequence[int],
    attention_mask: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward kwargs for a padded batch with images, and each row's rope delta (B,).

    `inner`: the VL model body (`Qwen2_5_VLModel`, `Gemma3Model`, ...). `ids` (B, L) is changed
    in place: image positions get the image token. `offsets[b]`: where row b's tokens start
    (its left padding). `attention_mask` (B, L): the padding of a left-padded batch (sampling),
    None for a right-padded one (training).
    """
    image_token_id = int(inner.config.image_token_id)
    mm = torch.zeros(ids.shape, dtype=torch.int32, device=ids.device)
    pixels: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for b, (images, offset) in enumerate(zip(rows, offsets, strict=True)):
        for image in images:
            assert image.pixel_values is not None
            start = offset + image.position
            ids[b, start : start + image.num_tokens] = image_token_id
            mm[b, start : start + image.num_tokens] = 1
            pixels.append(image.pixel_values)
            if image.grid_thw is not None:
                grids.append(image.grid_thw)
    pixel_values = torch.cat(pixels).to(ids.device)
    if inner.config.model_type in GEMMA3_TYPES:
        kwargs = {"input_ids": ids, "pixel_values": pixel_values, "token_type_ids": mm.long()}
        if attention_mask is not None:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return kwargs, torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    grid_thw = torch.stack(grids).to(ids.device)
    position_ids, deltas = inner.get_rope_index(
        input_ids=ids,
        mm_token_type_ids=mm,
        image_grid_thw=grid_thw,
        attention_mask=attention_mask,
    )
    kwargs = {
        "input_ids": ids,
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
        "position_ids": position_ids,
    }
    return kwargs, deltas.reshape(-1).to(ids.device)
