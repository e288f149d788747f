"""The shard schedule: every sample once per epoch, exact continuation, elastic re-dealing."""

import itertools
from collections import Counter

import numpy as np
import pytest

from tarsier_train.data.schedule import Schedule, ShardRange

SIZES = [5, 8, 3, 9, 6, 7, 4]


def _items(ranges) -> list[tuple[int, int, int]]:
    return [(r.epoch, r.shard, p) for r in ranges for p in range(r.start, r.end)]


def _consumed(schedule: Schedule, consumer: int, count: int) -> list[tuple[int, int, int]]:
    return list(itertools.islice((i for r in schedule.sequence(consumer) for i in _items([r])), count))


def test_each_epoch_reads_every_sample_once_across_consumers():
    schedule = Schedule(SIZES, num_consumers=3, seed=1)
    seen = Counter()
    for consumer in range(3):
        for shard_range in itertools.takewhile(lambda r: r.epoch < 2, schedule.sequence(consumer)):
            seen.update(_items([shard_range]))
    assert seen == Counter({(e, s, p): 1 for e in range(2) for s, n in enumerate(SIZES) for p in range(n)})
    assert schedule.shard_order(0) != schedule.shard_order(1)  # reshuffled each epoch


def test_remaining_continues_a_sequence_exactly():
    schedule = Schedule(SIZES, num_consumers=2, seed=0)
    full = _consumed(schedule, 1, 40)
    rest = list(itertools.islice((i for r in schedule.remaining(1, 17) for i in _items([r])), 23))
    assert rest == full[17:]


def _epochs(schedule: Schedule, consumer: int, num_epochs: int) -> list[tuple[int, int, int]]:
    """consumer's items of the regular epochs before num_epochs."""
    return _items(itertools.takewhile(lambda r: r.epoch < num_epochs, schedule.sequence(consumer)))


def _every_sample(sizes: list[int], epochs) -> Counter:
    return Counter({(e, s, p): 1 for e in epochs for s, n in enumerate(sizes) for p in range(n)})


def _assert_continuation_is_exact(schedule: Schedule, num_consumed: list[int], after: int,
                                  earlier: Counter | None = None) -> tuple[Schedule, Counter]:
    """The continuation repeats nothing read (earlier: by the schedules before this one) and finishes every
    started epoch exactly once; returns it and everything read so far."""
    consumed = Counter(i for c, n in enumerate(num_consumed) for i in _consumed(schedule, c, n))
    consumed += earlier or Counter()
    resumed = schedule.continued_by(num_consumed, after)
    leftovers = Counter(i for ranges in resumed.segment for i in _items(ranges))
    assert not consumed & leftovers  # nothing repeated
    last = resumed.first_epoch - 1
    everything = _every_sample(schedule.shard_sizes, range(last + 1))
    assert consumed + leftovers == everything + Counter({i: c for i, c in consumed.items() if i[0] > last})
    # after the segment, regular epochs start where the segment ends
    assert next(resumed.remaining(0, sum(map(len, resumed.segment[0])))).epoch == resumed.first_epoch
    assert Schedule.from_state_dict(resumed.state_dict()) == resumed
    return resumed, consumed


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (3, 2), (2, 5), (4, 4)])
def test_elastic_continuation_reads_exactly_what_is_left(before, after):
    rng = np.random.default_rng(before * 10 + after)
    schedule = Schedule(SIZES, num_consumers=before, seed=3)
    _assert_continuation_is_exact(schedule, [int(rng.integers(0, 50)) for _ in range(before)], after)


def test_elastic_twice_still_exact():
    schedule = Schedule(SIZES, num_consumers=2, seed=5)
    consumed = Counter(i for c, n in enumerate([11, 20]) for i in _consumed(schedule, c, n))
    second = schedule.continued_by([11, 20], 3)
    consumed += Counter(i for c, n in enumerate([4, 0, 9]) for i in _consumed(second, c, n))
    third = second.continued_by([4, 0, 9], 1)
    consumed += Counter(_consumed(third, 0, sum(map(len, third.segment[0]))))
    assert set(consumed.values()) == {1}
    assert {(e, s, p) for e, s, p in consumed if e == 0} == {(0, s, p) for s, n in enumerate(SIZES) for p in range(n)}


def test_state_round_trip_and_clear_errors():
    schedule = Schedule(SIZES, 2, seed=9).continued_by([7, 3], 3)
    assert Schedule.from_state_dict(schedule.state_dict()) == schedule
    with pytest.raises(ValueError, match=r"3 samples cannot feed 4 data consumers .* lower data.num_workers"):
        Schedule([2, 0, 1], num_consumers=4)


