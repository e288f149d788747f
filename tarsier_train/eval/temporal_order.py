"""Temporal-order accuracy of toy-world descriptions: are the reference events the prediction names told in the
order they happened? Events are matched as event-F1 matches them (`parse_events`, exact (colour, shape, action)).

Only clips with at least two reference events have an order; the others add nothing. The k-th mention of an event
key is matched to its k-th occurrence in the reference (event-F1's one-to-one matching, made positional);
unparseable sentences and events the reference lacks are ignored here (event precision counts them).
Three shares, micro-averaged over clips (every pair, or every clip, weighs the same):
  clip_accuracy        clips whose prediction names every reference event, all in the reference order;
  pair_accuracy        reference event pairs (i < j) whose both events are named, i's before j's;
  named_pair_accuracy  the same over the pairs whose both events are named: order alone, apart from recall.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from tarsier_train.eval.event_f1 import EventKey, parse_events


@dataclasses.dataclass(frozen=True)
class TemporalOrderScore:
    """Counts over clips with >= 2 reference events; `add` sums them, the properties are the shares."""

    num_clips: int = 0  # clips with >= 2 reference events
    num_clips_in_order: int = 0  # of those: every reference event named, each pair in the reference order
    num_reference_pairs: int = 0  # reference event pairs (i < j)
    num_named_pairs: int = 0  # pairs whose both events the prediction names
    num_pairs_in_order: int = 0  # named pairs told in the reference order

    def add(self, other: TemporalOrderScore) -> TemporalOrderScore:
        summed = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return TemporalOrderScore(*(a + b for a, b in summed))

    @property
    def clip_accuracy(self) -> float:
        return self.num_clips_in_order / self.num_clips if self.num_clips else 0.0

    @property
    def pair_accuracy(self) -> float:
        return self.num_pairs_in_order / self.num_reference_pairs if self.num_reference_pairs else 0.0

    @property
    def named_pair_accuracy(self) -> float:
        return self.num_pairs_in_order / self.num_named_pairs if self.num_named_pairs else 0.0


def matched_positions(predicted: Sequence[EventKey | None], reference: Sequence[EventKey]) -> list[int | None]:
    """Per reference event, the index of the predicted sentence matched to it, or None when it is not named."""
    mentions: dict[EventKey, list[int]] = defaultdict(list)
    for index, event in enumerate(predicted):
        if event is not None:
            mentions[event].append(index)
    occurrence: Counter[EventKey] = Counter()
    positions: list[int | None] = []
    for event in map(tuple, reference):
        named = mentions.get(event, [])
        positions.append(named[occurrence[event]] if occurrence[event] < len(named) else None)
        occurrence[event] += 1
    return positions


def score_order(prediction: str, reference_events: Sequence[EventKey] | None) -> TemporalOrderScore:
    """One clip's order counts; a clip with fewer than two reference events (or none: `reference_events(record)`
    of a record without them) scores nothing, all zero."""
    if reference_events is None or len(reference_events) < 2:
        return TemporalOrderScore()
    pairs = list(itertools.combinations(matched_positions(parse_events(prediction), reference_events), 2))
    named = [(first, second) for first, second in pairs if first is not None and second is not None]
    in_order = sum(first < second for first, second in named)
    return TemporalOrderScore(1, int(in_order == len(pairs)), len(pairs), len(named), in_order)


def corpus_order_score(pairs: Iterable[tuple[str, Sequence[EventKey] | None]]) -> TemporalOrderScore:
    """Summed over (prediction, reference events) of every clip."""
    total = TemporalOrderScore()
    for prediction, reference in pairs:
        total = total.add(score_order(prediction, reference))
    return total
