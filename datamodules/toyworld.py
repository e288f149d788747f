"""The toy world as a datamodule: generated on first use, cached, then read like any shards."""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin

from datamodules.video_shards import VideoShardDataModule
from tarsier_train.config.types import PositiveInt
from tarsier_train.toyworld import ToyWorldSpec, ensure_derived, ensure_toyworld, toyworld_shards
from tarsier_train.toyworld.tasks import DERIVED_KINDS


class ToyWorldDataModule(VideoShardDataModule):
    """data.sources entries may name toy-world shard sets instead of paths: `train` (captions, with events
    and boxes for grounding / frame-order / tracking overrides) or a derived set (qa, image, text)."""

    def __init__(self, processor: ProcessorMixin, root: str, num_train_clips: PositiveInt = 2000,
                 num_val_clips: PositiveInt = 32, clip_frames: PositiveInt = 16, frame_size: PositiveInt = 112,
                 max_events: PositiveInt = 3, world_seed: int = 0, **loader: Any):
        super().__init__(processor, **loader)
        self.root = root
        self.spec = ToyWorldSpec(num_train_clips=num_train_clips, num_val_clips=num_val_clips,
                                 num_frames=clip_frames, frame_size=frame_size, max_events=max_events, seed=world_seed)

    def prepare_data(self) -> None:
        ensure_toyworld(self.root, self.spec)
        for shards, *_ in self.sources:
            if shards in DERIVED_KINDS:
                ensure_derived(self.root, self.spec, shards)

    def setup(self, stage: str) -> None:
        shards = toyworld_shards(self.root, self.spec)  # cached by prepare_data: only reads the manifest
        self.train_shards, self.val_shards = shards["train"], shards["val"]
        self.sources = [(self._named(source_shards), *rest) for source_shards, *rest in self.sources]

    def _named(self, shards: Any) -> Any:
        if shards == "train":
            return self.train_shards
        if isinstance(shards, str) and shards in DERIVED_KINDS:
            return ensure_derived(self.root, self.spec, shards)
        return shards
