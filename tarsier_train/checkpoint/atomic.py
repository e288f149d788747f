"""Durable replacement of a file: a crash at any point leaves the old content or the new, never a mix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# The name of an unfinished write beside its target; resume never picks one, the next start removes it.
PARTIAL_SUFFIX = ".partial"


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a created or renamed file) durable; a file's own fsync does not."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` fills <path>.partial beside `path` (the same filesystem, so never a small $TMPDIR, and the rename
    is atomic); the file and its directory are fsynced before the rename, the directory again after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(partial, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_directory(path.parent)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a kill -9 leaves it instead: remove_partial_saves at the next start
        raise
    fsync_directory(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda handle: handle.write(text.encode()))
