"""Which checkpoint a run starts from: none, the newest one in its run directory, or a given file."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from tarsier_train.checkpoint.atomic import PARTIAL_SUFFIX

log = logging.getLogger(__name__)

STEP_CHECKPOINT = re.compile(r"^step-(\d+)\.ckpt$")


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step: a file, or a sharded (DCP) directory; partial writes
    (*.partial) never match."""
    candidates = []
    for path in (Path(run_dir) / "checkpoints").glob("step-*.ckpt"):
        match = STEP_CHECKPOINT.match(path.name)
        if match and is_checkpoint(path):
            candidates.append((int(match.group(1)), path))
    return max(candidates)[1] if candidates else None


def remove_partial_saves(run_dir: str | Path) -> list[Path]:
    """Delete what killed saves left in <run_dir>/checkpoints: <name>.partial files (single-file checkpoints) and
    directories (sharded ones). Only the holder of the run directory's lock may call this: no live save is then
    writing there."""
    leftovers = sorted((Path(run_dir) / "checkpoints").glob("*" + PARTIAL_SUFFIX))
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        log.info("removed %s, left by an interrupted checkpoint save", path)
    return leftovers


def is_checkpoint(path: Path) -> bool:
    """A single-file checkpoint, or a sharded one: a DCP directory with Lightning's metadata file."""
    return path.is_file() or (path / "meta.pt").is_file()


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """resume=null starts fresh (refusing to mix with an existing run), 'auto' continues, a path loads it."""
    latest = find_latest_checkpoint(run_dir)
    if resume is None:
        if latest is not None:
            raise ValueError(
                f"run directory {run_dir} already holds checkpoints (newest: {latest.name}). "
                "Continue it with resume=auto, or start a new run with run_name=<new name>."
            )
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (allowed: null, auto, or a .ckpt file or "
                                "sharded checkpoint directory)")
    return path
