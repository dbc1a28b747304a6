"""`tinker://<training_run_id>/<kind>/<name>` paths and where they live on disk.

A tinker path names one checkpoint directory, `<root>/<run_id>/<kind>/<name>/`. The path comes
from clients, so every part is checked before it touches the filesystem: a part must be a single,
plain directory name that cannot climb out of the storage root ('..', '/', '\\', NUL, ...).
Names may not start with '.', which also keeps them apart from the hidden temp directories that
atomic writes use beside a checkpoint.
"""

from dataclasses import dataclass
from pathlib import Path

SCHEME = "tinker://"

# Path segment -> the checkpoint_type clients see (tinker types/checkpoint.py).
KINDS: dict[str, str] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}

# Room for the ".<name>.tmp-<8 hex>" sibling within a 255-byte filename.
MAX_PART_BYTES = 200


def check_part(value: str, what: str) -> str:
    """Return `value` if it is safe as one directory name, else raise ValueError saying why."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if "/" in value or "\\" in value:
        raise ValueError(f"{what} {value!r} must not contain '/' or '\\'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{what} {value!r} must not contain NUL or control characters")
    if value.startswith("."):
        raise ValueError(f"{what} {value!r} must not start with '.'")
    if len(value.encode("utf-8")) > MAX_PART_BYTES:
        raise ValueError(f"{what} is longer than {MAX_PART_BYTES} bytes")
    return value


@dataclass(frozen=True)
class TinkerPath:
    """One checkpoint: the training run (model id) it belongs to, its kind and its name."""

    run_id: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        check_part(self.run_id, "training run id")
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint kind {self.kind!r} must be one of {', '.join(KINDS)}")
        check_part(self.name, "checkpoint name")

    @classmethod
    def parse(cls, path: str) -> "TinkerPath":
        """Parse `tinker://<run_id>/<kind>/<name>` (exactly three parts)."""
        if not isinstance(path, str) or not path.startswith(SCHEME):
            raise ValueError(f"not a tinker path (must start with {SCHEME!r}): {path!r}")
        parts = path[len(SCHEME) :].split("/")
        if len(parts) != 3:
            raise ValueError(
                f"tinker path must be {SCHEME}<training_run_id>/<kind>/<name> "
                f"(3 parts, the name without '/'), got {len(parts)} parts: {path!r}"
            )
        return cls(*parts)

    @classmethod
    def from_checkpoint_id(cls, run_id: str, checkpoint_id: str) -> "TinkerPath":
        """Build from the REST form: run id plus checkpoint id `<kind>/<name>`."""
        kind, sep, name = checkpoint_id.partition("/")
        if not sep:
            raise ValueError(f"checkpoint id must be <kind>/<name>, got {checkpoint_id!r}")
        return cls(run_id, kind, name)

    @classmethod
    def from_storage_dir(cls, root: Path, directory: Path) -> "TinkerPath":
        """The tinker path whose checkpoint is stored at `directory` under `root`."""
        try:
            rel = Path(directory).resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise ValueError(f"{directory} is not inside the checkpoint root {root}") from None
        if len(rel.parts) != 3:
            raise ValueError(f"{directory} is not <root>/<run_id>/<kind>/<name>")
        return cls(*rel.parts)

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        """`<kind>/<name>`, the id used in the REST checkpoint endpoints."""
        return f"{self.kind}/{self.name}"

    @property
    def checkpoint_type(self) -> str:
        """'training', 'sampler' or 'external'."""
        return KINDS[self.kind]

    def storage_dir(self, root: Path) -> Path:
        """`<root>/<run_id>/<kind>/<name>`; the parts were validated, so it stays under root."""
        return Path(root) / self.run_id / self.kind / self.name
