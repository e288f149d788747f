"""The toy world as a datamodule: generated on first use, cached, then read like any shards."""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin

from datamodules.video_shards import VideoShardDataModule
from tarsier_train.toyworld import ToyWorldSpec, ensure_toyworld, toyworld_shards


class ToyWorldDataModule(VideoShardDataModule):
    def __init__(self, processor: ProcessorMixin, root: str, num_train_clips: int = 2000,
                 num_val_clips: int = 32, clip_frames: int = 16, frame_size: int = 112, max_events: int = 3,
                 world_seed: int = 0, **loader: Any):
        super().__init__(processor, **loader)
        self.root = root
        self.spec = ToyWorldSpec(num_train_clips=num_train_clips, num_val_clips=num_val_clips,
                                 num_frames=clip_frames, frame_size=frame_size, max_events=max_events, seed=world_seed)

    def prepare_data(self) -> None:
        ensure_toyworld(self.root, self.spec)

    def setup(self, stage: str) -> None:
        shards = toyworld_shards(self.root, self.spec)  # cached by prepare_data: only reads the manifest
        self.train_shards, self.val_shards = shards["train"], shards["val"]