@pytest.mark.parametrize("sizes", [[29], [10, 13, 9], [1, 10], [0, 8, 0]],
                         ids=["1 shard", "3 shards", "tiny shard", "as many samples as consumers"])
def test_fewer_shards_than_consumers_are_cut_so_every_consumer_reads(sizes):
    schedule = Schedule(sizes, num_consumers=8, seed=4)
    per_consumer = [_epochs(schedule, c, 3) for c in range(8)]
    assert sum(map(Counter, per_consumer), Counter()) == _every_sample(sizes, range(3))
    for epoch in range(3):
        assert min(sum(e == epoch for e, _, _ in items) for items in per_consumer) >= 1
    # each consumer's pieces are non-empty runs of the within-shard order, at most one per shard
    ranges = list(itertools.takewhile(lambda r: r.epoch < 1, schedule.sequence(3)))
    assert all(r.end > r.start for r in ranges) and len({r.shard for r in ranges}) == len(ranges)


@pytest.mark.parametrize("sizes, pieces_each", [([29], 1), ([10, 13, 9], 3), ([20, 24], 1)])
def test_shard_pieces_are_dealt_evenly(sizes, pieces_each):
    # Uneven deals would make some consumers go round their epochs faster and over-sample their data.
    schedule = Schedule(sizes, num_consumers=8, seed=4)
    epoch = [list(itertools.takewhile(lambda r: r.epoch < 1, schedule.sequence(c))) for c in range(8)]
    assert [len(ranges) for ranges in epoch] == [pieces_each] * 8
    reads = [sum(map(len, ranges)) for ranges in epoch]
    assert max(reads) - min(reads) <= len(sizes)  # equal pieces differ by at most one sample


def test_shard_pieces_continue_exactly_at_any_count():
    schedule = Schedule([10, 13, 7], num_consumers=8, seed=6)
    full = _consumed(schedule, 5, 20)
    assert list(itertools.islice((i for r in schedule.remaining(5, 7) for i in _items([r])), 13)) == full[7:]
    # 8 consumers -> 3 (whole shards again) -> 11 (pieces again) -> 8
    resumed, seen = _assert_continuation_is_exact(schedule, [3, 0, 4, 9, 1, 4, 2, 7], 3)
    resumed, seen = _assert_continuation_is_exact(resumed, [12, 5, 0], 11, seen)
    resumed, seen = _assert_continuation_is_exact(resumed, [1, 0, 2, 3, 1, 1, 0, 2, 5, 4, 3], 8, seen)
    assert resumed.first_epoch >= 2  # the chain went through epochs started by a continuation
    # from whole shards to pieces: 7 shards, then 8 consumers
    _assert_continuation_is_exact(Schedule(SIZES, 2, seed=1), [13, 30], 8)


@pytest.mark.parametrize("after", [1, 3, 12])
def test_one_cut_shard_continues_exactly(after):
    schedule = Schedule([29], num_consumers=8, seed=2)
    resumed, seen = _assert_continuation_is_exact(schedule, [2, 3, 0, 4, 1, 3, 3, 6], after)
    assert sum(seen.values()) == 22 and resumed.first_epoch == 2  # consumer 7 had begun epoch 1


def test_pieces_keep_the_whole_shard_deal_when_shards_suffice():
    schedule = Schedule(SIZES, num_consumers=7, seed=2)
    order = schedule.shard_order(0)
    assert [(r.shard, r.start, r.end) for r in schedule.epoch_ranges(0)] == [(s, 0, SIZES[s]) for s in order]
    assert schedule.epoch_ranges(0)[3::7] == [next(schedule.sequence(3))]
    # the order runs trained before shard pieces existed, pinned
    first = [(r.epoch, r.shard, r.start, r.end) for r in itertools.islice(Schedule(SIZES, 3, seed=1).sequence(1), 5)]
    assert first == [(0, 1, 0, 8), (0, 3, 0, 9), (1, 3, 0, 9), (1, 2, 0, 3), (2, 1, 0, 8)]


def test_within_shard_order_is_a_seeded_blockwise_permutation():
    schedule = Schedule(SIZES, 1, seed=2)
    order = schedule.within_shard_order(epoch=0, shard=3, block=4)
    assert sorted(order) == list(range(9))
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [4, 5, 6, 7]
    assert order == schedule.within_shard_order(0, 3, 4) != schedule.within_shard_order(1, 3, 4)
    assert ShardRange(0, 3, 2, 9).__len__() == 7
