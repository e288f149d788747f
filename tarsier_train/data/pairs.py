"""Preference pairs: one prompt and its media, a chosen and a rejected answer, and (optionally) the
reference model's log-probs of both, precomputed. The media are processed once per pair; the collator
puts the chosen rows first and the rejected rows after them, with each pair's visual inputs once."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tarsier_train.data.collate import VideoTextCollator
from tarsier_train.data.records import VideoTextSample
from tarsier_train.data.stream import POSITION_KEY, SKIPPED_KEY
from tarsier_train.data.tasks import TaskInput
from tarsier_train.data.transform import VISUAL_INPUTS, VideoTextTransform

REFERENCE_KEY = "reference_logps"  # (pairs, 2): the reference model's chosen and rejected log-probs
# Where a record keeps its answers and precomputed reference log-probs
CHOSEN, REJECTED = "chosen", "rejected"
RAW_KEY = "raw"  # predict batches: each pair's key, record and media bytes, to write it out again


def pair_answers(sample: VideoTextSample) -> tuple[str, str]:
    """The chosen and rejected answers on the record's last assistant text item."""
    items = [item for item in sample.record["messages"][-1]["content"] if item.get("type") == "text"]
    answers = items[-1] if items else {}
    if not isinstance(answers.get(CHOSEN), str) or not isinstance(answers.get(REJECTED), str):
        raise ValueError(f"{sample.key}: a preference record needs 'chosen' and 'rejected' strings on its answer")
    return answers[CHOSEN], answers[REJECTED]


def reference_logps(sample: VideoTextSample) -> tuple[float, float] | None:
    """Precomputed reference log-probs (extra_info.reference_logps = {chosen, rejected}), if the pair has them."""
    stored = sample.record.get("extra_info", {}).get(REFERENCE_KEY)
    return None if stored is None else (float(stored[CHOSEN]), float(stored[REJECTED]))


def pair_inputs(transform: VideoTextTransform, sample: VideoTextSample, task_input: TaskInput) -> dict[str, Any]:
    """{"chosen": ..., "rejected": ...} token inputs of both answers to one prompt, the media inputs once."""
    chosen, rejected = pair_answers(sample)
    encoded = {name: transform.training_inputs(dataclasses.replace(task_input, target=answer))
               for name, answer in ((CHOSEN, chosen), (REJECTED, rejected))}
    visual = {name: encoded[CHOSEN][name] for name in VISUAL_INPUTS if name in encoded[CHOSEN]}
    texts = {name: {k: v for k, v in inputs.items() if k not in VISUAL_INPUTS} for name, inputs in encoded.items()}
    reference = reference_logps(sample)
    return {**texts, **visual, **({REFERENCE_KEY: reference} if reference is not None else {})}


class PairCollator:
    """Pairs -> one right-padded batch of 2 x pairs rows (chosen rows, then rejected rows) + each pair's media once."""

    def __init__(self, pad_token_id: int):
        self.rows = VideoTextCollator(pad_token_id)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [pair[CHOSEN] for pair in pairs] + [pair[REJECTED] for pair in pairs]
        batch = self.rows(rows)
        for name in VISUAL_INPUTS:
            if any(name in pair for pair in pairs):
                batch[name] = torch.cat([pair[name] for pair in pairs if name in pair])
        batch[SKIPPED_KEY] = torch.tensor(sum(pair.get(SKIPPED_KEY, 0) for pair in pairs))
        if all(REFERENCE_KEY in pair for pair in pairs):
            batch[REFERENCE_KEY] = torch.tensor([pair[REFERENCE_KEY] for pair in pairs], dtype=torch.float64)
        elif any(REFERENCE_KEY in pair for pair in pairs):
            raise ValueError("some pairs of the batch have precomputed reference log-probs and some do not")
        if RAW_KEY in pairs[0]:
            batch[RAW_KEY] = [pair[RAW_KEY] for pair in pairs]
        if POSITION_KEY in pairs[0]:
            batch[POSITION_KEY] = torch.tensor([pair[POSITION_KEY] for pair in pairs])
        return batch
