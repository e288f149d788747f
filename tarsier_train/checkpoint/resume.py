"""Which checkpoint a run starts from: none, the newest one in its run directory, or a given file."""

from __future__ import annotations

import re
from pathlib import Path

STEP_CHECKPOINT = re.compile(r"^step-(\d+)\.ckpt$")


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step; partial writes (*.partial) never match."""
    candidates = []
    for path in (Path(run_dir) / "checkpoints").glob("step-*.ckpt"):
        match = STEP_CHECKPOINT.match(path.name)
        if match and path.is_file():
            candidates.append((int(match.group(1)), path))
    return max(candidates)[1] if candidates else None


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
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file (allowed: null, auto, or a .ckpt path)")
    return path
