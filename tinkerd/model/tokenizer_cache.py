"""Seed the local Hugging Face hub cache with a served model's tokenizer.

Tinker clients load tokenizers themselves with `transformers.AutoTokenizer.from_pretrained(name)`
(the SDK's `SamplingClient.get_tokenizer()`, the cookbook's `tokenizer_utils.get_tokenizer`).
Without hub access that only works if `name` is a local directory or is already in the HF cache.
`write_tokenizer_cache` writes a model's tokenizer files into the cache layout the hub client
reads, so that with `HF_HUB_OFFLINE=1` the hub name resolves offline:

    <cache>/models--<org>--<name>/refs/main                      -> <rev>
    <cache>/models--<org>--<name>/snapshots/<rev>/tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja, ... (whichever the source has), config.json

`<rev>` is the SHA-1 of the written files (names and bytes), so the same tokenizer always lands
in the same snapshot and rewriting it changes nothing. Files are plain copies (no `blobs/`
symlinks), which huggingface_hub reads the same way.
"""

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from tinkerd.constants import EMBEDDED_MODEL

# Tokenizer files copied when the source has them (config.json is handled separately).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    # A VL model's image processor: clients (the cookbook's renderers) size image tokens with it.
    "preprocessor_config.json",
)
# Keys that describe how the source tokenizer was loaded, not the tokenizer itself.
_LOAD_STATE_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


@dataclass(frozen=True)
class CachedTokenizer:
    """Where a tokenizer was written: `repo_id` resolves offline from `cache_dir`."""

    repo_id: str
    revision: str
    cache_dir: Path
    snapshot_dir: Path
    files: tuple[str, ...]
    changed: bool  # False when the snapshot and refs/main were already exactly this


def default_hub_cache() -> Path:
    """The hub cache huggingface_hub uses in this process (`HF_HUB_CACHE`, else `HF_HOME/hub`,
    else `~/.cache/huggingface/hub`)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def tokenizer_files(source_dir: Path) -> dict[str, bytes]:
    """The files to publish for the tokenizer in `source_dir`, by name."""
    source_dir = Path(source_dir)
    files: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        path = source_dir / name
        if path.is_file():
            files[name] = path.read_bytes()
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {source_dir}")
    if "tokenizer_config.json" in files:
        config = json.loads(files["tokenizer_config.json"])
        for key in _LOAD_STATE_KEYS:
            config.pop(key, None)
        files["tokenizer_config.json"] = _json_bytes(config)
    # transformers 5 wants a config.json next to the tokenizer (it raises OSError without one).
    # The real one is small and tells AutoTokenizer the model type; else a minimal stand-in.
    config_path = source_dir / "config.json"
    files["config.json"] = (
        config_path.read_bytes() if config_path.is_file() else _json_bytes({"model_type": "llama"})
    )
    return files


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def revision_of(files: dict[str, bytes]) -> str:
    """A deterministic 40-hex revision: SHA-1 over the sorted (name, content) pairs."""
    digest = hashlib.sha1(usedforsecurity=False)
    for name in sorted(files):
        content = files[name]
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def write_tokenizer_cache(
    repo_id: str, source_dir: Path | str, cache_dir: Path | str | None = None
) -> CachedTokenizer:
    """Publish the tokenizer in `source_dir` as hub repo `repo_id` in the HF cache `cache_dir`
    (default: huggingface_hub's, which honours `HF_HUB_CACHE` / `HF_HOME`). Idempotent."""
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    cache = Path(cache_dir) if cache_dir is not None else default_hub_cache()
    files = tokenizer_files(Path(source_dir))
    revision = revision_of(files)
    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo_dir / "snapshots" / revision
    ref = repo_dir / "refs" / "main"

    changed = False
    if not _snapshot_matches(snapshot, files):
        changed = True
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = snapshot.parent / f".{revision}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, content in files.items():
                (tmp / name).write_bytes(content)
            if snapshot.exists():  # a damaged earlier write: replace it whole
                shutil.rmtree(snapshot)
            os.replace(tmp, snapshot)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not ref.is_file() or ref.read_text().strip() != revision:
        changed = True
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = ref.parent / f".main.tmp-{uuid.uuid4().hex[:8]}"
        tmp_ref.write_text(revision)
        os.replace(tmp_ref, ref)
    return CachedTokenizer(
        repo_id=repo_id,
        revision=revision,
        cache_dir=cache,
        snapshot_dir=snapshot,
        files=tuple(sorted(files)),
        changed=changed,
    )


def _snapshot_matches(snapshot: Path, files: dict[str, bytes]) -> bool:
    if not snapshot.is_dir():
        return False
    present = {p.name for p in snapshot.iterdir()}
    if present != set(files):
        return False
    return all((snapshot / name).read_bytes() == content for name, content in files.items())


def source_for_model(name: str, data_dir: Path) -> Path | None:
    """The local directory holding `name`'s tokenizer, or None when `name` is itself a local
    directory (clients already load it by that path; there is no hub name to publish).

    The embedded model is converted into `data_dir` if needed. Other hub names are looked up in
    the default HF cache (where the server downloaded them); FileNotFoundError if absent.
    """
    from tinkerd.model.loading import convert_embedded_model

    if Path(name).is_dir():
        return None
    if name == EMBEDDED_MODEL:
        return convert_embedded_model(data_dir)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name, local_files_only=True, allow_patterns=[*TOKENIZER_FILES, "config.json"]
            )
        )
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"{name} is not in the local HF cache; start the server with it once first"
        ) from exc
