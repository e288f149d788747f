"""Transformed samples from WebDataset shards: the training stream follows a `Schedule` (deterministic,
resumable, elastic); the evaluation stream reads every sample once, split over consumers."""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from tarsier_train.data.record_check import RecordError, parse_record
from tarsier_train.data.schedule import Schedule, ShardRange
from tarsier_train.data.skips import SKIP_REASONS_KEY, SkipBudget, SkipCounter, skip_reason

log = logging.getLogger(__name__)

# (key, record, the WebDataset sample's members, the sample's random generator in training / None in
# evaluation) -> transformed sample
MakeSample = Callable[[str, dict, dict, "np.random.Generator | None"], dict[str, Any]]
# seed tags (see schedule.py): per-sample randomness (e.g. which frames a segment gives), mixture draws
_SAMPLE_RNG, _SOURCE_DRAW = 3, 4
# (source, consumer, items of its sequence consumed, mixture draws consumed) once this sample is trained on
POSITION_KEY = "stream_position"
# an evaluation sample that only keeps its rank in step with the others (`EvalStream(pad=True)`): never scored
PADDING_KEY = "padding"


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class _RankedStream(IterableDataset):
    """A stream that knows its rank also in loader workers that were spawned rather than forked (start
    method spawn or forkserver): those are outside the process group, so the rank travels in the pickle."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pickled_rank_and_world": _rank_and_world()}

    def rank_and_world(self) -> tuple[int, int]:
        return self.__dict__.get("_pickled_rank_and_world") or _rank_and_world()


def _worker_and_count() -> tuple[int, int]:
    worker = get_worker_info()
    return (worker.id, worker.num_workers) if worker else (0, 1)


class ShardReadError(RuntimeError):
    """A shard that cannot be read (further): the samples it still owes are skipped with this reason."""

    reason = "unreadable_shard"


def _raw_samples(shards: list[str]) -> Iterator[dict[str, Any] | Exception]:
    """Samples of the shards in the given order; a broken shard yields its error once and is left."""
    for shard in shards:
        dataset = wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        try:
            yield from dataset
        except (tarfile.TarError, OSError, ValueError) as error:
            yield ShardReadError(f"shard {shard} is unreadable after this point: {error}")


def _transformed(make_sample: MakeSample, key: str, raw: dict[str, Any] | Exception,
                 rng: np.random.Generator | None, skips: SkipCounter) -> dict[str, Any] | None:
    """The transformed sample, or None when it cannot be used: whatever it raised (a bad record, an undecodable video,
    a bug in a task template) costs this sample only, logged with its key and counted by reason."""
    try:
        if isinstance(raw, Exception):
            raise raw
        if "json" not in raw:
            raise RecordError("no_record", f"the shard sample has no json member (members: {sorted(raw)})")
        sample = make_sample(key, parse_record(raw["json"]), raw, rng)
    except Exception as error:  # noqa: BLE001 - see the docstring: one sample must never take the run down
        reason = skip_reason(error)
        log.warning("skipping sample %s (%s): %s", key, reason, error)
        skips.add(reason)
        return None
    skips.add(None)
    return sample


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard: from a shard writer's manifest.json beside the shards when there is one (no
    tar is opened), else from the tar headers."""
    counts = []
    manifests: dict[Path, dict[str, int]] = {}
    for shard in shards:
        folder = Path(shard).parent
        if folder not in manifests:
            manifest = folder / "manifest.json"
            entries = json.loads(manifest.read_text()).get("shards", []) if manifest.is_file() else []
            manifests[folder] = {e["name"]: e["num_samples"] for e in entries if isinstance(e, dict)}
        known = manifests[folder].get(Path(shard).name)
        counts.append(known if known is not None else count_samples(shard))
    return counts


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


@dataclasses.dataclass
class Source:
    """One stream of a mixture: its shards, its weight, and how its samples are made."""

    shards: list[str]
    make_sample: MakeSample
    weight: float = 1.0
    name: str = ""  # how errors name it (its shards as configured); "": its first shard


@dataclasses.dataclass
class StreamPlan:
    """Where every consumer of every source stands: a fresh start, a continuation, or a re-deal."""

    schedules: list[Schedule]  # one per source
    num_consumed: list[list[int]]  # [source][consumer]: items of its sequence consumed
    num_slots: list[int]  # [consumer]: mixture draws consumed
    rotation: int  # which worker owns the loader's next batch


