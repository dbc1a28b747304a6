"""Tiny random-init Qwen-VL models built in code, saved with their image processor config and
the byte-level tokenizer, and test images: shared by the model-layer, end-to-end and cookbook
image tests (tests/unit/test_vision_layer.py, tests/e2e/test_vision_input.py,
tests/conformance/test_vlm_classifier.py)."""

import io
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from PIL import Image
from transformers import Qwen2VLImageProcessor

from tinkerd.model.tiny import tiny_tokenizer

IMAGE_PAD, VISION_START, VISION_END = 300, 302, 303

SPECIAL = {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}

TEXT_CONFIG = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    **SPECIAL,
}

MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}

VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}

IDS = {
    "image_token_id": IMAGE_PAD,
    "video_token_id": 301,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}

# Qwen's vision and think tokens as special tokens after the byte-level tokenizer's (256-258:
# <|endoftext|>, <|im_start|>, <|im_end|>), ids 259-264: what the cookbook's Qwen-VL renderers
# write as text and expect to be single tokens.
QWEN_CHAT_TOKENS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]
CHAT_IDS = {
    "image_token_id": 261,
    "video_token_id": 262,
    "vision_start_token_id": 259,
    "vision_end_token_id": 260,
}


def qwen_vl(family: str, ids: dict[str, int] = IDS) -> tuple[torch.nn.Module, int]:
    """A tiny random-init model of the family (special token ids `ids`) and its vision patch
    size."""
    if family == "qwen2_5_vl":
        config = tf.Qwen2_5_VLConfig(
            text_config={**TEXT_CONFIG, "rope_parameters": dict(MROPE)},
            vision_config={
                **VISION,
                "fullatt_block_indexes": [0],
                "window_size": 28,
                "patch_size": 14,
            },
            **ids,
            **SPECIAL,
        )
        return tf.Qwen2_5_VLForConditionalGeneration(config), 14
    if family == "qwen2_vl":
        config = tf.Qwen2VLConfig(
            text_config={**TEXT_CONFIG, "rope_parameters": dict(MROPE)},
            vision_config={
                "depth": 1,
                "embed_dim": 32,
                "hidden_size": 64,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            **ids,
            **SPECIAL,
        )
        return tf.Qwen2VLForConditionalGeneration(config), 14
    moe = family == "qwen3_vl_moe"
    config_class = tf.Qwen3VLMoeConfig if moe else tf.Qwen3VLConfig
    config = config_class(
        text_config={
            **TEXT_CONFIG,
            "head_dim": 16,
            "rope_parameters": {**MROPE, "mrope_interleaved": True},
            **(
                {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
                if moe
                else {}
            ),
        },
        vision_config={
            **VISION,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
            "patch_size": 16,
        },
        **ids,
    )
    model_class = (
        tf.Qwen3VLMoeForConditionalGeneration if moe else tf.Qwen3VLForConditionalGeneration
    )
    return model_class(config), 16


def qwen_chat_tokenizer() -> tf.PreTrainedTokenizerFast:
    """The byte-level tokenizer with Qwen's vision and think special tokens (ids 259-264)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_CHAT_TOKENS})
    return tokenizer


def build_qwen_vl(path: Path, family: str = "qwen2_5_vl", *, chat: bool = False) -> Path:
    """A tiny Qwen-VL with its image processor config and the byte-level tokenizer. Images
    are resized to between 4 and 16 merged patches: 4 to 16 image tokens. `chat`: Qwen's
    special tokens in the tokenizer and config (`qwen_chat_tokenizer`, `CHAT_IDS`), for the
    cookbook's renderers."""
    torch.manual_seed(0)
    model, patch = qwen_vl(family, CHAT_IDS if chat else IDS)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (qwen_chat_tokenizer() if chat else tiny_tokenizer()).save_pretrained(path)
    unit = (patch * 2) ** 2  # one image token: a merge_size x merge_size block of patches
    processor = Qwen2VLImageProcessor(
        min_pixels=unit * 4, max_pixels=unit * 16, patch_size=patch, merge_size=2
    )
    processor.temporal_patch_size = 2
    processor.save_pretrained(path)
    return path


def image_bytes(seed: int, size: tuple[int, int] = (56, 56), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def build_gemma3(path: Path) -> Path:
    """A tiny Gemma 3 multimodal model (tests/lineup/families.py: SigLIP tower on 56x56 images,
    4 image soft tokens per image, image token 300) with its image processor config."""
    from lineup.families import build, gemma3

    build(gemma3, path)
    processor = tf.Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    processor.save_pretrained(path)
    return path


def build_qwen3_5(path: Path) -> Path:
    """A tiny Qwen3.5 as shipped (`Qwen3_5ForConditionalGeneration`: linear + full attention,
    a Qwen3-VL-style vision tower with patch 16; tests/lineup/families.py) with its image
    processor config: 4 to 16 image tokens, a 56x56 image is 4."""
    from lineup.families import build, qwen3_5

    build(qwen3_5, path)
    unit = (16 * 2) ** 2
    processor = Qwen2VLImageProcessor(
        min_pixels=unit * 4, max_pixels=unit * 16, patch_size=16, merge_size=2
    )
    processor.temporal_patch_size = 2
    processor.save_pretrained(path)
    return path
