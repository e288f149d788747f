"""A benchmark's records as generation prompts (recipe=evaluate): every record once, split over ranks and loader
workers, records an interrupted earlier run already predicted passed over. The model is fed frames as it was
trained (the settings saved with its export), unless the benchmark config says otherwise."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader
from transformers import ProcessorMixin

from tarsier_train.config.types import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.skips import SkipBudget
from tarsier_train.data.stream import EvalStream
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.data.video import VideoBackendName
from tarsier_train.eval.benchmark_records import answer_prefill, with_blank_nulls
from tarsier_train.eval.benchmarks import Benchmark, video_path
from tarsier_train.eval.generation import with_prefill
from tarsier_train.models.video_settings import VideoSettings


class RecordStream(EvalStream):
    """EvalStream over a benchmark's (key, record) list instead of shards: each record's video is read from the
    benchmark's video directory in the loader worker that transforms it."""

    def __init__(self, records: list[tuple[str, dict[str, Any]]], video_dir: str, make_sample: Any,
                 done_keys: frozenset[str], skip_budget: SkipBudget, name: str, pad: bool) -> None:
        super().__init__([name], make_sample, done_keys, skip_budget, name, pad)
        self.records, self.video_dir = records, video_dir

    def raw_samples(self) -> Iterator[dict[str, Any]]:
        for key, record in self.records:
            yield {"__key__": key, "json": json.dumps(record).encode(), "__video_dir__": self.video_dir}

    def num_samples(self) -> int:
        return len(self.records)


def with_video_member(record: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """A jsonl record's members: its one video file, found by `vid` (else by the file its video item names)."""
    videos = [item["video"] for message in record["messages"] if isinstance(message.get("content"), list)
              for item in message["content"] if isinstance(item, dict) and item.get("type") == "video"]
    if "__video_dir__" not in raw or len(videos) != 1:
        return raw  # a shard sample carries its media; a record without one video is the task's to refuse
    video = videos[0] if isinstance(videos[0], dict) else {}
    path = video_path(raw["__video_dir__"], record.get("vid", video.get("video_file")))
    return {**raw, path.suffix[1:].lower(): path.read_bytes()}  # the member named by its extension, as in a shard


def benchmark_prompt(transform: VideoTextTransform, tokenizer: Any, key: str, record: dict[str, Any],
                     raw: dict[str, Any]) -> dict[str, Any]:
    """The generation prompt of a benchmark record: its media decoded as the transform says, its question, and the
    answer's pre-fill (multiple choice: " Answer: (") after the assistant header."""
    sample = canonical_sample(key, with_blank_nulls(record))
    task_input = transform.prepare(sample, media_bytes(sample, with_video_member(record, raw)))
    prefill = tokenizer(answer_prefill(record), add_special_tokens=False)["input_ids"]
    return with_prefill(transform.generation_inputs(task_input), prefill)


class BenchmarkDataModule(L.LightningDataModule):
    def __init__(self, processor: ProcessorMixin, benchmark: Benchmark, model_dir: str | None = None,
                 batch_size: PositiveInt = 4, num_workers: NonNegativeInt = 2, num_frames: PositiveInt | None = None,
                 video_backend: VideoBackendName = "pyav", decode_timeout_s: PositiveFloat | None = 60.0,
                 max_skipped_fraction: Fraction = 0.5, skip_check_min_samples: PositiveInt = 100):
        super().__init__()
        self.benchmark, self.model_dir = benchmark, model_dir
        settings = VideoSettings.load(model_dir) if model_dir else VideoSettings()
        self.video_settings = dataclasses.replace(settings, num_frames=num_frames or settings.num_frames)
        self.transform = self.video_settings.transform(processor, video_backend=video_backend,
                                                       decode_timeout_s=decode_timeout_s)
        self.tokenizer = processor.tokenizer
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skip_budget = SkipBudget(max_skipped_fraction, skip_check_min_samples)
        self.predict_done_keys: list[frozenset[str]] | None = None  # set by the prediction writer

    def fingerprint(self) -> dict[str, Any]:
        """What the predictions depend on besides generation: a rerun into the same directory must match it."""
        return {"benchmark": dataclasses.asdict(self.benchmark), "video": dataclasses.asdict(self.video_settings),
                "model": model_fingerprint(self.model_dir) if self.model_dir else None}

    def make_sample(self, key: str, record: dict[str, Any], raw: dict[str, Any],
                    rng: np.random.Generator | None) -> dict[str, Any]:
        return {"key": key, "record": record,
                "inputs": benchmark_prompt(self.transform, self.tokenizer, key, record, raw)}

    def predict_dataloader(self) -> DataLoader:
        done = (self.predict_done_keys or [frozenset()])[0]
        pad = self.trainer.world_size > 1  # sharded ranks must generate in step
        if self.benchmark.shards is not None:
            from datamodules.video_shards import expand_shards

            stream = EvalStream(expand_shards(self.benchmark.shards), self.make_sample, done, self.skip_budget,
                                self.benchmark.name, pad)
        else:
            stream = RecordStream(self.benchmark.records(), self.benchmark.video_dir, self.make_sample, done,
                                  self.skip_budget, self.benchmark.name, pad)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=list)


def model_fingerprint(model_dir: str) -> dict[str, Any]:
    """The model directory, its config's hash and its weight files' sizes and times: retrained weights under the
    same path do not pass for the ones the earlier predictions came from (hashing 15 GB of weights would)."""
    directory = Path(model_dir).resolve()
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"dir": str(directory),
            "config_sha256": hashlib.sha256((directory / "config.json").read_bytes()).hexdigest(),
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}
