"""LightningDataModule over WebDataset shards of Tarsier-format video-text records."""

from __future__ import annotations

import dataclasses
import functools
import glob
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import ProcessorMixin

from tarsier_train.config.schema import DataSource, FrameCounts
from tarsier_train.config.types import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from tarsier_train.data.collate import VideoTextCollator
from tarsier_train.data.packing import PackingCollator, rope_index_of
from tarsier_train.data.record_check import extra_info
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler, SamplingMode
from tarsier_train.data.skips import SKIP_REASONS_KEY, SkipBudget
from tarsier_train.data.step_batches import StepLookahead
from tarsier_train.data.stream import (PADDING_KEY, POSITION_KEY, EvalStream, Source, StreamProgress, VideoTextStream,
                                       is_padding)
from tarsier_train.data.tasks import TASK_NAMES
from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
from tarsier_train.data.video import VideoBackendName
from tarsier_train.eval.event_f1 import reference_events


def expand_shards(spec: str | list[str]) -> list[str]:
    """A glob, or a list of paths/globs, -> sorted shard paths; an empty match is a clear error."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    shards = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    if not shards:
        raise FileNotFoundError(f"no shard matches {patterns}")
    return shards


PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")
SOURCE_KEYS = DataSource.__required_keys__ | DataSource.__optional_keys__


def _frame_counts(value: int | list[int]) -> int | tuple[int, ...]:
    return value if isinstance(value, int) else tuple(value)


def _checked_task(task: str | None, key: str) -> str | None:
    if task is not None and task not in TASK_NAMES:
        raise ValueError(f"{key}={task!r}: allowed values are null (each record's own task), {', '.join(TASK_NAMES)}")
    return task


def _packing_collator(processor: ProcessorMixin, model_dir: str | None, max_tokens_per_row: int,
                      attn_implementation: str) -> PackingCollator:
    """flash_attention_2 finds packed samples only in a single unpadded row; sdpa/eager/flex in any row."""
    if attn_implementation not in PACKABLE_ATTENTION:
        raise ValueError(f"data.packing=true with model.attn_implementation={attn_implementation!r}: allowed values "
                         f"are {', '.join(PACKABLE_ATTENTION)}")
    if model_dir is None:
        raise ValueError("data.packing=true needs the model directory (train.py passes it) for M-RoPE positions")
    return PackingCollator(processor.tokenizer.pad_token_id, rope_index_of(model_dir), max_tokens_per_row,
                           single_row=attn_implementation == "flash_attention_2")


def _loss_inputs(sample: dict[str, Any]) -> dict[str, Any]:
    """A validation sample's loss row with its skip count; a padding row has no target token, so no loss."""
    train = {**sample["train"], SKIP_REASONS_KEY: sample[SKIP_REASONS_KEY]}
    return {**train, "labels": torch.full_like(train["labels"], IGNORE_INDEX)} if is_padding(sample) else train


