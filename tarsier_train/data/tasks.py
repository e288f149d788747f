"""Task templates, all in one place: a record's `task` decides how its decoded media become a prompt and
a target. Records that carry their own question and answer (caption, QA, multiple choice, image and
text-only tasks) are used as written; grounding, frame-order and tracking targets are built from the
frames actually sampled."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from tarsier_train.data.record_check import RecordError, extra_info
from tarsier_train.data.records import Turn, VideoTextSample

DEFAULT_PROMPTS = {
    "video/caption": "Describe the video in detail.",
    "image/caption": "Describe the image in detail.",
    "video/grounding": "Describe the video in detail. Start each event with the frames it happens in, "
                       "as <frame: i-j>.",
    "video/frame_order": "The {num_frames} frames of this video are shuffled. In time order, the first {num_given} "
                         "are frames {given}. Which frames follow, in time order?",
    "video/tracking": "{object} is at {box} in frame {first}. Give its box in each later frame.",
}


@dataclasses.dataclass(frozen=True)
class Visual:
    """One decoded media item, as the model sees it."""

    kind: Literal["video", "image"]
    pixels: np.ndarray  # video: (T, H, W, 3) frames in the order the model sees them; image: (H, W, 3)
    seconds_per_frame: float | None = None  # video: time between sampled frames (Qwen2.5-VL's temporal spacing)
    times: tuple[float, ...] | None = None  # video: each sampled frame's time in seconds (Qwen3-VL's timestamps)
    indices: tuple[int, ...] | None = None  # video: the sampled frames' indices in the file (what describe reports)


@dataclasses.dataclass(frozen=True)
class TaskInput:
    """What the model sees and must answer for one sample."""

    key: str
    prompt: str
    target: str
    visuals: tuple[Visual, ...] = ()  # in the record's order (earlier turns' first); empty: text-only
    history: tuple[Turn, ...] = ()  # a multi-turn record's earlier exchanges
    system: str | None = None
    target_trained: bool = True  # False: the record marks the last answer "loss": false

    @property
    def frames(self) -> np.ndarray | None:
        """The frames of the sample's video, None without one."""
        return next((visual.pixels for visual in self.visuals if visual.kind == "video"), None)


def as_written(sample: VideoTextSample, visuals: tuple[Visual, ...], indices: Sequence[int],
               rng: np.random.Generator) -> TaskInput:
    default = "video/caption" if any(v.kind == "video" for v in visuals) else "image/caption"
    prompt = sample.prompt or DEFAULT_PROMPTS.get(sample.record.get("task", ""), DEFAULT_PROMPTS[default])
    return TaskInput(sample.key, prompt, sample.target, visuals)


def grounding(sample: VideoTextSample, visuals: tuple[Visual, ...], indices: Sequence[int],
              rng: np.random.Generator) -> TaskInput:
    """Each event of extra_info.events ({start, end, text}: video frame span) tagged with the 1-based
    positions of the sampled frames inside it; an event no sampled frame shows is left out."""
    parts = []
    for event in extra_info(sample.record).get("events") or []:
        seen = [i + 1 for i, frame in enumerate(indices) if event["start"] <= frame <= event["end"]]
        if seen:
            parts.append(f"<frame: {seen[0]}-{seen[-1]}> {event['text']}")
    if not parts:
        raise RecordError("no_event_in_frames", f"{sample.key}: grounding record has no event inside the sampled frames")
    return TaskInput(sample.key, _own_prompt(sample) or DEFAULT_PROMPTS["video/grounding"], " ".join(parts), visuals)


def frame_order(sample: VideoTextSample, visuals: tuple[Visual, ...], indices: Sequence[int],
                rng: np.random.Generator) -> TaskInput:
    """Tarsier2's frame-order prediction: shuffle the frames, give the first floor(3N/8) in time order
    (as 1-based positions in the shuffled clip), ask for the rest."""
    frames = _one_video(sample, visuals).pixels
    order = rng.permutation(len(frames))  # shuffled position p shows original frame order[p]
    position_of = np.argsort(order) + 1  # original frame t sits at shuffled position position_of[t]
    num_given = 3 * len(frames) // 8
    given = ", ".join(map(str, position_of[:num_given]))
    prompt = DEFAULT_PROMPTS["video/frame_order"].format(num_frames=len(frames), num_given=num_given, given=given)
    shuffled = tuple(dataclasses.replace(v, pixels=frames[order]) if v.kind == "video" else v for v in visuals)
    return TaskInput(sample.key, prompt, ", ".join(map(str, position_of[num_given:])), shuffled)


