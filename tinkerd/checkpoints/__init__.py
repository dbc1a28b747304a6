"""Files: tinker:// paths <-> storage, atomic writes, PEFT-format adapters, optimizer state."""
