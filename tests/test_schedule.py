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


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (3, 2), (2, 5), (4, 4)])
def test_elastic_continuation_reads_exactly_what_is_left(before, after):
    rng = np.random.default_rng(before * 10 + after)
    schedule = Schedule(SIZES, num_consumers=before, seed=3)
    num_consumed = [int(rng.integers(0, 50)) for _ in range(before)]
    consumed = Counter(i for c, n in enumerate(num_consumed) for i in _consumed(schedule, c, n))
    resumed = schedule.continued_by(num_consumed, after)
    leftovers = Counter(i for ranges in resumed.segment for i in _items(ranges))
    assert not consumed & leftovers  # nothing repeated
    last = resumed.first_epoch - 1
    everything = Counter({(e, s, p): 1 for e in range(last + 1) for s, n in enumerate(SIZES) for p in range(n)})
    assert consumed + leftovers == everything + Counter({i: c for i, c in consumed.items() if i[0] > last})
    # after the segment, regular epochs start where the segment ends
    assert next(resumed.remaining(0, sum(map(len, resumed.segment[0])))).epoch == resumed.first_epoch


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
    with pytest.raises(ValueError, match="3 non-empty shards cannot feed 4 data consumers"):
        Schedule([2, 0, 3, 1], num_consumers=4)


def test_within_shard_order_is_a_seeded_blockwise_permutation():
    schedule = Schedule(SIZES, 1, seed=2)
    order = schedule.within_shard_order(epoch=0, shard=3, block=4)
    assert sorted(order) == list(range(9))
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [4, 5, 6, 7]
    assert order == schedule.within_shard_order(0, 3, 4) != schedule.within_shard_order(1, 3, 4)
    assert ShardRange(0, 3, 2, 9).__len__() == 7