class VideoTextStream(_RankedStream):
    """Endless training stream over a weighted mixture of shard sources, each read in the order its
    `Schedule` gives. A consumer draws the source of its k-th sample from a generator seeded by
    (seed, consumer, k), so proportions hold and the draws replay exactly after a resume."""

    def __init__(self, sources: list[Source], seed: int = 0, shuffle: bool = True, shuffle_block: int = 256,
                 skip_budget: SkipBudget = SkipBudget()):
        if not sources or any(not source.shards for source in sources):
            raise FileNotFoundError("every data source needs at least one shard")
        if any(source.weight <= 0 for source in sources):
            raise ValueError(f"source weights must be positive, got {[source.weight for source in sources]}")
        self.sources, self.seed, self.shuffle, self.shuffle_block = list(sources), seed, shuffle, shuffle_block
        self.skip_budget = skip_budget
        self.shard_sizes = [shard_sample_counts(source.shards) for source in sources]
        total = sum(source.weight for source in sources)
        self.probabilities = [source.weight / total for source in sources]
        self.resume_state: dict[str, Any] | None = None  # a `StreamProgress.state_dict` of an earlier run

    def plan(self, world_size: int, num_workers: int) -> StreamPlan:
        """The plan for this layout of ranks x workers, continuing `resume_state` if there is one."""
        num_consumers = world_size * num_workers
        state = self.resume_state
        if state is None:
            schedules = [Schedule(sizes, num_consumers, self.seed, self.shuffle, source)
                         for source, sizes in enumerate(self.shard_sizes)]
            return StreamPlan(schedules, [[0] * num_consumers for _ in schedules], [0] * num_consumers, 0)
        previous = [Schedule.from_state_dict(schedule) for schedule in state["schedules"]]
        if (state["world_size"], state["num_workers"]) == (world_size, num_workers):
            # Same layout: every sequence continues. The loader starts again at worker 0, so the worker
            # that owned the next batch of the interrupted run must act as worker 0.
            return StreamPlan(previous, [list(n) for n in state["num_consumed"]], list(state["num_slots"]),
                              state["batches_per_rank"] % num_workers)
        schedules = [schedule.continued_by(consumed, num_consumers)
                     for schedule, consumed in zip(previous, state["num_consumed"])]
        return StreamPlan(schedules, [[0] * num_consumers for _ in schedules], [0] * num_consumers, 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self.rank_and_world()
        worker, num_workers = _worker_and_count()
        plan = self.plan(world_size, num_workers)
        consumer = rank * num_workers + (worker + plan.rotation) % num_workers
        readers = [self._source_items(source, plan.schedules[source], consumer, plan.num_consumed[source][consumer])
                   for source in range(len(self.sources))]
        skips = [SkipCounter(f"{index} ({source.name or source.shards[0]})", self.skip_budget)
                 for index, source in enumerate(self.sources)]
        slot = plan.num_slots[consumer]
        while True:
            source = self._draw_source(consumer, slot)
            slot += 1
            for position, key, raw, epoch in readers[source]:
                # Seeded by epoch and key: a resumed or re-dealt sample sees the same frames it would have.
                rng = np.random.default_rng([_SAMPLE_RNG, self.seed, source, epoch, zlib.crc32(key.encode())])
                sample = _transformed(self.sources[source].make_sample, key, raw, rng, skips[source])
                if sample is None:
                    continue
                sample[SKIP_REASONS_KEY] = skips[source].take_pending()
                sample[POSITION_KEY] = (source, consumer, position, slot)
                yield sample
                break

    def _draw_source(self, consumer: int, slot: int) -> int:
        if len(self.sources) == 1:
            return 0
        rng = np.random.default_rng([_SOURCE_DRAW, self.seed, consumer, slot])
        return int(rng.choice(len(self.sources), p=self.probabilities))

    def _source_items(self, source: int, schedule: Schedule, consumer: int,
                      num_consumed: int) -> Iterator[tuple[int, str, dict | Exception, int]]:
        """(position in the consumer's sequence, key, raw sample, epoch), forever."""
        position = num_consumed
        for shard_range in schedule.remaining(consumer, num_consumed):
            for key, raw in self._read(source, schedule, shard_range):
                position += 1
                yield position, key, raw, shard_range.epoch

    def _read(self, source: int, schedule: Schedule,
              shard_range: ShardRange) -> Iterator[tuple[str, dict | Exception]]:
        """The range's samples in within-shard order; buffers at most one shuffle block of raw samples."""
        order = schedule.within_shard_order(shard_range.epoch, shard_range.shard, self.shuffle_block)
        wanted = order[shard_range.start:shard_range.end]
        pending, buffered = set(wanted), {}
        shard = self.sources[source].shards[shard_range.shard]
        raw_samples = enumerate(_raw_samples([shard]))
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
            key = raw["__key__"] if isinstance(raw, dict) else f"{shard}#{offset}"
            yield key, raw


class EvalStream(_RankedStream):
    """Every sample of the shards once, in order; sample i goes to consumer i % (ranks x workers). Keys in
    `done_keys` (handled by an interrupted earlier run of a data-writing recipe) are passed over.

    `pad=True` (validation under several ranks): every consumer yields the same number of samples, ceil(samples /
    consumers), topping its share up with copies of one of its samples marked `PADDING_KEY` (also in place of the
    samples it skipped). So every rank runs the same batches of the same sizes, in the same order of workers: under a
    sharded model, a rank with one clip more would otherwise call forwards its peers never join, and wait for ever.
    Padding joins the forwards only; the recipes leave it out of every metric, count and output."""

    def __init__(self, shards: list[str], make_sample: MakeSample, done_keys: frozenset[str] = frozenset(),
                 skip_budget: SkipBudget = SkipBudget(), name: str = "", pad: bool = False):
        if not shards:
            raise FileNotFoundError("no shards given to the stream")
        self.shards, self.make_sample, self.done_keys = list(shards), make_sample, done_keys
        self.skip_budget, self.name, self.pad = skip_budget, name or self.shards[0], pad

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self.rank_and_world()
        worker, num_workers = _worker_and_count()
        consumer, num_consumers = rank * num_workers + worker, world * num_workers
        skips = SkipCounter(self.name, self.skip_budget)
        num_yielded, last = 0, None
        for sample in self._own_samples(consumer, num_consumers, skips):
            num_yielded, last = num_yielded + 1, sample
            yield sample
        if self.pad:
            share = -(-self.num_samples() // num_consumers)
            for _ in range(share - num_yielded):
                last = last or self._first_usable()
                if last is None:
                    break  # nothing in the shards is usable: every consumer yields nothing, so all stay in step
                # the skips since its last real sample ride on the first padding sample, so they are still counted
                yield {**last, PADDING_KEY: True, SKIP_REASONS_KEY: skips.take_pending()}
        if skips.reasons:
            log.warning("%s: %d of %d samples skipped (%s)", self.name, skips.reasons.total(), skips.num_read,
                        ", ".join(f"{reason} {count}" for reason, count in skips.reasons.most_common()))

    def raw_samples(self) -> Iterator[dict[str, Any] | Exception]:
        """Every raw sample ({"__key__", "json", media members...}) in order; a broken source yields its error."""
        return _raw_samples(self.shards)

    def num_samples(self) -> int:
        return sum(shard_sample_counts(self.shards))

    def _own_samples(self, consumer: int, num_consumers: int, skips: SkipCounter) -> Iterator[dict[str, Any]]:
        for index, raw in enumerate(self.raw_samples()):
            if index % num_consumers != consumer:
                continue
            key = raw["__key__"] if isinstance(raw, dict) else f"sample {index}"
            if key in self.done_keys:
                continue
            sample = _transformed(self.make_sample, key, raw, None, skips)
            if sample is not None:
                sample[SKIP_REASONS_KEY] = skips.take_pending()
                yield sample

    def _first_usable(self) -> dict[str, Any] | None:
        """Any usable sample of the shards, for a consumer with none of its own (fewer samples than consumers);
        its failures are not this consumer's, so they go uncounted."""
        ignored = SkipCounter(self.name, SkipBudget(max_fraction=1.0, min_samples=2**31))
        for index, raw in enumerate(self.raw_samples()):
            key = raw["__key__"] if isinstance(raw, dict) else f"sample {index}"
            sample = _transformed(self.make_sample, key, raw, None, ignored)
            if sample is not None:
                return sample
        return None


def is_padding(sample: dict[str, Any]) -> bool:
    return bool(sample.get(PADDING_KEY, False))


class StreamProgress:
    """How far each consumer of a training stream got, from the batches the model actually trained on."""

    def __init__(self, stream: VideoTextStream, world_size: int, num_workers: int):
        plan = stream.plan(world_size, num_workers)
        self.schedules, self.num_consumed, self.num_slots = plan.schedules, plan.num_consumed, plan.num_slots
        self.world_size, self.num_workers = world_size, num_workers

    def record(self, positions: torch.Tensor) -> None:
        for source, consumer, position, slot in positions.tolist():
            self.num_consumed[source][consumer] = max(self.num_consumed[source][consumer], position)
            self.num_slots[consumer] = max(self.num_slots[consumer], slot)

    def state_dict(self, batches_per_rank: int) -> dict[str, Any]:
        """Collective under torch.distributed: every rank only saw its own consumers' batches."""
        counts = torch.tensor([*self.num_slots, *(n for per_source in self.num_consumed for n in per_source)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        counts = counts.tolist()
        num_consumers = len(self.num_slots)
        per_source = [counts[num_consumers * (s + 1):num_consumers * (s + 2)] for s in range(len(self.schedules))]
        return {"schedules": [schedule.state_dict() for schedule in self.schedules], "num_consumed": per_source,
                "num_slots": counts[:num_consumers], "world_size": self.world_size, "num_workers": self.num_workers,
                "batches_per_rank": batches_per_rank}
