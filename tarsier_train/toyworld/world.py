"""Synthetic clips of one coloured shape whose events (and their frame spans) are known exactly."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
MOVES = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}
ACTIONS = (*MOVES, "grows", "shrinks", "appears", "disappears")
Action = Literal["moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "appears", "disappears"]

BACKGROUND = (235, 235, 235)
GROWTH = 1.6  # size ratio across a grow/shrink event: large enough to see at 28 px per merged token
MOVE_FRACTION = 0.4  # a move crosses this share of the frame


@dataclasses.dataclass(frozen=True)
class Event:
    """One thing the object does over the inclusive frame span [start, end] (0-based clip frames)."""

    colour: str
    shape: str
    action: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    events: tuple[Event, ...]
    # per frame: centre x, centre y, half-size in pixels, visible
    track: tuple[tuple[float, float, float, bool], ...]


def _split_frames(num_frames: int, num_events: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Cut [0, num_frames) into consecutive spans of at least 4 frames each."""
    min_len = 4
    slack = num_frames - min_len * num_events
    cuts = np.sort(rng.integers(0, slack + 1, size=num_events - 1))
    lengths = np.diff(np.concatenate([[0], cuts, [slack]])) + min_len
    spans, start = [], 0
    for length in lengths:
        spans.append((start, start + int(length) - 1))
        start += int(length)
    return spans


def _feasible(action: str, x: float, y: float, half: float, frame_size: int, move_distance: float,
              index: int, num_events: int, min_half: float, max_half: float) -> bool:
    if action == "appears":
        return index == 0
    if action == "disappears":
        return index == num_events - 1
    if action == "grows":
        return half * GROWTH <= max_half and _inside(x, y, half * GROWTH, frame_size)
    if action == "shrinks":
        return half / GROWTH >= min_half
    dx, dy = MOVES[action]
    return _inside(x + dx * move_distance, y + dy * move_distance, half, frame_size)


def _inside(x: float, y: float, half: float, frame_size: int) -> bool:
    return half <= x <= frame_size - half and half <= y <= frame_size - half


def generate_clip(rng: np.random.Generator, num_frames: int = 16, frame_size: int = 112,
                  max_events: int = 3) -> Clip:
    """Draw one clip: an object, 1..max_events consecutive events, and its exact per-frame track."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    # Every move crosses well over one 28-px merged token, however short its span (DESIGN.md: toy
    # world probes), and objects are large enough for a tiny ViT to tell the shapes apart.
    move_distance = frame_size * MOVE_FRACTION
    min_half, max_half = frame_size / 10, frame_size / 3.5
    while True:
        num_events = int(rng.integers(1, max_events + 1))
        spans = _split_frames(num_frames, num_events, rng)
        half = float(rng.uniform(frame_size / 8, frame_size / 5.5))
        x = float(rng.uniform(half, frame_size - half))
        y = float(rng.uniform(half, frame_size - half))
        track: list[tuple[float, float, float, bool]] = []
        events: list[Event] = []
        for index, (start, end) in enumerate(spans):
            length = end - start + 1
            options = [a for a in ACTIONS if _feasible(a, x, y, half, frame_size, move_distance, index,
                                                        num_events, min_half, max_half)]
            options = [a for a in options if not events or events[-1].action != a]
            if not options:
                break
            action = str(rng.choice(options))
            events.append(Event(colour, shape, action, start, end))
            track.extend(_animate(action, x, y, half, length, move_distance))
            x, y, half, _ = track[-1]
        if len(events) == num_events:
            return Clip(colour, shape, tuple(events), tuple(track))


def _animate(action: str, x: float, y: float, half: float, length: int,
             move_distance: float) -> list[tuple[float, float, float, bool]]:
    ratios = np.linspace(0.0, 1.0, length)
    if action in MOVES:
        dx, dy = MOVES[action]
        return [(x + dx * move_distance * r, y + dy * move_distance * r, half, True) for r in ratios]
    if action in ("grows", "shrinks"):
        target = half * GROWTH if action == "grows" else half / GROWTH
        return [(x, y, half + (target - half) * r, True) for r in ratios]
    # appears/disappears: absent for the first/second half of the span
    switch = length // 2
    visible = [t >= switch for t in range(length)] if action == "appears" else [t < switch for t in range(length)]
    return [(x, y, half, v) for v in visible]


def render_frames(clip: Clip, frame_size: int = 112) -> np.ndarray:
    """Frames as uint8 (T, H, W, 3)."""
    yy, xx = np.mgrid[0:frame_size, 0:frame_size].astype(np.float32) + 0.5
    frames = np.empty((len(clip.track), frame_size, frame_size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    colour = np.array(COLOURS[clip.colour], dtype=np.uint8)
    for t, (x, y, half, visible) in enumerate(clip.track):
        if visible:
            frames[t][_shape_mask(clip.shape, xx - x, yy - y, half)] = colour
    return frames


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half * 0.85) & (np.abs(dy) <= half * 0.85)
    # triangle pointing up, inscribed in the square of side 2*half
    inside_base = dy <= half
    inside_sides = np.abs(dx) <= (dy + half) / 2
    return inside_base & inside_sides
