"""How a model expects its videos (frames, sampling, duplicate-frame mode, pixel bounds), saved beside its weights so
that describe and evaluate feed it what it was trained on without the user knowing the training config."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import ProcessorMixin

from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform

log = logging.getLogger(__name__)
SETTINGS_FILE = "tarsier_video.json"


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """Defaults: Tarsier2's inference settings (16 frames, uniform with first and last, each frame duplicated,
    460,800 pixels per frame, 128·384·384 per sample), for directories that carry no settings (released models)."""

    num_frames: int = 16
    frame_sampling: str = "uniform"
    target_fps: float = 2.0
    max_n_frames: int = 128
    duplicate_frames: bool = True
    min_pixels: int | None = None
    max_pixels: int | None = 460800
    total_pixels: int | None = 128 * 384 * 384

    @classmethod
    def from_data_config(cls, data: Mapping[str, Any]) -> VideoSettings:
        """The settings of a run's `data` config; a list of frame counts (drawn per sample in training) gives its
        largest, the one the model saw most of."""
        values = {field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data}
        if "num_frames" in values and not isinstance(values["num_frames"], int):
            values["num_frames"] = max(values["num_frames"])
        return cls(**values)

    @classmethod
    def from_transform(cls, transform: VideoTextTransform) -> VideoSettings:
        counts = transform.sampler.num_frames
        return cls(num_frames=counts if isinstance(counts, int) else max(counts),
                   frame_sampling=transform.sampler.mode, target_fps=transform.sampler.target_fps,
                   max_n_frames=transform.sampler.max_n_frames, duplicate_frames=transform.duplicate_frames,
                   min_pixels=transform.min_pixels, max_pixels=transform.max_pixels,
                   total_pixels=transform.total_pixels)

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> VideoSettings:
        """The settings saved with a model; Tarsier2's defaults (logged) when it has none."""
        path = Path(model_dir) / SETTINGS_FILE
        if not path.is_file():
            log.info("%s has no %s: using Tarsier2's inference settings %s", model_dir, SETTINGS_FILE, cls())
            return cls()
        saved = json.loads(path.read_text())
        return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls) if field.name in saved})

    def transform(self, processor: ProcessorMixin, **kwargs: Any) -> VideoTextTransform:
        """A transform that feeds the model as these settings say (evaluation: the fixed frames of each mode)."""
        sampler = FrameSampler(self.frame_sampling, self.num_frames, self.target_fps, self.max_n_frames)
        return VideoTextTransform(processor, sampler, self.duplicate_frames, min_pixels=self.min_pixels,
                                  max_pixels=self.max_pixels, total_pixels=self.total_pixels, **kwargs)
