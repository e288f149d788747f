"""A deterministic, resumable stream of transformed samples from WebDataset shards.

The order of raw samples in an epoch is a pure function of (seed, epoch): shards in a seeded order,
then a seeded permutation inside each block of `shuffle_block` samples. Raw sample i goes to
consumer i % num_consumers (consumers = ranks x loader workers), so every consumer's output is
deterministic and a resumed run can skip exactly what was already consumed.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from tarsier_train.data.records import canonical_sample
from tarsier_train.data.transform import SampleTooLongError
from tarsier_train.data.video import VideoDecodeError

log = logging.getLogger(__name__)

# What a sample can fail with and still leave the run going: counted, logged, skipped.
SKIPPABLE = (VideoDecodeError, SampleTooLongError, ValueError, KeyError, json.JSONDecodeError)
SKIPPED_KEY = "num_skipped"


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _worker_and_count() -> tuple[int, int]:
    worker = get_worker_info()
    return (worker.id, worker.num_workers) if worker else (0, 1)


def _raw_samples(shards: list[str]) -> Iterator[dict[str, Any] | Exception]:
    """Samples of the shards in the given order; a broken shard yields its error once and is left."""
    for shard in shards:
        dataset = wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        try:
            yield from dataset
        except (tarfile.TarError, OSError, ValueError) as error:
            yield RuntimeError(f"shard {shard} is unreadable after this point: {error}")


class VideoTextStream(IterableDataset):
    """Shards -> transformed samples; loops over epochs when `loop` (training)."""

    def __init__(self, shards: list[str], make_sample: Callable[[str, dict, bytes], dict[str, Any]],
                 seed: int = 0, shuffle: bool = True, shuffle_block: int = 256, loop: bool = True,
                 batch_size: int = 1):
        if not shards:
            raise FileNotFoundError("no shards given to the stream")
        self.shards, self.make_sample = list(shards), make_sample
        self.seed, self.shuffle, self.shuffle_block, self.loop = seed, shuffle, shuffle_block, loop
        self.batch_size = batch_size
        self.resume_batches = 0  # batches this stream's loader already delivered before a resume

    def _epoch_order(self, epoch: int) -> Iterator[dict[str, Any] | Exception]:
        if not self.shuffle:
            yield from _raw_samples(self.shards)
            return
        rng = np.random.default_rng([self.seed, epoch])
        shards = [self.shards[i] for i in rng.permutation(len(self.shards))]
        block: list[dict[str, Any] | Exception] = []
        for raw in _raw_samples(shards):
            block.append(raw)
            if len(block) == self.shuffle_block:
                yield from (block[i] for i in rng.permutation(len(block)))
                block = []
        yield from (block[i] for i in rng.permutation(len(block)))

    def _logical_worker(self) -> tuple[int, int]:
        """The loader takes batches from workers 0, 1, 2... in turn from its start, resumed or not, so after
        resuming at batch B physical worker 0 must continue the stream of the worker that owned batch B."""
        worker, num_workers = _worker_and_count()
        return (worker + self.resume_batches) % num_workers, num_workers

    def _outputs(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_and_world()
        worker, num_workers = self._logical_worker()
        consumer, num_consumers = rank * num_workers + worker, world * num_workers
        skipped, epoch = 0, 0
        while True:
            for index, raw in enumerate(self._epoch_order(epoch)):
                if index % num_consumers != consumer:
                    continue
                try:
                    if isinstance(raw, Exception):
                        raise raw
                    key = raw["__key__"]
                    sample = self.make_sample(key, json.loads(raw["json"]), raw["mp4"])
                except (*SKIPPABLE, RuntimeError) as error:
                    skipped += 1
                    log.warning("skipping sample %s: %s", raw.get("__key__", "?") if isinstance(raw, dict) else "?", error)
                    continue
                sample[SKIPPED_KEY] = skipped
                skipped = 0
                yield sample
            epoch += 1
            if not self.loop:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        outputs = self._outputs()
        for _ in range(self._outputs_to_skip()):
            next(outputs, None)
        return outputs

    def _outputs_to_skip(self) -> int:
        """The loader round-robins whole batches over workers: count this worker's share of them."""
        worker, num_workers = self._logical_worker()
        return len(range(worker, self.resume_batches, num_workers)) * self.batch_size
