"""Padding-free packing: several samples share a row, each with its own M-RoPE positions and attention.

The batch carries 4-row `position_ids` (text positions, then Qwen-VL's 3 M-RoPE rows; for Tarsier1's Llama, the
text positions alone) and no `attention_mask`: transformers (5.x) then finds the sample boundaries where the text
positions restart at 0 and keeps attention inside each sample — a block-diagonal causal mask for sdpa/eager/flex
(masking_utils.find_packed_sequence_indices), flash-attn varlen for flash_attention_2
(modeling_flash_attention_utils._is_packed_sequence, which needs a single row: `single_row=True`;
untested here, flash-attn is not installed on CPU). The forward must run with use_cache=False: with a
cache, transformers skips the boundary detection and attention silently crosses samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import MODEL_MAPPING, AutoConfig, PretrainedConfig

from tarsier_train.data.collate import NON_PAD_FRACTION_KEY
from tarsier_train.data.skips import batch_skips
from tarsier_train.data.stream import POSITION_KEY
from tarsier_train.data.transform import IGNORE_INDEX, TRUNCATED_KEY, VISUAL_INPUTS
from tarsier_train.models.families import family_of

GRID_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # what get_rope_index reads


class RopeIndex:
    """The model's own `get_rope_index`, run on one sample from the config alone (no weights built)."""

    def __init__(self, config: PretrainedConfig):
        self.config = config
        # Qwen2VLModel / Qwen2_5_VLModel: get_rope_index reads only self.config and
        # self.get_vision_position_ids, so this object can stand in for the model (tests compare both).
        self._model_class = MODEL_MAPPING[type(config)]
        if not hasattr(self._model_class, "get_rope_index"):
            raise TypeError(f"{self._model_class.__name__} has no get_rope_index: not an M-RoPE model")

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._model_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, sample: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, n) M-RoPE positions of one unpadded sample, as the model computes them for it alone."""
        grids = {name: sample[name] for name in GRID_INPUTS if name in sample}
        positions, _ = self._model_class.get_rope_index(
            self, sample["input_ids"][None], mm_token_type_ids=sample["mm_token_type_ids"][None], **grids)
        return positions[:, 0]


def rope_index_of(model_dir: str) -> RopeIndex | None:
    """The model's M-RoPE index, or None for a family with plain 1-D positions (Tarsier1's Llama)."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return RopeIndex(config) if family_of(config).mrope else None


