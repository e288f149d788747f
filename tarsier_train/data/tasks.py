"""Task templates, all in one place: a record's `task` decides how its sampled frames become a prompt and
a target. Records that carry their own question and answer (caption, QA, multiple choice) are used as
written; grounding and frame-order targets are built from the frames actually sampled."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from tarsier_train.data.records import VideoTextSample

DEFAULT_PROMPTS = {
    "video/caption": "Describe the video in detail.",
    "video/grounding": "Describe the video in detail. Start each event with the frames it happens in, "
                       "as <frame: i-j>.",
    "video/frame_order": "The {num_frames} frames of this video are shuffled. In time order, the first {num_given} "
                         "are frames {given}. Which frames follow, in time order?",
}


@dataclasses.dataclass(frozen=True)
class TaskInput:
    """What the model sees and must answer for one sample."""

    key: str
    prompt: str
    target: str
    frames: np.ndarray | None  # sampled frames in the order the model sees them (T, H, W, 3); None: text-only


def as_written(sample: VideoTextSample, frames: np.ndarray | None, indices: Sequence[int],
               rng: np.random.Generator) -> TaskInput:
    prompt = sample.prompt or DEFAULT_PROMPTS.get(sample.record.get("task", ""), DEFAULT_PROMPTS["video/caption"])
    return TaskInput(sample.key, prompt, sample.target, frames)


def grounding(sample: VideoTextSample, frames: np.ndarray, indices: Sequence[int],
              rng: np.random.Generator) -> TaskInput:
    """Each event of extra_info.events ({start, end, text}: video frame span) tagged with the 1-based
    positions of the sampled frames inside it; an event no sampled frame shows is left out."""
    parts = []
    for event in sample.record.get("extra_info", {}).get("events", []):
        seen = [i + 1 for i, frame in enumerate(indices) if event["start"] <= frame <= event["end"]]
        if seen:
            parts.append(f"<frame: {seen[0]}-{seen[-1]}> {event['text']}")
    if not parts:
        raise ValueError(f"{sample.key}: grounding record has no event inside the sampled frames")
    return TaskInput(sample.key, sample.prompt or DEFAULT_PROMPTS["video/grounding"], " ".join(parts), frames)


def frame_order(sample: VideoTextSample, frames: np.ndarray, indices: Sequence[int],
                rng: np.random.Generator) -> TaskInput:
    """Tarsier2's frame-order prediction: shuffle the frames, give the first floor(3N/8) in time order
    (as 1-based positions in the shuffled clip), ask for the rest."""
    order = rng.permutation(len(frames))  # shuffled position p shows original frame order[p]
    position_of = np.argsort(order) + 1  # original frame t sits at shuffled position position_of[t]
    num_given = 3 * len(frames) // 8
    given = ", ".join(map(str, position_of[:num_given]))
    prompt = DEFAULT_PROMPTS["video/frame_order"].format(num_frames=len(frames), num_given=num_given, given=given)
    return TaskInput(sample.key, prompt, ", ".join(map(str, position_of[num_given:])), frames[order])


TEMPLATES: dict[str, Callable[..., TaskInput]] = {
    "video/grounding": grounding,
    "video/frame_order": frame_order,
}


def render_task(sample: VideoTextSample, frames: np.ndarray | None, indices: Sequence[int],
                rng: np.random.Generator | None) -> TaskInput:
    """rng is the sample's generator in training; evaluation derives a fixed one from the key."""
    rng = rng if rng is not None else np.random.default_rng(zlib.crc32(sample.key.encode()))
    return TEMPLATES.get(sample.record.get("task", ""), as_written)(sample, frames, indices, rng)
