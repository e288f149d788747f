"""Tarsier2 DPO negatives: corruptions of a clip's sampled FRAME INDICES, so the sampler decodes only the
frames the rejected description is generated from.

Every corruption takes the clean indices (N of them, as `tarsier_train.data.sampling` draws them), the
video's total frame count and the clip's generator, and returns the corrupted index list."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tarsier_train.data.sampling import uniform_frame_indices

CorruptionFn = Callable[..., list[int]]  # (indices, num_total, rng, **params) -> indices

NUM_SEGMENTS = 4


def exchange_segments(indices: Sequence[int], num_total: int, rng: np.random.Generator) -> list[int]:
    """Cut the N indices into 4 consecutive segments and swap two distinct ones (any of the 6 pairs).
    N not divisible by 4: `np.array_split` sizes (earlier segments one longer), so the segments between
    two swapped ones of unequal size shift by one position."""
    _check(indices, num_total, min_frames=NUM_SEGMENTS, name="exchange_segments")
    segments = [list(s) for s in np.array_split(np.asarray(indices), NUM_SEGMENTS)]
    first, second = rng.choice(NUM_SEGMENTS, size=2, replace=False)
    segments[first], segments[second] = segments[second], segments[first]
    return [int(i) for segment in segments for i in segment]


def reverse_span(indices: Sequence[int], num_total: int, rng: np.random.Generator) -> list[int]:
    """Reverse one random contiguous span of ceil(N/2)..N indices (at least 2, so the order always changes)."""
    _check(indices, num_total, min_frames=2, name="reverse_span")
    n = len(indices)
    length = int(rng.integers(max(2, (n + 1) // 2), n + 1))
    start = int(rng.integers(0, n - length + 1))
    out = [int(i) for i in indices]
    out[start:start + length] = out[start:start + length][::-1]
    return out


def crop(indices: Sequence[int], num_total: int, rng: np.random.Generator, crop_fraction: float = 0.5) -> list[int]:
    """N indices resampled uniformly (first and last included) inside a random window of `crop_fraction` of the
    clip: 0.5 as in the Tarsier2 paper, 0.75 as in the released code. The clip is the span the clean indices
    cover (the whole video for uniform sampling, the record's window when it has one)."""
    _check(indices, num_total, min_frames=1, name="crop")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    first, last = min(indices), max(indices)
    window = max(1, round(crop_fraction * (last - first + 1)))
    start = int(rng.integers(first, last - window + 2))
    return [start + i for i in uniform_frame_indices(window, len(indices))]


def discard_half(indices: Sequence[int], num_total: int, rng: np.random.Generator) -> list[int]:
    """Keep a random half (N // 2) of the indices, in their order. A random half rather than every other one:
    every other frame is just a lower frame rate, which rarely changes a description enough for the filter
    to keep the pair; random gaps can drop short events."""
    _check(indices, num_total, min_frames=2, name="discard_half")
    kept = np.sort(rng.choice(len(indices), size=len(indices) // 2, replace=False))
    return [int(indices[k]) for k in kept]


CORRUPTIONS: dict[str, CorruptionFn] = {
    "exchange_segments": exchange_segments,
    "reverse_span": reverse_span,
    "crop": crop,
    "discard_half": discard_half,
}


@dataclasses.dataclass(frozen=True)
class Corruption:
    """Which corruption a pair's rejected side was generated with, and its settings (the pair's provenance)."""

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        fn = _lookup(self.name)
        try:
            inspect.signature(fn).bind([0], 1, None, **self.params)
        except TypeError:
            allowed = [p for p in inspect.signature(fn).parameters if p not in ("indices", "num_total", "rng")]
            raise ValueError(f"corruption {self.name!r}: params {sorted(self.params)}; allowed params are "
                             f"{allowed or 'none'}") from None

    def apply(self, indices: Sequence[int], num_total: int, rng: np.random.Generator) -> list[int]:
        return CORRUPTIONS[self.name](indices, num_total, rng, **self.params)


def choose_corruption(names: Sequence[str], rng: np.random.Generator,
                      params: Mapping[str, Mapping[str, Any]] | None = None) -> Corruption:
    """One of `names`, uniformly at random, with its settings from `params` (e.g. {"crop": {"crop_fraction": 0.75}})."""
    if not names:
        raise ValueError(f"no corruptions to choose from; allowed values are {', '.join(CORRUPTIONS)}")
    for name in [*names, *(params or {})]:
        _lookup(name)
    name = names[int(rng.integers(len(names)))]
    return Corruption(name, dict((params or {}).get(name, {})))


def _lookup(name: str) -> CorruptionFn:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: allowed values are {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def _check(indices: Sequence[int], num_total: int, min_frames: int, name: str) -> None:
    if len(indices) < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} sampled frames, got {len(indices)}")
    bad = [int(i) for i in indices if not 0 <= int(i) < num_total]
    if bad:
        raise ValueError(f"{name}: frame indices {bad[:5]} outside a video of {num_total} frames")