def tracking(sample: VideoTextSample, visuals: tuple[Visual, ...], indices: Sequence[int],
             rng: np.random.Generator) -> TaskInput:
    """Tarsier2's object tracking: the object's box in the first sampled frame is given, its boxes in the
    later ones are the answer. extra_info.tracking = {object, boxes: {video frame: [x1, y1, x2, y2]}},
    normalised to [0, 1]; boxes of sampled frames between annotated ones are interpolated linearly."""
    _one_video(sample, visuals)
    track = extra_info(sample.record)["tracking"]  # check_record: boxes for two frames or more
    boxes = [(position + 1, box) for position, box in enumerate(_boxes_at(track["boxes"], indices))
             if box is not None]
    if len(boxes) < 2:
        raise RecordError("no_boxes_in_frames", f"{sample.key}: tracking needs boxes in at least two sampled frames, "
                                                "got {len(boxes)}")
    (first, first_box), later = boxes[0], boxes[1:]
    prompt = _own_prompt(sample) or DEFAULT_PROMPTS["video/tracking"].format(
        object=track.get("object", "The object").capitalize(), box=_box_text(first_box), first=first)
    target = "; ".join(f"frame {position}: {_box_text(box)}" for position, box in later)
    return TaskInput(sample.key, prompt, target, visuals)


def _own_prompt(sample: VideoTextSample) -> str:
    """The record's question, unless the record was written for another task (a caption re-tasked as
    grounding must be asked for grounding, not for a caption)."""
    return "" if sample.retasked else sample.prompt


def _boxes_at(annotated: dict[Any, Sequence[float]], indices: Sequence[int]) -> list[np.ndarray | None]:
    """Each sampled frame's box, interpolated between the nearest annotated frames; None outside them."""
    frames = sorted(int(frame) for frame in annotated)
    table = np.array([annotated[frame] if frame in annotated else annotated[str(frame)] for frame in frames], float)
    if table.ndim != 2 or table.shape[1] != 4:
        raise ValueError(f"tracking boxes must be [x1, y1, x2, y2], got {table.tolist()[:2]}")
    return [np.array([np.interp(index, frames, table[:, c]) for c in range(4)])
            if frames[0] <= index <= frames[-1] else None for index in indices]


def _box_text(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{value:.2f}" for value in box) + "]"


def _one_video(sample: VideoTextSample, visuals: tuple[Visual, ...]) -> Visual:
    videos = [visual for visual in visuals if visual.kind == "video"]
    if len(videos) != 1:
        raise ValueError(f"{sample.key}: task {sample.record.get('task')!r} needs one video, got {len(videos)}")
    return videos[0]


TEMPLATES: dict[str, Callable[..., TaskInput]] = {
    "video/grounding": grounding,
    "video/frame_order": frame_order,
    "video/tracking": tracking,
}


# Task names records use for text they carry themselves; any other name a record holds is also used as written,
# but a config's task override must be one of these or a template's.
AS_WRITTEN_TASKS = ("video/caption", "video/qa", "video/mcqa", "image/caption", "image/qa", "multi_image", "text_only")
TASK_NAMES = (*AS_WRITTEN_TASKS, *TEMPLATES)


def render_task(sample: VideoTextSample, visuals: tuple[Visual, ...], indices: Sequence[int],
                rng: np.random.Generator | None) -> TaskInput:
    """indices: the video's sampled frame indices. rng is the sample's generator in training; evaluation
    derives a fixed one from the key."""
    rng = rng if rng is not None else np.random.default_rng(zlib.crc32(sample.key.encode()))
    task_input = TEMPLATES.get(sample.record.get("task", ""), as_written)(sample, visuals, indices, rng)
    return dataclasses.replace(task_input, history=sample.history, system=sample.system,
                               target_trained=sample.target_trained)