def sample_positions(rope_index: RopeIndex | None, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """(4, n) for M-RoPE: text positions 0..n-1, then the model's own 3 rows for this sample alone; (1, n) plain."""
    text = torch.arange(len(sample["input_ids"]))[None]
    return text if rope_index is None else torch.cat([text, rope_index(sample)])


def stacked_positions(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-row (k, width) positions -> the model's position_ids: (4, rows, width) M-RoPE, (rows, width) plain."""
    positions = torch.stack(rows, dim=1)
    return positions[0] if len(positions) == 1 else positions


def pack_rows(lengths: list[int], max_tokens_per_row: int) -> list[list[int]]:
    """Sample indices per row: as few rows as first-fit decreasing needs, then evened out.

    Rows are padded to the widest one, so after fixing the row count the samples are spread to narrow
    the widest row (longest into the emptiest, then single moves/swaps). A sample over the budget gets a
    row alone and sets the width.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    first_fit: list[list[int]] = []
    for index in order:
        row = next((r for r in first_fit if sum(lengths[i] for i in r) + lengths[index] <= max_tokens_per_row), None)
        if row is None:
            first_fit.append(row := [])
        row.append(index)
    balanced: list[list[int]] = [[] for _ in first_fit]
    for index in order:
        min(balanced, key=lambda r: sum(lengths[i] for i in r)).append(index)
    candidates = [_narrow_widest(rows, lengths) for rows in (first_fit, balanced)]
    return min(candidates, key=lambda rows: max(sum(lengths[i] for i in r) for r in rows))


def _narrow_widest(rows: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Move one sample out of the widest row, or swap it for a shorter one, while that narrows it.

    Each step lowers the sum of squared row loads, so the search ends; the width never grows.
    """
    rows = [list(r) for r in rows]
    loads = [sum(lengths[i] for i in r) for r in rows]
    while True:
        wide = max(range(len(rows)), key=loads.__getitem__)
        step = next(((other, i, j) for other in range(len(rows)) if other != wide
                     for i in rows[wide] for j in (None, *rows[other])
                     if 0 < (delta := lengths[i] - (lengths[j] if j is not None else 0))
                     and loads[other] + delta < loads[wide]), None)
        if step is None:
            return rows
        other, i, j = step
        rows[wide].remove(i)
        rows[other].append(i)
        if j is not None:
            rows[other].remove(j)
            rows[wide].append(j)
        delta = lengths[i] - (lengths[j] if j is not None else 0)
        loads[wide] -= delta
        loads[other] += delta


@dataclasses.dataclass
class PackingCollator:
    """Transformed samples -> rows of packed samples (padding only at each row's end), model-ready."""

    pad_token_id: int
    rope_index: RopeIndex | None  # None: plain positions
    max_tokens_per_row: int = 16384
    # flash_attention_2: transformers detects packing from position ids only in a batch of one row,
    # so every sample goes into one unpadded row (the DataLoader batch size bounds its length).
    single_row: bool = False

    def layout(self, lengths: list[int]) -> list[list[int]]:
        """Which samples (by index) fill each row, in order."""
        if self.single_row:
            return [list(range(len(lengths)))]
        return pack_rows(lengths, self.max_tokens_per_row)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self.layout([len(s["input_ids"]) for s in samples])
        width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
        packed = [self._row([samples[i] for i in row], width) for row in rows]
        batch = {name: torch.stack([row[name] for row in packed])
                 for name in ("input_ids", "labels", "mm_token_type_ids")}
        batch["position_ids"] = stacked_positions([row["position_ids"] for row in packed])
        in_order = [samples[i] for row in rows for i in row]
        for name in VISUAL_INPUTS:  # the model fills visual tokens in flattened (row, position) order
            if any(name in s for s in in_order):
                batch[name] = torch.cat([s[name] for s in in_order if name in s])
        real = sum(len(s["input_ids"]) for s in samples)
        batch[NON_PAD_FRACTION_KEY] = torch.tensor(real / batch["input_ids"].numel(), dtype=torch.float64)
        batch.update(batch_skips(samples))
        batch[TRUNCATED_KEY] = torch.tensor(sum(s.get(TRUNCATED_KEY, 0) for s in samples))
        if POSITION_KEY in samples[0]:
            batch[POSITION_KEY] = torch.tensor([s[POSITION_KEY] for s in samples])
        return batch

    def _row(self, samples: list[dict[str, Any]], width: int) -> dict[str, torch.Tensor]:
        input_ids, labels, types, positions = [], [], [], []
        for sample in samples:
            input_ids.append(sample["input_ids"])
            # Position t predicts label t+1: a sample's first label would be predicted from the previous
            # sample's last token. Unpacked, label 0 is never a target, so masking it changes nothing.
            label = sample["labels"].clone()
            label[0] = IGNORE_INDEX
            labels.append(label)
            types.append(sample["mm_token_type_ids"])
            # text positions restart at 0 per sample: that restart is how transformers finds boundaries
            positions.append(sample_positions(self.rope_index, sample))
        pad = width - sum(len(i) for i in input_ids)
        if pad:  # the padding is a sequence of its own (positions from 0), so no sample attends to it
            input_ids.append(torch.full((pad,), self.pad_token_id, dtype=input_ids[0].dtype))
            labels.append(torch.full((pad,), IGNORE_INDEX, dtype=labels[0].dtype))
            types.append(torch.zeros(pad, dtype=types[0].dtype))
            positions.append(torch.arange(pad).expand(len(positions[0]), -1))
        return {"input_ids": torch.cat(input_ids), "labels": torch.cat(labels), "mm_token_type_ids": torch.cat(types),
                "position_ids": torch.cat(positions, dim=1)}
