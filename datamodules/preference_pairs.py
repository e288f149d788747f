"""Preference-pair shards for DPO: the same streams, schedule and resume as SFT data; a pair is one
prompt + media and a chosen and a rejected answer (`tarsier_train.data.pairs`), batched in one of two layouts
(data.pair_layout): shared_prefix (one row per pair, the prefix read once) or two_rows."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from transformers import ProcessorMixin

from datamodules.toyworld import ToyWorldDataModule
from datamodules.video_shards import VideoShardDataModule
from tarsier_train.data.packing import rope_index_of
from tarsier_train.data.pairs import (
    PAIR_LAYOUTS,
    RAW_KEY,
    PairCollator,
    PairLayout,
    SharedPrefixPairCollator,
    pair_inputs,
)
from tarsier_train.data.records import canonical_sample, media_bytes, media_members
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.toyworld import ensure_derived

# shared_prefix hands the model a 4D mask: sdpa takes it as is, eager as an additive one (see shared_media);
# flash_attention_2 takes no 4D mask at all.
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")


def pair_collator(processor: ProcessorMixin, pair_layout: str, attn_implementation: str = "sdpa",
                  model_dir: str | None = None) -> PairCollator | SharedPrefixPairCollator:
    """The collator of a data.pair_layout, checked against the model's attention before any compute."""
    pad = processor.tokenizer.pad_token_id
    if pair_layout == "two_rows":
        return PairCollator(pad)
    if pair_layout != "shared_prefix":
        raise ValueError(f"data.pair_layout={pair_layout!r}: allowed values are {', '.join(PAIR_LAYOUTS)}")
    if attn_implementation not in SHARED_PREFIX_ATTENTION:
        raise ValueError(f"data.pair_layout=shared_prefix with model.attn_implementation={attn_implementation!r}: "
                         f"it needs a 4D attention mask ({', '.join(SHARED_PREFIX_ATTENTION)}); set "
                         f"data.pair_layout=two_rows")
    if model_dir is None:
        raise ValueError("data.pair_layout=shared_prefix needs the model directory (train.py passes it) for M-RoPE "
                         "positions")
    return SharedPrefixPairCollator(pad, rope_index_of(model_dir))


class PairSamples:
    """Turns a video-text datamodule into a pair datamodule: pair samples and pair batches, train and val."""

    transform: VideoTextTransform
    task: str | None

    def _pair_setup(self, processor: ProcessorMixin, pair_layout: str, loader: dict[str, Any]) -> None:
        if loader.get("packing", False):
            raise ValueError("data.packing=true: preference pairs are not packed (set data.pair_layout instead)")
        self.collator = self.train_collator = pair_collator(processor, pair_layout,
                                                            loader.get("attn_implementation", "sdpa"),
                                                            loader.get("model_dir"))

    @staticmethod
    def make_train_sample(transform: VideoTextTransform, task: str | None, key: str, record: dict, members: dict,
                          rng: np.random.Generator | None) -> dict[str, Any]:
        sample = canonical_sample(key, record, task)
        return pair_inputs(transform, sample, transform.prepare(sample, media_bytes(sample, members), rng))

    def make_val_sample(self, key: str, record: dict, members: dict, rng: np.random.Generator | None) -> dict[str, Any]:
        return self.make_train_sample(self.transform, self.task, key, record, members, None)

    def collate_val(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collator(samples)

    def make_predict_sample(self, key: str, record: dict, members: dict,
                            rng: np.random.Generator | None) -> dict[str, Any]:
        """A val-style pair that also carries what is needed to write it out again."""
        media = media_members(members)
        return {**self.make_val_sample(key, record, members, rng), RAW_KEY: {"key": key, "record": record, "media": media}}

    def predict_dataloader(self) -> list[DataLoader]:
        """Every train pair once, then every val pair once (the writer's splits)."""
        if self.transform.sampler.draws_at_random:
            raise ValueError("precomputed reference log-probs need the frames training will see: use a fixed "
                             "data.num_frames with frame_sampling uniform or fps (or frame_indices in the records)")
        return self.split_loaders(self.make_predict_sample, self.collator)


class PreferencePairDataModule(PairSamples, VideoShardDataModule):
    def __init__(self, processor: ProcessorMixin, pair_layout: PairLayout = "shared_prefix", **kwargs: Any):
        super().__init__(processor, **kwargs)
        self._pair_setup(processor, pair_layout, kwargs)


class ToyWorldPairDataModule(PairSamples, ToyWorldDataModule):
    """Synthetic toy-world pairs (true description vs. a temporally wrong one) for smoke runs and tests;
    the model-based sampler writes real pairs as shards for PreferencePairDataModule."""

    def __init__(self, processor: ProcessorMixin, pair_layout: PairLayout = "shared_prefix", **kwargs: Any):
        super().__init__(processor, **kwargs)
        self._pair_setup(processor, pair_layout, kwargs)

    def prepare_data(self) -> None:
        super().prepare_data()
        for split in ("train", "val"):
            ensure_derived(self.root, self.spec, "pairs", split)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.train_shards = ensure_derived(self.root, self.spec, "pairs", "train")
        self.val_shards = ensure_derived(self.root, self.spec, "pairs", "val")
