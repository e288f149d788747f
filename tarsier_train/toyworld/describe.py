"""Toy-world events as text: the plain description (SFT target) and the grounded one (SFT-1)."""

from __future__ import annotations

from collections.abc import Sequence

from tarsier_train.toyworld.world import Event

DESCRIBE_PROMPT = "Describe the video in detail."


def event_sentence(event: Event) -> str:
    return f"The {event.colour} {event.shape} {event.action}."


def describe(events: Sequence[Event]) -> str:
    return " ".join(event_sentence(e) for e in events)


def describe_grounded(events: Sequence[Event], sampled_frames: Sequence[int]) -> str:
    """Tag each event with the 1-based positions of the sampled frames inside its span.

    Events that no sampled frame falls into are left out: the model cannot see them.
    """
    parts = []
    for event in events:
        seen = [i + 1 for i, f in enumerate(sampled_frames) if event.start <= f <= event.end]
        if seen:
            parts.append(f"<frame: {seen[0]}-{seen[-1]}> {event_sentence(event)}")
    return " ".join(parts)
