"""Preference sampler parts: frame-index corruptions, judges, pair filtering."""

from tarsier_train.sampler.corruptions import (
    CORRUPTIONS,
    Corruption,
    choose_corruption,
    crop,
    discard_half,
    exchange_segments,
    reverse_span,
)
from tarsier_train.sampler.judges import AutoDQJudge, AutoDQScore, Judge, JudgeError, ScoreLike, ToyWorldJudge
from tarsier_train.sampler.pair_filter import keep_pair, score_gains, subsample

__all__ = [
    "CORRUPTIONS",
    "AutoDQJudge",
    "AutoDQScore",
    "Corruption",
    "Judge",
    "JudgeError",
    "ScoreLike",
    "ToyWorldJudge",
    "choose_corruption",
    "crop",
    "discard_half",
    "exchange_segments",
    "keep_pair",
    "reverse_span",
    "score_gains",
    "subsample",
]
