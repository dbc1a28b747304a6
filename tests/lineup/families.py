"""Tiny random-init models of every base-model family tinkerd is tested on, built in code.

One table, `FAMILIES`: family → how to build it (its transformers class and a config with tiny
sizes), the class `load_base_model` loads it as, and the LoRA targets tinkerd gives it. Used by
the lineup suite (tests/lineup/test_lineup.py, which writes MODELS.md from this table) and by
the unit tests of MoE LoRA and VL models (tests/unit/test_moe_lora.py, test_lineup_vl.py).

Sizes: hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 320 (the byte-level tokenizer
of tinkerd/model/tiny.py uses ids 0–258; pad/bos/eos 256/257/258 set in the config), 4 experts
top-2 for MoE, sliding window 8 where the family has one.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

from tinkerd.model.tiny import tiny_tokenizer

VOCAB = 320
SPECIAL = {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}
TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    **SPECIAL,
}
UNTIED = {"tie_word_embeddings": False}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
QWEN_VL_IDS = {
    "image_token_id": 300,
    "video_token_id": 301,
    "vision_start_token_id": 302,
    "vision_end_token_id": 303,
}
# M-RoPE over head_dim 16: 8 rotary pairs split into (temporal, height, width) sections.
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
QWEN_VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
}
LINEAR_ATTN = {
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "layer_types": ["linear_attention", "full_attention"],
    **UNTIED,
}

Builder = Callable[[], tuple[type, object]]


# -- dense text models -----------------------------------------------------------------------


def llama3() -> tuple[type, object]:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return tf.LlamaForCausalLM, tf.LlamaConfig(**TEXT, **UNTIED, rope_parameters=rope)


def qwen3() -> tuple[type, object]:
    return tf.Qwen3ForCausalLM, tf.Qwen3Config(**TEXT, tie_word_embeddings=True)


def mistral() -> tuple[type, object]:
    return tf.MistralForCausalLM, tf.MistralConfig(**TEXT, **UNTIED, sliding_window=8)


def gemma2() -> tuple[type, object]:
    return tf.Gemma2ForCausalLM, tf.Gemma2Config(
        **TEXT,
        sliding_window=8,
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    )


def gemma3_text() -> tuple[type, object]:
    """Gemma 3 270m/1b: text only, `Gemma3ForCausalLM`."""
    return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
        **TEXT, sliding_window=8, query_pre_attn_scalar=16
    )


def phi3() -> tuple[type, object]:
    """Fused `qkv_proj` and `gate_up_proj` Linears."""
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}  # 64 / 4 heads = 16
    return tf.Phi3ForCausalLM, tf.Phi3Config(**text, **UNTIED)


# -- MoE text models -------------------------------------------------------------------------


def qwen3_moe() -> tuple[type, object]:
    return tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(**TEXT, **MOE, **UNTIED)


def gpt_oss() -> tuple[type, object]:
    """Transposed expert layout with biases, attention sinks, sliding/full layers."""
    return tf.GptOssForCausalLM, tf.GptOssConfig(
        **{**TEXT, "intermediate_size": 32},
        **UNTIED,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
    )


def deepseek_v3() -> tuple[type, object]:
    """MLA attention; layer 0 dense, layer 1 with 4 routed experts and 1 shared expert."""
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    return tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(
        **{**text, "num_key_value_heads": 4},
        **UNTIED,
        moe_intermediate_size=32,
        num_experts_per_tok=2,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    )


# -- hybrid (gated-delta-net linear attention + full attention) ------------------------------


def qwen3_5() -> tuple[type, object]:
    """A Qwen3.5 checkpoint as shipped: the multimodal class, which it loads as (images too)."""
    return tf.Qwen3_5ForConditionalGeneration, tf.Qwen3_5Config(
        text_config={**TEXT, **LINEAR_ATTN},
        vision_config={**QWEN_VISION, "num_position_embeddings": 16},
        **QWEN_VL_IDS,
    )


def qwen3_5_moe() -> tuple[type, object]:
    """Routed experts plus a shared expert that sees tokens flattened to (rows × seq, hidden)."""
    return tf.Qwen3_5MoeForConditionalGeneration, tf.Qwen3_5MoeConfig(
        text_config={**TEXT, **LINEAR_ATTN, **MOE, "shared_expert_intermediate_size": 32},
        vision_config={**QWEN_VISION, "num_position_embeddings": 16},
        **QWEN_VL_IDS,
    )


# -- vision-language models (trained and sampled on text) ------------------------------------


def qwen2_5_vl() -> tuple[type, object]:
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}  # 64 / 4 heads = 16
    return tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": dict(MROPE)},
        vision_config={
            **QWEN_VISION,
            "fullatt_block_indexes": [0],
            "window_size": 28,
            "patch_size": 14,
        },
        **QWEN_VL_IDS,
        **SPECIAL,
    )


def qwen3_vl() -> tuple[type, object]:
    return tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig(
        text_config={**TEXT, "rope_parameters": {**MROPE, "mrope_interleaved": True}},
        vision_config={
            **QWEN_VISION,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        **QWEN_VL_IDS,
    )


def qwen3_vl_moe() -> tuple[type, object]:
    return tf.Qwen3VLMoeForConditionalGeneration, tf.Qwen3VLMoeConfig(
        text_config={**TEXT, **MOE, "rope_parameters": {**MROPE, "mrope_interleaved": True}},
        vision_config={
            **QWEN_VISION,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        **QWEN_VL_IDS,
    )


def gemma3() -> tuple[type, object]:
    """Gemma 3 4B+: the multimodal class with a SigLIP vision tower."""
    return tf.Gemma3ForConditionalGeneration, tf.Gemma3Config(
        text_config={**TEXT, "sliding_window": 8, "query_pre_attn_scalar": 16},
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        image_token_index=300,
        boi_token_index=301,
        eoi_token_index=302,
        **SPECIAL,
    )


# -- the table -------------------------------------------------------------------------------

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("experts/gate_up_proj", "experts/down_proj")
LINEAR_ATTN_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")


@dataclass(frozen=True)
class Family:
    """One tested family: its name in the docs, builder, the class tinkerd loads it as, and the
    LoRA targets (short names, as PEFT's `target_modules`; `experts/<param>` for routed experts)
    of an adapter with the default LoraConfig (attention, MLP and unembedding)."""

    title: str
    build: Builder
    loads_as: str
    targets: tuple[str, ...]
    moe: bool = False
    images: bool = False  # takes images (ImageChunk) as it loads


FAMILIES: dict[str, Family] = {
    "llama3": Family("Llama 3", llama3, "LlamaForCausalLM", (*ATTN, *MLP, "lm_head")),
    "qwen3": Family("Qwen3", qwen3, "Qwen3ForCausalLM", (*ATTN, *MLP, "lm_head")),
    "qwen3_moe": Family(
        "Qwen3-MoE", qwen3_moe, "Qwen3MoeForCausalLM", (*ATTN, *EXPERTS, "lm_head"), moe=True
    ),
    "qwen3_5": Family(
        "Qwen3.5",
        qwen3_5,
        "Qwen3_5ForConditionalGeneration",
        (*ATTN, *LINEAR_ATTN_TARGETS, *MLP, "lm_head"),
        images=True,
    ),
    "qwen3_5_moe": Family(
        "Qwen3.5-MoE",
        qwen3_5_moe,
        "Qwen3_5MoeForConditionalGeneration",
        (*ATTN, *LINEAR_ATTN_TARGETS, *MLP, "shared_expert_gate", *EXPERTS, "lm_head"),
        moe=True,
        images=True,
    ),
    "mistral": Family("Mistral", mistral, "MistralForCausalLM", (*ATTN, *MLP, "lm_head")),
    "gemma2": Family("Gemma 2", gemma2, "Gemma2ForCausalLM", (*ATTN, *MLP, "lm_head")),
    "gemma3_text": Family(
        "Gemma 3 (text)", gemma3_text, "Gemma3ForCausalLM", (*ATTN, *MLP, "lm_head")
    ),
    "gemma3": Family(
        "Gemma 3 (multimodal)",
        gemma3,
        "Gemma3ForConditionalGeneration",
        (*ATTN, *MLP, "lm_head"),
        images=True,
    ),
    "phi3": Family(
        "Phi-3",
        phi3,
        "Phi3ForCausalLM",
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"),
    ),
    "deepseek_v3": Family(
        "DeepSeek-V3",
        deepseek_v3,
        "DeepseekV3ForCausalLM",
        (
            "q_a_proj",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_b_proj",
            "o_proj",
            *MLP,
            *EXPERTS,
            "lm_head",
        ),
        moe=True,
    ),
    "gpt_oss": Family(
        "gpt-oss", gpt_oss, "GptOssForCausalLM", (*ATTN, *EXPERTS, "lm_head"), moe=True
    ),
    "qwen2_5_vl": Family(
        "Qwen2.5-VL",
        qwen2_5_vl,
        "Qwen2_5_VLForConditionalGeneration",
        (*ATTN, *MLP, "lm_head"),
        images=True,
    ),
    "qwen3_vl": Family(
        "Qwen3-VL",
        qwen3_vl,
        "Qwen3VLForConditionalGeneration",
        (*ATTN, *MLP, "lm_head"),
        images=True,
    ),
    "qwen3_vl_moe": Family(
        "Qwen3-VL-MoE",
        qwen3_vl_moe,
        "Qwen3VLMoeForConditionalGeneration",
        (*ATTN, *EXPERTS, "lm_head"),
        moe=True,
        images=True,
    ),
}


def build(family: Builder, path: Path, *, seed: int = 0) -> Path:
    """Build `family`'s tiny model with a larger-than-default random init (logits far from
    uniform, so greedy decoding is stable and LoRA changes show), save it with the byte-level
    tokenizer into `path`."""
    cls, config = family()
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # Linears, embeddings, 3-D experts
                p.normal_(0.0, 0.08)
            elif name.endswith("_bias"):  # gpt-oss expert biases: non-zero, so they count
                p.normal_(0.0, 0.05)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def builder(name: str) -> Builder:
    return FAMILIES[name].build


# How each family samples (model/sample_engine.py), checked by the lineup suite and shown in
# MODELS.md: "decoder" = continuous batching on tinkerd's own decode step (model/decoder.py),
# "continuous" = continuous batching on transformers' forward, "static" = static batches
# (recurrent cache state or image input).
SAMPLING_TITLES = {
    "decoder": "continuous, tinkerd decode step",
    "continuous": "continuous",
    "static": "static batches",
}
SAMPLING: dict[str, str] = {
    name: "decoder" if name in ("llama3", "qwen3", "mistral") else "continuous" for name in FAMILIES
} | {
    name: "static"
    for name in ("qwen3_5", "qwen3_5_moe", "gemma3", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
}
