"""Pad a list of transformed samples into one right-padded batch."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from tarsier_train.data.skips import SKIP_REASONS_KEY, SKIPPED_KEY, batch_skips
from tarsier_train.data.step_batches import STEP_TOTALS_KEY
from tarsier_train.data.stream import POSITION_KEY
from tarsier_train.data.transform import IGNORE_INDEX, TRUNCATED_KEY, VISUAL_INPUTS

NON_PAD_FRACTION_KEY = "non_pad_fraction"  # real tokens / token slots of a batch; the recipe logs it
NOT_MODEL_INPUTS = ("labels", SKIPPED_KEY, SKIP_REASONS_KEY, TRUNCATED_KEY, NON_PAD_FRACTION_KEY, STEP_TOTALS_KEY)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch: no labels, no data bookkeeping."""
    return {name: value for name, value in batch.items() if name not in NOT_MODEL_INPUTS}


class VideoTextCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = [s["input_ids"] for s in samples]
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(i) for i in input_ids], batch_first=True),
            "labels": pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX),
            "mm_token_type_ids": pad_sequence([s["mm_token_type_ids"] for s in samples], batch_first=True),
            **batch_skips(samples),
            NON_PAD_FRACTION_KEY: torch.tensor(sum(map(len, input_ids)) / (len(input_ids) * max(map(len, input_ids))),
                                               dtype=torch.float64),
            TRUNCATED_KEY: torch.tensor(sum(s.get(TRUNCATED_KEY, 0) for s in samples)),
        }
        for name in VISUAL_INPUTS:  # text-only samples add none; the model matches visual tokens in order
            if any(name in s for s in samples):
                batch[name] = torch.cat([s[name] for s in samples if name in s])
        if POSITION_KEY in samples[0]:
            batch[POSITION_KEY] = torch.tensor([s[POSITION_KEY] for s in samples])
        return batch
