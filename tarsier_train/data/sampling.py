"""Which frames of a video a sample sees: Tarsier v1/v2, fps-based, and explicit ranges from the record."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from tarsier_train.data.record_check import BAD_FRAME_SELECTION, RecordError

SamplingMode = Literal["uniform", "segment", "fps"]


def uniform_frame_indices(num_total: int, num_sampled: int) -> list[int]:
    """Tarsier v1 sampling: evenly spaced, first and last frame included."""
    if num_total <= 0:
        raise ValueError(f"cannot sample from a video with {num_total} frames")
    if num_sampled == 1:
        return [0]
    return [round(i * (num_total - 1) / (num_sampled - 1)) for i in range(num_sampled)]


def segment_frame_indices(num_total: int, num_sampled: int, rng: np.random.Generator | None) -> list[int]:
    """Tarsier v2 sampling: cut into num_sampled equal segments; a random frame of each when training
    (rng given), the middle frame of each in evaluation (rng None)."""
    if num_total <= 0:
        raise ValueError(f"cannot sample from a video with {num_total} frames")
    bounds = np.linspace(0, num_total, num_sampled + 1)
    starts = np.floor(bounds[:-1]).astype(int)
    ends = np.maximum(np.floor(bounds[1:]).astype(int), starts + 1)  # a segment holds at least one frame
    if rng is None:
        return [int((s + e - 1) // 2) for s, e in zip(starts, ends)]
    return [int(rng.integers(s, e)) for s, e in zip(starts, ends)]


def fps_frame_indices(num_total: int, video_fps: float, target_fps: float, max_n_frames: int,
                      min_n_frames: int = 1) -> list[int]:
    """Frames at target_fps over the whole clip (uniform spacing), between min_n_frames and max_n_frames."""
    if video_fps <= 0:
        raise ValueError(f"video fps must be positive, got {video_fps}")
    wanted = round(num_total / video_fps * target_fps)
    return uniform_frame_indices(num_total, int(np.clip(wanted, min_n_frames, min(max_n_frames, num_total))))


@dataclasses.dataclass(frozen=True)
class FrameWindow:
    """The part of a video a record points at: [start, end) in frames, or explicit frame indices."""

    start: int
    end: int
    explicit: tuple[int, ...] | None = None


def record_frame_window(video_item: dict[str, Any], num_total: int, video_fps: float) -> FrameWindow:
    """Resolve a Tarsier video item's frame_indices / time_indices / start-end frame or time fields."""
    if video_item.get("frame_indices") is not None:
        return FrameWindow(0, num_total, tuple(_checked(video_item["frame_indices"], num_total)))
    if video_item.get("time_indices") is not None:
        frames = [min(int(round(t * video_fps)), num_total - 1) for t in video_item["time_indices"]]
        return FrameWindow(0, num_total, tuple(_checked(frames, num_total)))
    start, end = 0, num_total
    if video_item.get("start_frame") is not None or video_item.get("end_frame") is not None:
        start = int(video_item.get("start_frame") or 0)
        end = int(video_item["end_frame"]) + 1 if video_item.get("end_frame") is not None else num_total
    elif video_item.get("start_time") is not None or video_item.get("end_time") is not None:
        start = int(round(float(video_item.get("start_time") or 0.0) * video_fps))
        end = int(round(float(video_item["end_time"]) * video_fps)) if video_item.get("end_time") is not None else num_total
    start, end = max(0, start), min(num_total, end)
    if end <= start:
        raise RecordError(BAD_FRAME_SELECTION, f"video item selects no frames (start={start}, end={end}, video has "
                                               f"{num_total})")
    return FrameWindow(start, end)


def _checked(indices: list[int], num_total: int) -> list[int]:
    bad = [i for i in indices if not 0 <= int(i) < num_total]
    if bad:
        raise RecordError(BAD_FRAME_SELECTION, f"frame indices {bad[:5]} outside a video of {num_total} frames")
    return [int(i) for i in indices]


@dataclasses.dataclass(frozen=True)
class FrameSampler:
    """Frame indices for one video item: explicit ones from the record, else `mode` inside its window."""

    mode: SamplingMode = "uniform"
    num_frames: int | tuple[int, ...] = 8  # a tuple: one drawn per sample in training, the largest in evaluation
    target_fps: float = 2.0  # mode="fps"
    max_n_frames: int = 128  # mode="fps", and the cap on a record's explicit frame list

    def __post_init__(self) -> None:
        if self.mode not in ("uniform", "segment", "fps"):
            raise ValueError(f"frame sampling mode {self.mode!r}: allowed values are uniform, segment, fps")

    def indices(self, video_item: dict[str, Any], num_total: int, video_fps: float,
                rng: np.random.Generator | None) -> list[int]:
        """rng is the sample's own generator in training, None in evaluation (deterministic choices)."""
        window = record_frame_window(video_item, num_total, video_fps)
        if window.explicit is not None:
            return self._capped(list(window.explicit))
        length = window.end - window.start
        if self.mode == "fps":
            local = fps_frame_indices(length, video_fps, self.target_fps, self.max_n_frames)
        elif self.mode == "segment":
            local = segment_frame_indices(length, self._count(rng), rng)
        else:
            local = uniform_frame_indices(length, self._count(rng))
        return [window.start + i for i in local]

    @property
    def draws_at_random(self) -> bool:
        """Whether training (rng given) may see other frames than evaluation."""
        return self.mode == "segment" or not isinstance(self.num_frames, int)

    def _capped(self, explicit: list[int]) -> list[int]:
        """A record's frame list, thinned uniformly (in its order, first and last kept) to max_n_frames, so
        that no record makes one sample decode and feed an unbounded number of frames."""
        if len(explicit) <= self.max_n_frames:
            return explicit
        return [explicit[i] for i in uniform_frame_indices(len(explicit), self.max_n_frames)]

    def _count(self, rng: np.random.Generator | None) -> int:
        if isinstance(self.num_frames, int):
            return self.num_frames
        return int(rng.choice(self.num_frames)) if rng is not None else max(self.num_frames)
