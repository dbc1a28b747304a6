"""Names shared by every layer (no imports, so importing them is free)."""

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
