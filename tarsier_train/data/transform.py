"""Model transform: canonical sample + media bytes -> Qwen2-VL inputs with assistant-only labels."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import ProcessorMixin
from transformers.video_utils import VideoMetadata

from tarsier_train.data.chat_labels import OFFSET_KWARGS, TARGET_FLAG, check_template_labels, encoded_target_mask
from tarsier_train.data.records import VideoTextSample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.tasks import TaskInput, Visual, render_task
from tarsier_train.data.video import (ChooseFrames, VideoBackendName, check_backend, decode_image, decode_pixel_budget,
                                      read_frames, seconds_between)
from tarsier_train.models.families import processor_family

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


TRUNCATED_KEY = "num_truncated"
# absent when a sample has no such media; second_per_grid_ts: Qwen2.5-VL only
VISUAL_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw")


class SampleTooLongError(ValueError):
    """A sample that cannot fit max_seq_len without cutting its visual tokens or its whole target."""


class NoTargetError(ValueError):
    """A sample with nothing to learn: every answer is empty or marked "loss": false."""


def _assistant(answer: str, trained: bool) -> dict[str, Any]:
    message = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    return message if trained and answer.strip() else {**message, TARGET_FLAG: False}


@dataclasses.dataclass
class VideoTextTransform:
    processor: ProcessorMixin
    sampler: FrameSampler = dataclasses.field(default_factory=FrameSampler)
    # Tarsier2: every sampled frame is its own temporal step ([f, f] fills the ViT's temporal patch of 2).
    duplicate_frames: bool = True
    max_seq_len: int = 16384
    # Per-frame pixel bounds, and a per-sample budget shared by every frame the ViT sees (duplicates
    # included); None keeps the processor's own bounds. Tarsier2: 460,800 per frame, 128 x 384 x 384 in all.
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    video_backend: VideoBackendName = "pyav"
    decode_timeout_s: float | None = 60.0  # a video that takes longer is skipped and counted, never a hang

    def __post_init__(self) -> None:
        check_backend(self.video_backend)
        self.family = processor_family(self.processor)
        check_template_labels(self.processor)  # a template that labels nothing fails here, not after a week

    def frame_pixel_bounds(self, num_frames: int) -> dict[str, int]:
        """Per-frame pixel bounds for a clip of num_frames frames; the lower bound wins over the budget."""
        lower = self.min_pixels or self._processor_bound("shortest_edge", num_frames)
        upper = self.max_pixels or self._processor_bound("longest_edge", num_frames)
        if self.total_pixels:
            upper = min(upper, self.total_pixels // num_frames)
        return {"shortest_edge": lower, "longest_edge": max(lower, upper)}

    def _processor_bound(self, edge: str, num_frames: int) -> int:
        """The video processor's own bound, per frame (Qwen3-VL's bounds a whole clip)."""
        bound = self.processor.video_processor.size[edge]
        return bound // num_frames if self.family.video_pixels_per_clip else bound

    def video_size(self, num_frames: int) -> dict[str, int]:
        """The video processor's `size` for a clip of num_frames frames (as fed: duplicates included)."""
        bounds = self.frame_pixel_bounds(num_frames)
        return {edge: pixels * num_frames for edge, pixels in bounds.items()} if self.family.video_pixels_per_clip \
            else bounds

    def prepare(self, sample: VideoTextSample, media: Sequence[bytes],
                rng: np.random.Generator | None = None) -> TaskInput:
        """Decode each media item (a video's sampled frames; rng only in training) and let the record's
        task make prompt and target."""
        visuals, indices = [], []
        for item, data in zip(sample.media, media, strict=True):
            if item["type"] == "image":
                visuals.append(Visual("image", decode_image(data)))
                continue
            frames, indices, fps = self.read_video(
                data, lambda num_frames, fps: self.sampler.indices(item["video"], num_frames, fps, rng))
            visuals.append(Visual("video", frames, seconds_between(indices, fps), tuple(i / fps for i in indices),
                                  tuple(indices)))
        return render_task(sample, tuple(visuals), indices, rng)

    def read_video(self, data: bytes, choose: ChooseFrames) -> tuple[np.ndarray, list[int], float]:
        """The chosen frames of a video (`read_frames`), with this transform's backend and time limit, scaled down
        while decoded to what the processor will keep at most (its per-frame maximum; total_pixels only lowers it)."""
        if self.family.fixed_frame_size:  # stretched to the ViT's square
            size = self.processor.image_processor.size
            max_pixels = decode_pixel_budget(size["height"] * size["width"])
        else:  # a clip's frame count is not known yet: bound by the fewest frames the ViT takes (one temporal step)
            max_pixels = decode_pixel_budget(self.max_pixels or self._processor_bound("longest_edge", 2))
        return read_frames(data, choose, self.video_backend, self.decode_timeout_s, max_pixels=max_pixels)

    def processor_frames(self, frames: np.ndarray) -> np.ndarray:
        """Frames as the ViT takes them: each duplicated (Tarsier2), or paired with an even count (native); as they
        are for a per-frame encoder (Tarsier1)."""
        if self.family.frames_per_step == 1:
            return frames
        if self.duplicate_frames:
            return np.repeat(frames, 2, axis=0)
        if len(frames) % 2:
            return np.concatenate([frames, frames[-1:]])
        return frames

    def video_metadata(self, video: Visual) -> VideoMetadata:
        """The fed frames as a clip at their mean rate (fed frames per second): Qwen2.5-VL's second_per_grid_ts is
        then the sampled frames' spacing. Each frame's index is its time x that rate, fractional where the sampling
        was not uniform, so Qwen3-VL's timestamps (index / fps, a step's two frames averaged) are the frames' times."""
        times = video.times or tuple(i * video.seconds_per_frame for i in range(len(video.pixels)))
        fed_times = self.processor_frames(np.asarray(times, dtype=np.float64))
        fed_rate = (2 if self.duplicate_frames else 1) / video.seconds_per_frame
        return VideoMetadata(total_num_frames=len(fed_times), fps=fed_rate,
                             frames_indices=[float(t * fed_rate) for t in fed_times])

    def _user(self, visuals: Sequence[Visual], text: str) -> dict[str, Any]:
        content = [{"type": visual.kind, visual.kind: self.processor_frames(visual.pixels)
                    if visual.kind == "video" else visual.pixels} for visual in visuals]
        return {"role": "user", "content": [*content, {"type": "text", "text": text}]}

    def messages(self, task_input: TaskInput, with_target: bool) -> list[dict[str, Any]]:
        """The conversation for the chat template: system, earlier turns (each user turn with its own media), the
        last prompt, and its answer if with_target. Answers that are not targets (the record says "loss": false, or
        they are empty: an evaluation record's blank answer must not teach the model to stop) carry "loss": false."""
        visuals = iter(task_input.visuals)
        messages = ([{"role": "system", "content": [{"type": "text", "text": task_input.system}]}]
                    if task_input.system is not None else [])
        for turn in task_input.history:
            messages.append(self._user([next(visuals) for _ in range(turn.num_media)], turn.prompt))
            messages.append(_assistant(turn.answer, turn.trained))
        messages.append(self._user(list(visuals), task_input.prompt))
        if with_target:
            messages.append(_assistant(task_input.target, task_input.target_trained))
        return messages

    def _encode(self, task_input: TaskInput, messages: list[dict[str, Any]],
                processor_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        videos = [visual for visual in task_input.visuals if visual.kind == "video"]
        processor_kwargs = dict(processor_kwargs or {})
        if videos and not self.family.fixed_frame_size:
            # Frames were sampled above: the processor must not resample them; our budget replaces its cap. The
            # metadata carries the sampled frames' times: Qwen2.5-VL's temporal spacing (second_per_grid_ts) and
            # Qwen3-VL's timestamps in the prompt come from them.
            fed = [len(self.processor_frames(v.pixels)) for v in videos]
            processor_kwargs["videos_kwargs"] = {
                "do_sample_frames": False, "cap_pixels_per_frame": False,
                "video_metadata": [self.video_metadata(v) for v in videos], "size": self.video_size(max(fed)),
            }
        if len(videos) < len(task_input.visuals) and (self.min_pixels or self.max_pixels) and \
                not self.family.fixed_frame_size:
            processor_kwargs["images_kwargs"] = {"size": self.frame_pixel_bounds(1)}
        return self.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                                  processor_kwargs=processor_kwargs, **kwargs)

    def __call__(self, sample: VideoTextSample, media: Sequence[bytes],
                 rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.training_inputs(self.prepare(sample, media, rng))

    def training_inputs(self, task_input: TaskInput) -> dict[str, torch.Tensor]:
        """Conversation + target, labels on the trained answers only (end-of-turn tokens included), cut to
        max_seq_len after the video. Labels come from the chat template itself (chat_labels), whatever it is."""
        messages = self.messages(task_input, with_target=True)
        encoded = self._encode(task_input, messages, processor_kwargs=OFFSET_KWARGS)
        input_ids = encoded["input_ids"][0]
        mask = encoded_target_mask(self.processor, messages, encoded)
        if not mask.any():
            raise NoTargetError(f"{task_input.key}: no target token (every answer is empty or marked loss=false)")
        labels = torch.where(mask, input_ids, IGNORE_INDEX)
        inputs = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": encoded["mm_token_type_ids"][0]}
        truncated = len(input_ids) > self.max_seq_len
        if truncated:
            inputs = self._truncated(task_input.key, inputs)
        visual = {k: encoded[k] for k in VISUAL_INPUTS if k in encoded}
        return {**inputs, **visual, TRUNCATED_KEY: int(truncated)}

    def _truncated(self, key: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cut the text after the video to max_seq_len; a cut inside the visual tokens would desynchronise
        them from the pixels (and one that leaves no target teaches nothing): such samples are skipped."""
        visual = (inputs["mm_token_type_ids"] != 0).nonzero()
        length = len(inputs["input_ids"])
        if len(visual) and int(visual[-1]) >= self.max_seq_len:
            raise SampleTooLongError(f"{key}: {length} tokens, visual tokens run past max_seq_len={self.max_seq_len}")
        cut = {name: tensor[: self.max_seq_len] for name, tensor in inputs.items()}
        if (cut["labels"][1:] == IGNORE_INDEX).all():
            raise SampleTooLongError(f"{key}: {length} tokens, no target left within max_seq_len={self.max_seq_len}")
        log.warning("truncating sample %s from %d to max_seq_len=%d tokens (text only)", key, length, self.max_seq_len)
        return cut

    def generation_inputs(self, task_input: TaskInput) -> dict[str, torch.Tensor]:
        """The prompt alone (batch of one), ending with the assistant header, ready for `generate`."""
        return dict(self._encode(task_input, self.messages(task_input, with_target=False), add_generation_prompt=True))
