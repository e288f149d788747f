"""Prediction writers: recipes that produce data (reference log-probs, sampled preference pairs) return
WebDataset samples from `predict_step`; this callback writes them as shards, one set per dataloader."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter

from tarsier_train.config.types import PositiveFloat, PositiveInt

log = logging.getLogger(__name__)

# What `predict_step` returns: the samples to write, and the keys of every input it handled (written or
# filtered out), which mark it done for a resumed run.
SAMPLES, HANDLED = "samples", "handled"
_SHARD = re.compile(r"rank(\d+)-(\d+)\.keys\.json$")
FINGERPRINT = "fingerprint.json"  # beside the output: what it depends on (model, benchmark, generation settings)


@dataclasses.dataclass
class _OpenShard:
    stem: Path  # .../rank<R>-<NNNNNN>
    opened_at: float  # the writer's clock when the shard was opened
    keys: list[str] = dataclasses.field(default_factory=list)
    num_samples: int = 0
    sink: Any = None  # opened on the first sample: something with write(sample) and close()


class ShardWriter(BasePredictionWriter):
    """Samples -> output_dir/<split>/rank<R>-NNNNNN.tar + one manifest.json per split.

    A shard is written under a temporary name and committed (renamed) with a `.keys.json` naming every input it
    accounts for; a restarted run passes over those inputs, drops what was not committed and redoes only that,
    so nothing is written twice and nothing is lost. A shard is committed when it holds `samples_per_shard` samples
    or has been open `commit_every_s` seconds, whichever comes first: with slow sampling (an LLM judge) or
    selective filtering a killed run loses minutes of work, not a shard's worth.

    A run refuses to continue another's output: what the inputs' datamodule and the recipe say their output depends on
    (their `fingerprint()`, when they have one: model, benchmark, generation settings) is kept beside the output and
    must match.
    """

    output_label = "written data"  # train.py prints where each output went
    suffix = ".tar"

    def __init__(self, output_dir: str, splits: Sequence[str] = ("train", "val"),
                 samples_per_shard: PositiveInt = 1000, commit_every_s: PositiveFloat = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(write_interval="batch")
        self.output_dir, self.splits, self.samples_per_shard = Path(output_dir), list(splits), samples_per_shard
        self.commit_every_s, self._clock = commit_every_s, clock
        self._open: dict[int, _OpenShard] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Clean what an interrupted run left uncommitted; tell the datamodule which inputs are done."""
        done = []
        for split in self.splits:
            folder = self.output_dir / split
            folder.mkdir(parents=True, exist_ok=True)
            identity = self._checked_fingerprint(trainer, pl_module, folder)  # every rank: all refuse together
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                if identity:
                    (folder / FINGERPRINT).write_text(json.dumps(identity, indent=2, sort_keys=True))
                for path in folder.glob(f"*{self.suffix}*"):
                    if path.suffix != self.suffix or not path.with_suffix(".keys.json").is_file():
                        path.unlink()  # a partial shard, or one whose keys were never committed
            trainer.strategy.barrier()
            done.append(frozenset(key for path in folder.glob("*.keys.json")
                                  for key in json.loads(path.read_text())["keys"]))
        if any(done):
            log.info("resuming: %s inputs already handled", ", ".join(f"{s}: {len(d)}" for s, d in zip(self.splits, done)))
        trainer.datamodule.predict_done_keys = done

    def _checked_fingerprint(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path
                             ) -> dict[str, Any]:
        """What this run's output depends on; refused when the committed output in `folder` came from another."""
        identity = {name: owner.fingerprint() for name, owner in (("data", trainer.datamodule), ("recipe", pl_module))
                    if hasattr(owner, "fingerprint")}
        identity = json.loads(json.dumps(identity))  # as it reads back
        path = folder / FINGERPRINT
        if identity and path.is_file() and any(folder.glob("*.keys.json")) and json.loads(path.read_text()) != identity:
            raise RuntimeError(
                f"{folder} holds output of another model, benchmark or generation settings ({path}); continuing "
                f"would mix the two. Choose another run_name, or remove {folder} to start over")
        return identity

    def open_sink(self, path: str) -> Any:
        return wds.TarWriter(path)

    def _shard(self, trainer: L.Trainer, index: int) -> _OpenShard:
        if index not in self._open:
            folder = self.output_dir / self.splits[index]
            numbers = [int(m.group(2)) for p in folder.glob(f"rank{trainer.global_rank}-*.keys.json")
                       if (m := _SHARD.search(p.name))]
            stem = folder / f"rank{trainer.global_rank}-{max(numbers, default=-1) + 1:06d}"
            self._open[index] = _OpenShard(stem, opened_at=self._clock())
        return self._open[index]

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, list],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        shard = self._shard(trainer, dataloader_idx)
        for sample in prediction[SAMPLES]:
            if shard.sink is None:
                shard.sink = self.open_sink(str(shard.stem) + self.suffix + ".partial")
            shard.sink.write(sample)
            shard.num_samples += 1
        shard.keys += prediction[HANDLED]
        if shard.num_samples >= self.samples_per_shard or self._clock() - shard.opened_at >= self.commit_every_s:
            self._commit(dataloader_idx)

    def _commit(self, index: int) -> None:
        shard = self._open.pop(index)
        if shard.sink is not None:
            shard.sink.close()
            os.replace(str(shard.stem) + self.suffix + ".partial", str(shard.stem) + self.suffix)
        keys = Path(str(shard.stem) + ".keys.json")
        keys.with_suffix(".partial").write_text(json.dumps({"num_samples": shard.num_samples, "keys": shard.keys}))
        os.replace(keys.with_suffix(".partial"), keys)  # the commit point

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for index in list(self._open):
            self._commit(index)
        trainer.strategy.barrier()
        if trainer.is_global_zero:  # the manifest lists every committed shard, of this run and earlier ones
            for split in self.splits:
                folder = self.output_dir / split
                shards = []
                for path in sorted(folder.glob("*.keys.json")):
                    count = json.loads(path.read_text())["num_samples"]
                    if count:
                        shards.append({"name": path.name.replace(".keys.json", self.suffix), "num_samples": count})
                (folder / "manifest.json").write_text(json.dumps({"shards": shards}, indent=2))
                log.info("%s: %d samples in %d shards", folder, sum(s["num_samples"] for s in shards), len(shards))


class _JsonlSink:
    """One JSON object per line, synced to disk on close (before the commit renames it)."""

    def __init__(self, path: str) -> None:
        self.handle = open(path, "w")

    def write(self, sample: dict[str, Any]) -> None:
        self.handle.write(json.dumps(sample) + "\n")

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


class JsonlWriter(ShardWriter):
    """ShardWriter's commits and resume for records written as jsonl (evaluation predictions): each sample is a JSON
    object, files are output_dir/rank<R>-NNNNNN.jsonl (one predict dataloader)."""

    output_label = "predictions"
    suffix = ".jsonl"

    def __init__(self, output_dir: str, samples_per_shard: PositiveInt = 256, commit_every_s: PositiveFloat = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(output_dir, ("",), samples_per_shard, commit_every_s, clock)

    def open_sink(self, path: str) -> _JsonlSink:
        return _JsonlSink(path)

    def committed_files(self) -> list[Path]:
        """Every committed file of every split, in name order."""
        return [path.with_name(path.name.replace(".keys.json", self.suffix)) for split in self.splits
                for path in sorted((self.output_dir / split).glob("*.keys.json"))
                if path.with_name(path.name.replace(".keys.json", self.suffix)).is_file()]
