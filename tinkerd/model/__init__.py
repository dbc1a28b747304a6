"""The math: base model loading, multi-adapter LoRA, losses, per-adapter AdamW, sampling."""
