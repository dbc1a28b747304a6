"""Names and naming rules shared by every layer (no imports, so importing them is free)."""

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

ATTENTION_HINTS = ("attn", "attention")
MLP_HINTS = ("mlp", "feed_forward", "ffn")


def module_kind(path: str) -> str | None:
    """'attn', 'mlp' or None for a Linear at module `path`, judged by its parents' names
    (Tinker's train_attn / train_mlp; used to build adapters and to read PEFT ones)."""
    parts = path.lower().split(".")[:-1]
    if any(h in p for p in parts for h in ATTENTION_HINTS):
        return "attn"
    if any(h in p for p in parts for h in MLP_HINTS):
        return "mlp"
    return None
