"""Micro-batches read a whole optimiser step ahead, so that each one's loss can be divided by what the whole step
holds (target tokens, pairs) before its backward: one global batch then gives one gradient however it is split into
ranks x accumulated micro-batches (the normalisation transformers and TRL do with `num_items_in_batch`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

# (counts,) float64: what the rank's micro-batches of this optimiser step hold in all, as the recipe counts them
STEP_TOTALS_KEY = "step_totals"


class StepLookahead:
    """Iterates `batches` in groups of one optimiser step and tags every micro-batch of a group with the sum of
    `count` over the group. Groups start where the trainer's accumulation starts (the first batch of each pass over
    the loader, then every `micro_batches_per_step`); a short last group is the trainer's short last step."""

    def __init__(self, batches: Iterable[dict[str, Any]], micro_batches_per_step: int,
                 count: Callable[[dict[str, Any]], torch.Tensor]):
        self.batches, self.micro_batches_per_step, self.count = batches, micro_batches_per_step, count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = iter(self.batches)
        while step := list(itertools.islice(iterator, self.micro_batches_per_step)):
            totals = torch.stack([self.count(batch).to(torch.float64) for batch in step]).sum(dim=0)
            yield from ({**batch, STEP_TOTALS_KEY: totals} for batch in step)
