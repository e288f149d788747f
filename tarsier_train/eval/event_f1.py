"""Exact event precision/recall/F1 for toy-world descriptions (AutoDQ's scoring, with exact matching)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from tarsier_train.data.record_check import extra_info
from tarsier_train.toyworld.world import ACTIONS, COLOURS, SHAPES

_EVENT = re.compile(
    rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(ACTIONS)})\b"
)

EventKey = tuple[str, str, str]


def reference_events(record: dict) -> list[EventKey] | None:
    """The exact ground-truth events of a record's extra_info.events: {colour, shape, action} objects (the toy
    world's), or strings / {start, end, text} objects whose text names one toy-world event each. None when the record
    has no events or this exact judge cannot read them (DREAM-1K's free-text events: an LLM judge's job, AutoDQ)."""
    events = extra_info(record).get("events")
    if not isinstance(events, list) or not events:
        return None
    keys = [_event_key(event) for event in events]
    return None if None in keys else keys  # type: ignore[return-value]


def _event_key(event: object) -> EventKey | None:
    if isinstance(event, dict) and all(isinstance(event.get(part), str) for part in ("colour", "shape", "action")):
        return event["colour"], event["shape"], event["action"]
    text = event.get("text") if isinstance(event, dict) else event
    parsed = parse_events(text) if isinstance(text, str) else []
    return parsed[0] if len(parsed) == 1 else None


def parse_events(text: str) -> list[EventKey | None]:
    """One entry per sentence: (colour, shape, action), or None for a sentence that names no event."""
    sentences = [s for s in re.split(r"[.\n]", re.sub(r"<frame:[^>]*>", " ", text)) if s.strip()]
    parsed: list[EventKey | None] = []
    for sentence in sentences:
        match = _EVENT.search(sentence.lower())
        parsed.append(match.groups() if match else None)  # type: ignore[arg-type]
    return parsed


@dataclasses.dataclass
class EventScore:
    num_matched: int = 0
    num_predicted: int = 0
    num_reference: int = 0

    def add(self, other: "EventScore") -> "EventScore":
        return EventScore(self.num_matched + other.num_matched, self.num_predicted + other.num_predicted,
                          self.num_reference + other.num_reference)

    @property
    def precision(self) -> float:
        return self.num_matched / self.num_predicted if self.num_predicted else 0.0

    @property
    def recall(self) -> float:
        return self.num_matched / self.num_reference if self.num_reference else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def score_description(prediction: str, reference_events: Sequence[EventKey], ordered: bool = False) -> EventScore:
    """Match predicted events to reference events one to one; unparseable sentences count as wrong. `ordered`:
    only matches that keep the reference order count (the longest common subsequence), so an event told out of
    order is missed and wrong at once."""
    predicted = parse_events(prediction)
    reference = list(map(tuple, reference_events))
    if ordered:
        num_matched = _longest_common_subsequence([e for e in predicted if e is not None], reference)
    else:
        num_matched = sum((Counter(e for e in predicted if e is not None) & Counter(reference)).values())
    return EventScore(num_matched, len(predicted), len(reference))


def _longest_common_subsequence(a: Sequence[EventKey], b: Sequence[EventKey]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def corpus_event_score(pairs: Iterable[tuple[str, Sequence[EventKey]]]) -> EventScore:
    """Micro-averaged over all clips: every event weighs the same."""
    total = EventScore()
    for prediction, reference in pairs:
        total = total.add(score_description(prediction, reference))
    return total
