"""Frame-grounding accuracy of SFT-1 outputs: are the `<frame: i-j>` spans of the described events right?"""

from __future__ import annotations

import dataclasses
import re

from tarsier_train.eval.event_f1 import EventKey, parse_events

_TAGGED = re.compile(r"<frame:\s*(\d+)\s*-\s*(\d+)>([^<]*)")

Span = tuple[int, int]


def parse_grounded(text: str) -> list[tuple[Span, EventKey | None]]:
    """((first, last) sampled-frame positions, event) for each tagged event of a grounded description."""
    return [((int(first), int(last)), next(iter(parse_events(sentence)), None))
            for first, last, sentence in _TAGGED.findall(text)]


@dataclasses.dataclass(frozen=True)
class GroundingScore:
    """Over the reference events: how many the prediction names with the exact span, and the summed span IoU
    (an event the prediction does not name scores 0)."""

    num_exact: int = 0
    iou_sum: float = 0.0
    num_reference: int = 0

    def add(self, other: "GroundingScore") -> "GroundingScore":
        return GroundingScore(self.num_exact + other.num_exact, self.iou_sum + other.iou_sum,
                              self.num_reference + other.num_reference)

    @property
    def exact_accuracy(self) -> float:
        return self.num_exact / self.num_reference if self.num_reference else 0.0

    @property
    def mean_iou(self) -> float:
        return self.iou_sum / self.num_reference if self.num_reference else 0.0


def span_iou(a: Span, b: Span) -> float:
    overlap = min(a[1], b[1]) - max(a[0], b[0]) + 1
    union = max(a[1], b[1]) - min(a[0], b[0]) + 1
    return max(0, overlap) / union


def score_grounding(prediction: str, reference: str) -> GroundingScore:
    """Each reference event is matched to the first unused predicted event with the same (colour, shape, action)."""
    predicted = parse_grounded(prediction)
    used: set[int] = set()
    exact, iou_sum = 0, 0.0
    references = [(span, event) for span, event in parse_grounded(reference) if event is not None]
    for span, event in references:
        match = next((i for i, (_, e) in enumerate(predicted) if e == event and i not in used), None)
        if match is None:
            continue
        used.add(match)
        exact += predicted[match][0] == span
        iou_sum += span_iou(predicted[match][0], span)
    return GroundingScore(exact, iou_sum, len(references))
