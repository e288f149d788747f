"""The process's random number generators as checkpoint data: a resumed run continues every stream (dropout,
random draws in the training step) where the killed run left it, on every rank."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and every CUDA device), numpy and Python generator states, as plain data."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])


def all_ranks_rng_states() -> list[dict[str, Any]]:
    """Every rank's states, indexed by rank (a collective: call it on all ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_states()]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rng_states())
    return gathered


def restore_rank_rng_states(per_rank: list[dict[str, Any]]) -> None:
    """This rank's saved states. After a resume on another number of ranks, rank r takes saved rank r mod the old
    count: the streams go on, though not as any uninterrupted run would have drawn them (none exists)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    set_rng_states(per_rank[rank % len(per_rank)])
