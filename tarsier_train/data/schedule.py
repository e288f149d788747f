"""Which shard ranges each data consumer reads: deterministic, resumable, and elastic.

A consumer is one dataloader worker of one rank (num_consumers = ranks x workers). In every epoch
the shards are put in a seeded order and shard k goes to consumer k % num_consumers, which reads it
whole, in a seeded within-shard order. With fewer non-empty shards than consumers, every shard is
instead cut into equal contiguous pieces of its within-shard order (as many per shard as make the
epoch's pieces a multiple of num_consumers, shard sizes allowing, so consumers get as many each), and
piece k goes to consumer k % num_consumers; only fewer samples than consumers is an error. Every
sample therefore has one place in exactly one consumer's sequence, and a consumer's progress is one
number: how many items of its sequence were consumed. Resuming with the same ranks and workers
continues every sequence where it stopped (the batches are those of an uninterrupted run); with
another layout, what is left of the epochs already started is cut into shard ranges and dealt out to
the new consumers (a "segment"), so no sample is repeated or skipped. Only shard sample counts are
needed, never the data, so a resume costs the same wherever in the epoch it happens.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

# First word of every seed, one per use: numpy's SeedSequence treats trailing zero words as absent, so
# untagged [seed, epoch] and [seed, epoch, 0, 0] would draw the same numbers.
_SHARD_ORDER, _WITHIN_SHARD = 1, 2


def _pieces_per_shard(shard_sizes: list[int], num_consumers: int) -> int:
    """1 (whole shards) when there are enough shards, else enough pieces per shard for every consumer."""
    nonempty = sum(1 for size in shard_sizes if size > 0)
    if nonempty >= num_consumers:
        return 1
    # A multiple of num_consumers in all, so every consumer gets as many pieces (an uneven deal would make
    # some consumers go round their epochs faster and see their samples more often).
    pieces = num_consumers // math.gcd(nonempty, num_consumers)
    # A shard smaller than its piece count gives only one piece per sample: cut finer until there are enough.
    while sum(min(size, pieces) for size in shard_sizes) < num_consumers:
        pieces += 1
    return pieces


@dataclasses.dataclass(frozen=True)
class ShardRange:
    """Positions [start, end) of one shard's within-shard order, in one epoch."""

    epoch: int
    shard: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclasses.dataclass
class Schedule:
    shard_sizes: list[int]
    num_consumers: int
    seed: int = 0
    shuffle: bool = True
    source: int = 0  # which source of a mixture: its own shard orders
    # Ranges dealt out at an elastic resume, read before the regular epochs; one list per consumer.
    segment: list[list[ShardRange]] = dataclasses.field(default_factory=list)
    first_epoch: int = 0  # the first regular epoch (after the segment)

    def __post_init__(self) -> None:
        total = sum(self.shard_sizes)
        if total < self.num_consumers:
            raise ValueError(
                f"{total} samples cannot feed {self.num_consumers} data consumers (ranks x workers), each needs "
                "at least one: lower data.num_workers or add data"
            )
        # Derived from the fields, so never saved: a resumed schedule cuts the same pieces.
        self.pieces_per_shard = _pieces_per_shard(self.shard_sizes, self.num_consumers)

    def shard_order(self, epoch: int) -> list[int]:
        order = np.arange(len(self.shard_sizes))
        if self.shuffle:
            order = np.random.default_rng([_SHARD_ORDER, self.seed, self.source, epoch]).permutation(order)
        return [int(k) for k in order if self.shard_sizes[k] > 0]

    def epoch_ranges(self, epoch: int) -> list[ShardRange]:
        """The epoch's ranges in dealing order: whole shards, or each shard's pieces when shards are too few."""
        ranges = []
        for shard in self.shard_order(epoch):
            size = self.shard_sizes[shard]
            cuts = [size * i // self.pieces_per_shard for i in range(self.pieces_per_shard + 1)]
            ranges += [ShardRange(epoch, shard, start, end) for start, end in zip(cuts, cuts[1:]) if end > start]
        return ranges

    def sequence(self, consumer: int) -> Iterator[ShardRange]:
        """Everything consumer reads, in order, forever."""
        if self.segment:
            yield from self.segment[consumer]
        for epoch in itertools.count(self.first_epoch):
            yield from self.epoch_ranges(epoch)[consumer::self.num_consumers]

    def remaining(self, consumer: int, num_consumed: int) -> Iterator[ShardRange]:
        """consumer's sequence after its first num_consumed items (arithmetic on ranges, no data read)."""
        for shard_range in self.sequence(consumer):
            if num_consumed >= len(shard_range):
                num_consumed -= len(shard_range)
                continue
            yield ShardRange(shard_range.epoch, shard_range.shard, shard_range.start + num_consumed, shard_range.end)
            num_consumed = 0

    def continued_by(self, num_consumed: list[int], num_consumers: int) -> "Schedule":
        """A schedule for num_consumers new consumers that reads exactly what this one has not yet read.

        What is left of the epochs already started becomes the segment, cut into equal sample counts in
        reading order (a range is split where a cut falls); the regular epochs follow.
        """
        last_started_epoch = max(next(self.remaining(c, n)).epoch for c, n in enumerate(num_consumed))
        leftovers = []
        for consumer, count in enumerate(num_consumed):
            for shard_range in self.remaining(consumer, count):
                if shard_range.epoch > last_started_epoch:
                    break
                leftovers.append(shard_range)
        leftovers.sort(key=lambda r: (r.epoch, self.shard_order(r.epoch).index(r.shard), r.start))
        total = sum(len(r) for r in leftovers)
        cuts = [total * c // num_consumers for c in range(num_consumers + 1)]
        segment: list[list[ShardRange]] = [[] for _ in range(num_consumers)]
        offset = 0
        for r in leftovers:
            for c in range(num_consumers):
                lo, hi = max(cuts[c], offset), min(cuts[c + 1], offset + len(r))
                if lo < hi:
                    segment[c].append(ShardRange(r.epoch, r.shard, r.start + lo - offset, r.start + hi - offset))
            offset += len(r)
        return Schedule(self.shard_sizes, num_consumers, self.seed, self.shuffle, self.source, segment,
                        last_started_epoch + 1)

    def within_shard_order(self, epoch: int, shard: int, block: int) -> list[int]:
        """Raw sample offsets of a shard in reading order: a seeded permutation inside each block."""
        size = self.shard_sizes[shard]
        if not self.shuffle:
            return list(range(size))
        order = []
        for start in range(0, size, block):
            length = min(block, size - start)
            rng = np.random.default_rng([_WITHIN_SHARD, self.seed, self.source, epoch, shard, start])
            order += [start + int(i) for i in rng.permutation(length)]
        return order

    def state_dict(self) -> dict[str, Any]:
        return {
            "shard_sizes": list(self.shard_sizes), "num_consumers": self.num_consumers, "seed": self.seed,
            "shuffle": self.shuffle, "source": self.source, "first_epoch": self.first_epoch,
            "segment": [[dataclasses.astuple(r) for r in ranges] for ranges in self.segment],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Schedule":
        segment = [[ShardRange(*r) for r in ranges] for ranges in state["segment"]]
        return cls(list(state["shard_sizes"]), state["num_consumers"], state["seed"], state["shuffle"],
                   state["source"], segment, state["first_epoch"])
