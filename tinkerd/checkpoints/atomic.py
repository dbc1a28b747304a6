"""Atomic directory writes: a checkpoint directory is either complete or absent.

Files are written into a hidden temp directory beside the target (same filesystem, so the final
rename is atomic), fsynced, and then renamed into place. Replacing an existing checkpoint moves
the old one aside first (`.<name>.old-*`), renames the new one in and only then deletes the old
one; if the process dies in between, `cleanup_leftovers` puts the old one back. A crash at any
point therefore leaves either the old or the new complete checkpoint, plus hidden leftovers that
loaders never look at and `cleanup_leftovers` removes.
"""

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old|del)-[0-9a-f]{8}$")


def _sibling(target: Path, what: str) -> Path:
    return target.parent / f".{target.name}.{what}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories, deepest first."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory; on a clean exit it becomes `target` atomically.

    If the block raises, the temp directory is removed and `target` is untouched. With
    overwrite=False an existing `target` raises FileExistsError (before and after writing).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"checkpoint already exists: {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename `tmp` to `target`, moving an existing target aside first when overwriting."""
    old: Path | None = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"checkpoint already exists: {target}")
        old = _sibling(target, "old")
        os.replace(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous checkpoint back
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(target: Path) -> bool:
    """Delete a checkpoint directory so that no half-deleted one is ever visible under its name.

    Renames it aside first (atomic), then removes the files. Returns False if it did not exist.
    """
    target = Path(target)
    if not target.exists():
        return False
    doomed = _sibling(target, "del")
    os.replace(target, doomed)
    fsync_dir(target.parent)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def cleanup_leftovers(root: Path) -> list[Path]:
    """Remove what interrupted writes and deletes left under `root`; returns what it handled.

    Call it when no write is in progress (at startup). An `.old-*` copy whose checkpoint is
    missing (a crash during overwrite) is renamed back instead of removed.
    """
    root = Path(root)
    handled: list[Path] = []
    if not root.exists():
        return handled
    for dirpath, dirnames, _ in os.walk(root):
        for dirname in list(dirnames):
            match = LEFTOVER.match(dirname)
            if match is None:
                continue
            dirnames.remove(dirname)  # don't descend into it
            path = Path(dirpath) / dirname
            original = Path(dirpath) / match["name"]
            if match["what"] == "old" and not original.exists():
                os.replace(path, original)
            else:
                shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
    return handled
