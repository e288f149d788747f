"""Inputs of the preference sampler (recipe=sample): each clip's clean frames and a corrupted copy,
decoded in the loader workers, ready for generation; the clip's record and media ride along so the
kept pairs can be written out."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from transformers import ProcessorMixin

from datamodules.toyworld import ToyWorldDataModule
from datamodules.video_shards import VideoShardDataModule
from tarsier_train.data.record_check import WRONG_MEDIA_COUNT, RecordError
from tarsier_train.data.records import canonical_sample, media_bytes, media_members
from tarsier_train.data.tasks import TaskInput, Visual, render_task
from tarsier_train.data.video import seconds_between
from tarsier_train.sampler import CORRUPTIONS, choose_corruption

CLEAN, CORRUPTED, PROVENANCE, RAW = "clean", "corrupted", "provenance", "raw"


class SamplingInputs:
    """Turns a video-text datamodule into the sampler's input: clean and corrupted generation prompts per clip."""

    transform: Any
    task: str | None
    seed: int

    def _sampling_setup(self, corruptions: Sequence[str], corruption_params: dict[str, dict[str, Any]] | None) -> None:
        self.corruptions, self.corruption_params = list(corruptions), dict(corruption_params or {})
        choose_corruption(self.corruptions, np.random.default_rng(0), self.corruption_params)  # fails on bad names now
        if self.transform.sampler.draws_at_random:
            raise ValueError("the sampler records the frames it describes: use a fixed data.num_frames and "
                             "frame_sampling uniform or fps")

    def make_predict_sample(self, key: str, record: dict, members: dict,
                            rng: np.random.Generator | None) -> dict[str, Any]:
        sample = canonical_sample(key, record, self.task)
        if sample.video is None or len(sample.media) != 1:
            raise RecordError(WRONG_MEDIA_COUNT, f"{key}: the preference sampler needs records with exactly one video")
        clip_rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])  # the same choice after a resume
        corruption = choose_corruption(self.corruptions, clip_rng, self.corruption_params)
        chosen: dict[str, list[int]] = {}

        def choose(num_total: int, fps: float) -> list[int]:
            chosen[CLEAN] = self.transform.sampler.indices(sample.video, num_total, fps, None)
            chosen[CORRUPTED] = corruption.apply(chosen[CLEAN], num_total, clip_rng)
            return sorted(set(chosen[CLEAN]) | set(chosen[CORRUPTED]))  # one decode for both copies

        data = media_bytes(sample, members)[0]
        frames, indices, fps = self.transform.read_video(data, choose)
        by_index = dict(zip(indices, frames))
        clean = render_task(sample, (self._visual(chosen[CLEAN], by_index, fps),), chosen[CLEAN], None)
        corrupted = TaskInput(key, clean.prompt, clean.target, (self._visual(chosen[CORRUPTED], by_index, fps),))
        media = media_members(members)
        return {
            CLEAN: self.transform.generation_inputs(clean), CORRUPTED: self.transform.generation_inputs(corrupted),
            PROVENANCE: {"corruption": corruption.name, "corruption_params": corruption.params,
                         "clean_frames": chosen[CLEAN], "corrupted_frames": chosen[CORRUPTED], "prompt": clean.prompt},
            RAW: {"key": key, "record": record, "media": media},
        }

    @staticmethod
    def _visual(indices: list[int], by_index: dict[int, np.ndarray], fps: float) -> Visual:
        return Visual("video", np.stack([by_index[i] for i in indices]), seconds_between(indices, fps))

    def predict_dataloader(self) -> list[DataLoader]:
        """Every train clip once, then every val clip once: the pairs for DPO's training and validation."""
        return self.split_loaders(self.make_predict_sample, list)


DEFAULT_CORRUPTIONS = tuple(CORRUPTIONS)


class PreferenceSamplingDataModule(SamplingInputs, VideoShardDataModule):
    def __init__(self, processor: ProcessorMixin, corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
                 corruption_params: dict[str, dict[str, Any]] | None = None, **kwargs: Any):
        super().__init__(processor, **kwargs)
        self._sampling_setup(corruptions, corruption_params)


class ToyWorldSamplingDataModule(SamplingInputs, ToyWorldDataModule):
    def __init__(self, processor: ProcessorMixin, corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
                 corruption_params: dict[str, dict[str, Any]] | None = None, **kwargs: Any):
        super().__init__(processor, **kwargs)
        self._sampling_setup(corruptions, corruption_params)
