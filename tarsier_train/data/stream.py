"""Transformed samples from WebDataset shards: the training stream follows a `Schedule` (deterministic,
resumable, elastic); the evaluation stream reads every sample once, split over consumers."""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from tarsier_train.data.schedule import Schedule, ShardRange
from tarsier_train.data.transform import SampleTooLongError
from tarsier_train.data.video import VideoDecodeError

log = logging.getLogger(__name__)

# What a sample can fail with and still leave the run going: counted, logged, skipped.
SKIPPABLE = (VideoDecodeError, SampleTooLongError, ValueError, KeyError, json.JSONDecodeError)
SKIPPED_KEY = "num_skipped"
# (key, record, video bytes, the sample's random generator in training / None in evaluation) -> sample
MakeSample = Callable[[str, dict, bytes, "np.random.Generator | None"], dict[str, Any]]
_SAMPLE_RNG = 3  # seed tag (see schedule.py): per-sample randomness, e.g. which frames a segment gives
# (consumer, items of its sequence consumed once this sample is) -> the loader position in checkpoints
POSITION_KEY = "stream_position"


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


def _transformed(make_sample: MakeSample, key: str, raw: dict[str, Any] | Exception,
                 rng: np.random.Generator | None) -> dict[str, Any] | None:
    """The transformed sample, or None (logged with its key and reason) when it cannot be used."""
    try:
        if isinstance(raw, Exception):
            raise raw
        return make_sample(key, json.loads(raw["json"]), raw["mp4"], rng)
    except (*SKIPPABLE, RuntimeError) as error:
        log.warning("skipping sample %s: %s", key, error)
        return None


def count_samples(shard: str) -> int:
    """Samples in a shard, from its tar headers alone (members of one sample share the key before the first dot)."""
    keys, last = 0, None
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                key = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, OSError) as error:
        log.warning("shard %s is unreadable after %d samples: %s", shard, keys, error)
    return keys


class VideoTextStream(IterableDataset):
    """Endless training stream over shards, in the order a `Schedule` gives; resumable from `resume_state`."""

    def __init__(self, shards: list[str], make_sample: MakeSample,
                 seed: int = 0, shuffle: bool = True, shuffle_block: int = 256):
        if not shards:
            raise FileNotFoundError("no shards given to the stream")
        self.shards, self.make_sample = list(shards), make_sample
        self.seed, self.shuffle, self.shuffle_block = seed, shuffle, shuffle_block
        self.shard_sizes = [count_samples(shard) for shard in self.shards]
        self.resume_state: dict[str, Any] | None = None  # a `StreamProgress.state_dict` of an earlier run

    def resumed_schedule(self, world_size: int, num_workers: int) -> tuple[Schedule, list[int], int]:
        """(schedule, items already consumed per consumer, worker rotation) for this layout of ranks x workers."""
        num_consumers = world_size * num_workers
        state = self.resume_state
        if state is None:
            return Schedule(self.shard_sizes, num_consumers, self.seed, self.shuffle), [0] * num_consumers, 0
        previous = Schedule.from_state_dict(state["schedule"])
        if (state["world_size"], state["num_workers"]) == (world_size, num_workers):
            # Same layout: every sequence continues. The loader starts again at worker 0, so the worker
            # that owned the next batch of the interrupted run must act as worker 0.
            return previous, list(state["num_consumed"]), state["batches_per_rank"] % num_workers
        return previous.continued_by(state["num_consumed"], num_consumers), [0] * num_consumers, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = _rank_and_world()
        worker, num_workers = _worker_and_count()
        schedule, consumed, rotation = self.resumed_schedule(world_size, num_workers)
        consumer = rank * num_workers + (worker + rotation) % num_workers
        position, skipped = consumed[consumer], 0
        for shard_range in schedule.remaining(consumer, consumed[consumer]):
            for key, raw in self._read(schedule, shard_range):
                position += 1
                # Seeded by epoch and key: a resumed or re-dealt sample sees the same frames it would have.
                rng = np.random.default_rng([_SAMPLE_RNG, self.seed, shard_range.epoch, zlib.crc32(key.encode())])
                sample = _transformed(self.make_sample, key, raw, rng)
                if sample is None:
                    skipped += 1
                    continue
                sample[SKIPPED_KEY], sample[POSITION_KEY] = skipped, (consumer, position)
                skipped = 0
                yield sample

    def _read(self, schedule: Schedule, shard_range: ShardRange) -> Iterator[tuple[str, dict | Exception]]:
        """The range's samples in within-shard order; buffers at most one shuffle block of raw samples."""
        order = schedule.within_shard_order(shard_range.epoch, shard_range.shard, self.shuffle_block)
        wanted = order[shard_range.start:shard_range.end]
        pending, buffered = set(wanted), {}
        raw_samples = enumerate(_raw_samples([self.shards[shard_range.shard]]))
        for offset in wanted:
            while offset not in buffered:
                index, raw = next(raw_samples, (None, None))
                if index is None or isinstance(raw, Exception):
                    error = raw if isinstance(raw, Exception) else RuntimeError("shard has fewer samples than counted")
                    buffered = {o: error for o in pending}
                    break
                if index in pending:
                    buffered[index] = raw
            raw = buffered.pop(offset)
            pending.discard(offset)
            key = raw["__key__"] if isinstance(raw, dict) else f"{self.shards[shard_range.shard]}#{offset}"
            yield key, raw


class EvalStream(IterableDataset):
    """Every sample of the shards once, in order; sample i goes to consumer i % (ranks x workers)."""

    def __init__(self, shards: list[str], make_sample: MakeSample):
        if not shards:
            raise FileNotFoundError("no shards given to the stream")
        self.shards, self.make_sample = list(shards), make_sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_and_world()
        worker, num_workers = _worker_and_count()
        consumer, num_consumers = rank * num_workers + worker, world * num_workers
        skipped = 0
        for index, raw in enumerate(_raw_samples(self.shards)):
            if index % num_consumers != consumer:
                continue
            key = raw["__key__"] if isinstance(raw, dict) else f"sample {index}"
            sample = _transformed(self.make_sample, key, raw, None)
            if sample is None:
                skipped += 1
                continue
            sample[SKIPPED_KEY] = skipped
            skipped = 0
            yield sample
        if skipped:
            log.warning("%d samples skipped at the end of the evaluation shards", skipped)


class StreamProgress:
    """How far each consumer of a training stream got, from the batches the model actually trained on."""

    def __init__(self, stream: VideoTextStream, world_size: int, num_workers: int):
        self.schedule, self.num_consumed, _ = stream.resumed_schedule(world_size, num_workers)
        self.world_size, self.num_workers = world_size, num_workers

    def record(self, positions: torch.Tensor) -> None:
        for consumer, position in positions.tolist():
            self.num_consumed[consumer] = max(self.num_consumed[consumer], position)

    def state_dict(self, batches_per_rank: int) -> dict[str, Any]:
        """Collective under torch.distributed: every rank only saw its own consumers' batches."""
        num_consumed = torch.tensor(self.num_consumed, dtype=torch.long)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_consumed, op=dist.ReduceOp.MAX)
        return {"schedule": self.schedule.state_dict(), "num_consumed": num_consumed.tolist(),
                "world_size": self.world_size, "num_workers": self.num_workers, "batches_per_rank": batches_per_rank}
