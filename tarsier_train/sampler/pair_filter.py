"""Which sampled (chosen, rejected) pairs become DPO data: Tarsier2's gain rule, then an optional cap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from tarsier_train.sampler.judges import ScoreLike

T = TypeVar("T")

# Scores are ratios (1/3, 0.7 - 0.4 = 0.29999999999999993): compare with this slack so a gain that is exactly
# the threshold on paper is kept. Far below any real score difference (at most 1/num_events apart).
_TOLERANCE = 1e-9


def score_gains(chosen: ScoreLike, rejected: ScoreLike) -> tuple[float, float]:
    """(ΔR, ΔP) = chosen − rejected."""
    return chosen.recall - rejected.recall, chosen.precision - rejected.precision


def keep_pair(chosen: ScoreLike, rejected: ScoreLike, min_gain: float = 0.3) -> bool:
    """Tarsier2's rule: keep iff ΔR ≥ 0, ΔP ≥ 0 and ΔR + ΔP ≥ min_gain (δ, 0.3 in the paper)."""
    delta_r, delta_p = score_gains(chosen, rejected)
    return delta_r >= -_TOLERANCE and delta_p >= -_TOLERANCE and delta_r + delta_p >= min_gain - _TOLERANCE


def subsample(pairs: Sequence[T], max_pairs: int | None, rng: np.random.Generator) -> list[T]:
    """At most `max_pairs` of `pairs`, drawn without replacement and kept in their original order
    (all of them when max_pairs is None or not smaller than their number)."""
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs)
    return [pairs[k] for k in np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))]
