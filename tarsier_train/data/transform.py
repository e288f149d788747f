"""Model transform: canonical sample + video bytes -> Qwen2-VL inputs with assistant-only labels."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from transformers import ProcessorMixin

from tarsier_train.data.records import VideoTextSample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.tasks import TaskInput, render_task
from tarsier_train.data.video import VideoBackendName, check_backend, read_frames

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


TRUNCATED_KEY = "num_truncated"
# absent when a sample has no such media; second_per_grid_ts: Qwen2.5-VL only
VISUAL_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw")


class SampleTooLongError(ValueError):
    """A sample that cannot fit max_seq_len without cutting its visual tokens or its whole target."""


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

    def frame_pixel_bounds(self, num_frames: int) -> dict[str, int]:
        """The processor's `size` for a clip of num_frames frames; the lower bound wins over the budget."""
        size = self.processor.video_processor.size
        lower = self.min_pixels or size["shortest_edge"]
        upper = self.max_pixels or size["longest_edge"]
        if self.total_pixels:
            upper = min(upper, self.total_pixels // num_frames)
        return {"shortest_edge": lower, "longest_edge": max(lower, upper)}

    def prepare(self, sample: VideoTextSample, video_bytes: bytes | None,
                rng: np.random.Generator | None = None) -> TaskInput:
        """Decode the sampled frames (rng only in training) and let the record's task make prompt and target."""
        if sample.video is None:
            return render_task(sample, None, [], rng)
        frames, indices, _ = read_frames(
            video_bytes, lambda num_frames, fps: self.sampler.indices(sample.video, num_frames, fps, rng),
            self.video_backend, self.decode_timeout_s,
        )
        return render_task(sample, frames, indices, rng)

    def processor_frames(self, frames: np.ndarray) -> np.ndarray:
        """Frames as the ViT takes them: each duplicated (Tarsier2), or paired with an even count (native)."""
        if self.duplicate_frames:
            return np.repeat(frames, 2, axis=0)
        if len(frames) % 2:
            return np.concatenate([frames, frames[-1:]])
        return frames

    def messages(self, task_input: TaskInput, with_target: bool) -> list[dict[str, Any]]:
        content = [{"type": "text", "text": task_input.prompt}]
        if task_input.frames is not None:
            content.insert(0, {"type": "video", "video": self.processor_frames(task_input.frames)})
        user = {"role": "user", "content": content}
        if not with_target:
            return [user]
        return [user, {"role": "assistant", "content": [{"type": "text", "text": task_input.target}]}]

    def _encode(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, torch.Tensor]:
        videos = [item["video"] for item in messages[0]["content"] if item["type"] == "video"]
        # frames were sampled above: the processor must not resample them; our budget replaces its cap
        video_kwargs = {"do_sample_frames": False, "cap_pixels_per_frame": False,
                        "size": self.frame_pixel_bounds(len(videos[0]))} if videos else {}
        return self.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                                  processor_kwargs=video_kwargs, **kwargs)

    def __call__(self, sample: VideoTextSample, video_bytes: bytes,
                 rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.training_inputs(self.prepare(sample, video_bytes, rng))

    def training_inputs(self, task_input: TaskInput) -> dict[str, torch.Tensor]:
        """Prompt + target, with labels on the assistant tokens only, cut to max_seq_len after the video."""
        encoded = self._encode(self.messages(task_input, with_target=True), return_assistant_tokens_mask=True)
        input_ids = encoded["input_ids"][0]
        labels = torch.where(encoded["assistant_masks"][0].bool(), input_ids, IGNORE_INDEX)
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
        return dict(self._encode(self.messages(task_input, with_target=False), add_generation_prompt=True))