def _with_padding_flags(collate: Any, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate`'s batch plus PADDING_KEY: which of its rows only keep this rank in step (`EvalStream(pad=True)`)."""
    return {**collate(samples), PADDING_KEY: torch.tensor([is_padding(s) for s in samples])}


class VideoShardDataModule(L.LightningDataModule):
    def __init__(self, processor: ProcessorMixin, train_shards: str | list[str] | None = None,
                 val_shards: str | list[str] | None = None, sources: list[DataSource] | None = None,
                 task: str | None = None, batch_size: PositiveInt = 8, num_workers: NonNegativeInt = 1,
                 num_frames: FrameCounts = 8, frame_sampling: SamplingMode = "uniform", target_fps: PositiveFloat = 2.0,
                 max_n_frames: PositiveInt = 128, duplicate_frames: bool = True, max_seq_len: PositiveInt = 16384,
                 min_pixels: PositiveInt | None = None, max_pixels: PositiveInt | None = None,
                 total_pixels: PositiveInt | None = None,
                 video_backend: VideoBackendName = "pyav", decode_timeout_s: PositiveFloat | None = 60.0,
                 max_skipped_fraction: Fraction = 0.5, skip_check_min_samples: PositiveInt = 100, seed: int = 0,
                 shuffle_block: PositiveInt = 256, packing: bool = False, max_tokens_per_row: PositiveInt | None = None,
                 attn_implementation: str = "sdpa", model_dir: str | None = None):
        super().__init__()
        sampler = FrameSampler(frame_sampling, _frame_counts(num_frames), target_fps, max_n_frames)
        self.transform = VideoTextTransform(processor, sampler, duplicate_frames, max_seq_len, min_pixels,
                                            max_pixels, total_pixels, video_backend, decode_timeout_s)
        self.collator = VideoTextCollator(processor.tokenizer.pad_token_id)  # validation: one sample per row
        self.train_collator = (_packing_collator(processor, model_dir, max_tokens_per_row or max_seq_len,
                                                 attn_implementation) if packing else self.collator)
        self.train_shards, self.val_shards, self.task = train_shards, val_shards, _checked_task(task, "data.task")
        # Built here, so a bad source fails with the config, before any compute.
        self.sources = [self._source(dict(spec), index) for index, spec in enumerate(sources or [])]
        if self.sources and train_shards:
            raise ValueError("set data.train_shards (one source) or data.sources (a mixture), not both")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.shuffle_block = seed, shuffle_block
        self.skip_budget = SkipBudget(max_skipped_fraction, skip_check_min_samples)
        self._resume_state: dict[str, Any] | None = None
        # Per predict dataloader, inputs an interrupted data-writing run already handled (set by its writer).
        self.predict_done_keys: list[frozenset[str]] | None = None
        self._progress: StreamProgress | None = None

    @staticmethod
    def make_train_sample(transform: VideoTextTransform, task: str | None, key: str, record: dict, members: dict,
                          rng: np.random.Generator | None) -> dict[str, Any]:
        sample = canonical_sample(key, record, task)
        return transform(sample, media_bytes(sample, members), rng)

    def _source(self, spec: dict[str, Any], index: int) -> tuple[Any, float, str | None, VideoTextTransform]:
        """(shards, weight, task, transform) of a data.sources entry; it may override the task (e.g. train
        a captioning source as grounding or frame-order prediction) and the frame sampling."""
        unknown = sorted(set(spec) - SOURCE_KEYS)
        if unknown or "shards" not in spec:
            raise ValueError(f"data.sources[{index}]: unknown keys {unknown} or no 'shards' "
                             f"(allowed: {', '.join(sorted(SOURCE_KEYS))})")
        sampler = self.transform.sampler
        sampler = dataclasses.replace(sampler, mode=spec.get("frame_sampling", sampler.mode),
                                      num_frames=_frame_counts(spec.get("num_frames", sampler.num_frames)))
        task = _checked_task(spec.get("task", self.task), f"data.sources[{index}].task")
        return (spec["shards"], float(spec.get("weight", 1.0)), task,
                dataclasses.replace(self.transform, sampler=sampler))

    def train_sources(self) -> list[Source]:
        """data.sources, or data.train_shards as a single source."""
        sources = self.sources or [(self.train_shards, 1.0, self.task, self.transform)]
        return [Source(expand_shards(shards), functools.partial(self.make_train_sample, transform, task), weight,
                       str(shards))
                for shards, weight, task, transform in sources]

    def make_val_sample(self, key: str, record: dict, members: dict, rng: np.random.Generator | None) -> dict[str, Any]:
        sample = canonical_sample(key, record, self.task)
        task_input = self.transform.prepare(sample, media_bytes(sample, members), rng)
        events = reference_events(record)
        return {
            "train": self.transform.training_inputs(task_input),
            "generate": self.transform.generation_inputs(task_input),
            "reference_events": events,
            # events the exact judge cannot read (free text): validation reports them rather than dropping them
            "unscored_events": bool(extra_info(record).get("events")) and events is None,
            "reference_text": task_input.target,
        }

    def collate_val(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {  # the skip count rides on the loss batch, as in training
            "train": self.collator([_loss_inputs(s) for s in samples]),
            "generate": [s["generate"] for s in samples],
            "reference_events": [s["reference_events"] for s in samples],
            "unscored_events": torch.tensor(sum(s["unscored_events"] for s in samples if not is_padding(s))),
            "reference_text": [s["reference_text"] for s in samples],
        }

    def train_dataloader(self) -> StepLookahead:
        """Batches read one optimiser step ahead, each tagged with what the step holds in all (the recipe counts)."""
        stream = VideoTextStream(self.train_sources(), self.seed, True, self.shuffle_block, self.skip_budget)
        stream.resume_state = self._resume_state
        self._progress = StreamProgress(stream, self.trainer.world_size, max(1, self.num_workers))
        return StepLookahead(self._loader(stream, self.train_collator), self.trainer.accumulate_grad_batches,
                             self.trainer.lightning_module.loss_normalisers)

    def val_dataloader(self) -> DataLoader:
        """Padded so every rank runs the same batches (see `EvalStream`); each batch says which rows are padding."""
        stream = self._eval_stream(self.val_shards, self.make_val_sample, pad=self.trainer.world_size > 1)
        return self._loader(stream, functools.partial(_with_padding_flags, self.collate_val))

    def _eval_stream(self, shards: str | list[str], make_sample: Any, done_keys: frozenset[str] = frozenset(),
                     pad: bool = False) -> EvalStream:
        return EvalStream(expand_shards(shards), make_sample, done_keys, self.skip_budget, str(shards), pad)

    def split_loaders(self, make_sample: Any, collate: Any) -> list[DataLoader]:
        """For recipes that write data: every train sample once, then every val sample once (the writer's splits),
        passing over inputs an interrupted earlier run already handled."""
        done = self.predict_done_keys or [frozenset(), frozenset()]
        return [self._loader(self._eval_stream(shards, make_sample, done_keys), collate)
                for shards, done_keys in zip((self.train_shards, self.val_shards), done)]

    def _loader(self, stream: IterableDataset, collate: Any) -> DataLoader:
        # Its own generator: starting an iterator (each epoch, and after a resume) draws the workers' base seed,
        # which must not come from the global stream the training step's dropout draws from. Samples are seeded
        # by the stream itself (schedule.py), not by the workers' seeds.
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
                          generator=torch.Generator().manual_seed(self.seed))

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if self.trainer.training:  # the batch is about to be trained on: it counts as consumed
            self._progress.record(batch.pop(POSITION_KEY))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._progress.state_dict(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = state_dict
