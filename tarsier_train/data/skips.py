"""Skipped samples, by reason: why a sample was skipped (a stable code, the same the shard writer rejects with), how
many a source has skipped, and the limit past which a source that mostly fails ends the run instead of spinning."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

from tarsier_train.data.record_check import RecordError
from tarsier_train.data.transform import NoTargetError, SampleTooLongError
from tarsier_train.data.video import VideoDecodeError

# A sample: the skips since the previous sample, {reason: count}. A batch: SKIPPED_KEY their number, SKIP_REASONS_KEY
# summed by reason.
SKIPPED_KEY, SKIP_REASONS_KEY = "num_skipped", "skip_reasons"
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (VideoDecodeError, "undecodable_media"),
    (SampleTooLongError, "too_long"),
    (NoTargetError, "no_target"),
)


def skip_reason(error: Exception) -> str:
    """The stable reason code of a sample's failure. An error of no known kind is a bug (a task template's, say),
    not bad data: its code names the exception type, so it stands out in the counts."""
    if isinstance(error, RecordError):
        return error.reason
    if isinstance(getattr(error, "reason", None), str):
        return error.reason
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return f"unexpected_{type(error).__name__}"


class TooManySkippedError(RuntimeError):
    """A source skips more of its samples than data.max_skipped_fraction allows."""


@dataclasses.dataclass(frozen=True)
class SkipBudget:
    """How much of a source may fail: past `max_fraction` of its samples, once a consumer has read `min_samples`
    of them (fewer say little about a source), the run ends naming the source and its top reasons. Whatever the
    fraction (1.0 included), `max_consecutive` skips in a row end it too: a source with nothing usable left would
    otherwise be read for ever, waiting for a sample that never comes."""

    max_fraction: float = 0.5
    min_samples: int = 100

    @property
    def max_consecutive(self) -> int:
        return CONSECUTIVE_PER_MIN_SAMPLES * self.min_samples


CONSECUTIVE_PER_MIN_SAMPLES = 10


class SkipCounter:
    """One consumer's (rank x loader worker) reads of one source: samples read, skipped by reason, and the skips not
    yet handed on with a sample (`take_pending`)."""

    def __init__(self, source: str, budget: SkipBudget):
        self.source, self.budget = source, budget
        self.num_read = self._consecutive = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()

    def add(self, reason: str | None) -> None:
        """Count one sample read: used (reason None) or skipped for `reason`."""
        self.num_read += 1
        self._consecutive = 0 if reason is None else self._consecutive + 1
        if reason is not None:
            self.reasons[reason] += 1
            self._pending[reason] += 1
            self._check_budget()

    def take_pending(self) -> dict[str, int]:
        """The skips since the last call, by reason (what the next yielded sample carries)."""
        pending = dict(self._pending)
        self._pending.clear()
        return pending

    def _check_budget(self) -> None:
        skipped, budget = self.reasons.total(), self.budget
        if self.num_read >= budget.min_samples and skipped > budget.max_fraction * self.num_read:
            limit = f"more than data.max_skipped_fraction={budget.max_fraction}"
        elif self._consecutive >= budget.max_consecutive:
            limit = (f"the last {self._consecutive} in a row ({CONSECUTIVE_PER_MIN_SAMPLES} x "
                     f"data.skip_check_min_samples={budget.min_samples})")
        else:
            return
        top = ", ".join(f"{reason} {count}" for reason, count in self.reasons.most_common(3))
        raise TooManySkippedError(
            f"data source {self.source}: {skipped} of the {self.num_read} samples one loader worker read were skipped "
            f"({skipped / self.num_read:.0%}), {limit}; top reasons: {top}. The log names each skipped sample's key "
            "and why; fix or drop those records (the shard writer rejects bad records by the same check), or raise "
            "data.max_skipped_fraction.")


def batch_skips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The skips a batch's samples carry: their number (a tensor, reduced across ranks in logging) and by reason."""
    reasons: collections.Counter[str] = collections.Counter()
    for sample in samples:
        reasons.update(sample.get(SKIP_REASONS_KEY, {}))
    return {SKIPPED_KEY: torch.tensor(reasons.total()), SKIP_REASONS_KEY: dict(reasons)}
