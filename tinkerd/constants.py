"""Names and naming rules shared by every layer (no imports, so importing them is free)."""

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

ATTENTION_HINTS = ("attn", "attention")
# "expert": MoE expert modules (routed `experts`, `shared_experts`, `shared_expert`) count as MLP.
MLP_HINTS = ("mlp", "feed_forward", "ffn", "expert")

# A LoRA target on a parameter rather than a Linear (MoE experts' fused 3-D weights, PEFT's
# `target_parameters`) is named `<module path>/<parameter name>`, so its short name
# (`experts/gate_up_proj`) tells it apart from a Linear's (`down_proj`); PEFT spells it
# `experts.gate_up_proj`.
EXPERT_TARGET_SEP = "/"
# Path components of the non-text parts of multimodal models (Qwen-VL `visual` with its
# `merger`, Gemma 3 / LLaVA `vision_tower` and `multi_modal_projector`, SigLIP/CLIP
# `vision_model`, ...): their Linears get no LoRA, since text-only training never reaches them.
NON_TEXT_MODULES = frozenset(
    {
        "visual",
        "vision_tower",
        "vision_model",
        "vision_encoder",
        "multi_modal_projector",
        "mm_projector",
        "merger",
        "audio_tower",
    }
)


def module_kind(path: str) -> str | None:
    """'attn', 'mlp' or None for a Linear at module `path`, judged by its parents' names
    (Tinker's train_attn / train_mlp; used to build adapters and to read PEFT ones). None
    inside a vision tower or multimodal projector: LoRA goes on the language model only."""
    parts = path.lower().split(".")[:-1]
    if NON_TEXT_MODULES.intersection(parts):
        return None
    if any(h in p for p in parts for h in ATTENTION_HINTS):
        return "attn"
    if any(h in p for p in parts for h in MLP_HINTS):
        return "mlp"
    return None
