"""Prediction writers: recipes that produce data (reference log-probs, sampled preference pairs) return
WebDataset samples from `predict_step`; this callback writes them as shards, one set per dataloader."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class ShardWriter(BasePredictionWriter):
    """Samples ({"__key__", "json", media members}) -> output_dir/<split>/rank<R>-NNNNNN.tar and a manifest
    per split, so the shards read like any others (sample counts come from the manifest)."""

    output_label = "written data"  # train.py prints where each output went

    def __init__(self, output_dir: str, splits: Sequence[str] = ("train", "val"), samples_per_shard: int = 1000):
        super().__init__(write_interval="batch")
        self.output_dir, self.splits, self.samples_per_shard = Path(output_dir), list(splits), samples_per_shard
        self._sinks: dict[int, wds.ShardWriter] = {}
        self._counts: dict[int, dict[str, int]] = {}

    def _sink(self, trainer: L.Trainer, dataloader_idx: int) -> wds.ShardWriter:
        if dataloader_idx not in self._sinks:
            folder = self.output_dir / self.splits[dataloader_idx]
            folder.mkdir(parents=True, exist_ok=True)
            pattern = str(folder / f"rank{trainer.global_rank}-%06d.tar")
            self._sinks[dataloader_idx] = wds.ShardWriter(pattern, maxcount=self.samples_per_shard, verbose=0)
            self._counts[dataloader_idx] = {}
        return self._sinks[dataloader_idx]

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: list[dict[str, Any]],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        sink = self._sink(trainer, dataloader_idx)
        for sample in prediction:
            sink.write(sample)
            name = Path(sink.fname).name
            self._counts[dataloader_idx][name] = self._counts[dataloader_idx].get(name, 0) + 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for index, sink in self._sinks.items():
            sink.close()
            folder = self.output_dir / self.splits[index]
            shards = [{"name": name, "num_samples": count} for name, count in sorted(self._counts[index].items())]
            manifest = folder / f"manifest-rank{trainer.global_rank}.json"
            manifest.write_text(json.dumps({"shards": shards}, indent=2))
            log.info("wrote %d samples to %s", sum(s["num_samples"] for s in shards), folder)
        trainer.strategy.barrier()
        if trainer.is_global_zero:  # one manifest.json per split, as the stream reads it
            for split in {self.splits[index] for index in self._sinks}:
                folder = self.output_dir / split
                shards = [entry for path in sorted(folder.glob("manifest-rank*.json"))
                          for entry in json.loads(path.read_text())["shards"]]
                (folder / "manifest.json").write_text(json.dumps({"shards": shards}, indent=2))
