"""Preference pairs: one prompt and its media, a chosen and a rejected answer, and (optionally) the
reference model's log-probs of both, precomputed. The media are processed once per pair. Two batch layouts:
  two_rows (PairCollator): the chosen rows first, then the rejected rows, each pair's visual inputs once;
  shared_prefix (SharedPrefixPairCollator): one row per pair, the shared prefix (media + prompt) once, then
  the chosen and the rejected answer, the rejected one attending to the prefix but not to the chosen one."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import torch

from tarsier_train.data.collate import NON_PAD_FRACTION_KEY, VideoTextCollator
from tarsier_train.data.packing import GRID_INPUTS, RopeIndex, sample_positions, stacked_positions
from tarsier_train.data.record_check import BAD_ANSWERS, RecordError, extra_info
from tarsier_train.data.records import VideoTextSample
from tarsier_train.data.skips import batch_skips
from tarsier_train.data.stream import POSITION_KEY
from tarsier_train.data.tasks import TaskInput
from tarsier_train.data.transform import IGNORE_INDEX, TRUNCATED_KEY, VISUAL_INPUTS, VideoTextTransform
from tarsier_train.losses.lm import num_target_tokens

REFERENCE_KEY = "reference_logps"  # (pairs, 2): the reference model's chosen and rejected log-probs
# Where a record keeps its answers and precomputed reference log-probs
CHOSEN, REJECTED = "chosen", "rejected"
RAW_KEY = "raw"  # predict batches: each pair's key, record and media bytes, to write it out again
PairLayout = Literal["shared_prefix", "two_rows"]
PAIR_LAYOUTS: tuple[str, ...] = get_args(PairLayout)
# shared_prefix batches: (pairs, length) targets already shifted, the token logit position t predicts (IGNORE_INDEX
# elsewhere). Both answers' first tokens are predicted from the prefix's last position, so one label row cannot hold
# both; `tarsier_train.losses.dpo.target_logps` reads these.
CHOSEN_TARGETS, REJECTED_TARGETS = "chosen_targets", "rejected_targets"
# Segments of a shared_prefix row; the attention mask is derived from them
PREFIX, CHOSEN_BLOCK, REJECTED_BLOCK, PADDING = range(4)


def pair_answers(sample: VideoTextSample) -> tuple[str, str]:
    """The chosen and rejected answers on the record's last assistant text item."""
    items = [item for item in sample.record["messages"][-1]["content"] if item.get("type") == "text"]
    answers = items[-1] if items else {}
    if not isinstance(answers.get(CHOSEN), str) or not isinstance(answers.get(REJECTED), str):
        raise RecordError(BAD_ANSWERS, f"{sample.key}: a preference record needs 'chosen' and 'rejected' strings on "
                                       "its answer")
    return answers[CHOSEN], answers[REJECTED]


def reference_logps(sample: VideoTextSample) -> tuple[float, float] | None:
    """Precomputed reference log-probs (extra_info.reference_logps = {chosen, rejected}), if the pair has them."""
    stored = extra_info(sample.record).get(REFERENCE_KEY)
    return None if stored is None else (float(stored[CHOSEN]), float(stored[REJECTED]))


def pair_inputs(transform: VideoTextTransform, sample: VideoTextSample, task_input: TaskInput) -> dict[str, Any]:
    """{"chosen": ..., "rejected": ...} token inputs of both answers to one prompt, the media inputs once."""
    chosen, rejected = pair_answers(sample)
    # Only the answers compared are targets: earlier turns are the shared prompt of both.
    context = tuple(dataclasses.replace(turn, trained=False) for turn in task_input.history)
    encoded = {name: transform.training_inputs(dataclasses.replace(task_input, target=answer, history=context,
                                                                   target_trained=True))
               for name, answer in ((CHOSEN, chosen), (REJECTED, rejected))}
    visual = {name: encoded[CHOSEN][name] for name in VISUAL_INPUTS if name in encoded[CHOSEN]}
    texts = {name: {k: v for k, v in inputs.items() if k not in VISUAL_INPUTS} for name, inputs in encoded.items()}
    reference = reference_logps(sample)
    return {**texts, **visual, **({REFERENCE_KEY: reference} if reference is not None else {})}


def num_pairs(batch: dict[str, Any]) -> int:
    """Pairs in a batch of either layout."""
    rows = len(batch["input_ids"])
    return rows if CHOSEN_TARGETS in batch else rows // 2


def num_chosen_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Target tokens of the chosen answers in a batch of either layout."""
    if CHOSEN_TARGETS in batch:
        return (batch[CHOSEN_TARGETS] != IGNORE_INDEX).sum()
    return num_target_tokens(batch["labels"][: num_pairs(batch)])


def _pair_bookkeeping(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a pair batch carries besides tokens, in both layouts: media once per pair, counts, reference log-probs."""
    batch: dict[str, Any] = {}
    for name in VISUAL_INPUTS:
        if any(name in pair for pair in pairs):
            batch[name] = torch.cat([pair[name] for pair in pairs if name in pair])
    batch.update(batch_skips(pairs))
    if all(REFERENCE_KEY in pair for pair in pairs):
        batch[REFERENCE_KEY] = torch.tensor([pair[REFERENCE_KEY] for pair in pairs], dtype=torch.float64)
    elif any(REFERENCE_KEY in pair for pair in pairs):
        raise ValueError("some pairs of the batch have precomputed reference log-probs and some do not")
    if RAW_KEY in pairs[0]:
        batch[RAW_KEY] = [pair[RAW_KEY] for pair in pairs]
    if POSITION_KEY in pairs[0]:
        batch[POSITION_KEY] = torch.tensor([pair[POSITION_KEY] for pair in pairs])
    return batch


class PairCollator:
    """Pairs -> one right-padded batch of 2 x pairs rows (chosen rows, then rejected rows) + each pair's media once."""

    def __init__(self, pad_token_id: int):
        self.rows = VideoTextCollator(pad_token_id)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.rows([pair[CHOSEN] for pair in pairs] + [pair[REJECTED] for pair in pairs])
        return {**batch, **_pair_bookkeeping(pairs)}


def shared_prefix_length(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor) -> int:
    """How many leading tokens both sequences share: media, prompt, and any common start of the answers."""
    length = min(len(chosen_ids), len(rejected_ids))
    differs = (chosen_ids[:length] != rejected_ids[:length]).nonzero()
    return int(differs[0]) if len(differs) else length


def shared_prefix_mask(segments: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length) boolean attention of shared_prefix rows: causal, each answer sees the prefix and
    itself (never the other answer), padding sees only padding (so no softmax row is empty)."""
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    return (causal & ((query == key) | ((key == PREFIX) & (query != PADDING))))[:, None]


@dataclasses.dataclass
class SharedPrefixPairCollator:
    """Pairs -> one right-padded row per pair: prefix + chosen answer + rejected answer, model-ready.

    The rejected answer's positions continue from the prefix, exactly as if it followed the prefix directly:
    both sequences' M-RoPE positions come from the model's own rope index and are combined. The batch carries a
    4D boolean `attention_mask` and 4-row `position_ids` (text positions, then M-RoPE), as `PackingCollator`'s.
    """

    pad_token_id: int
    rope_index: RopeIndex | None  # None: plain positions

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._row(pair) for pair in pairs]
        width = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.pad_token_id, "mm_token_type_ids": 0, CHOSEN_TARGETS: IGNORE_INDEX,
                REJECTED_TARGETS: IGNORE_INDEX, "segments": PADDING}
        batch = {name: torch.stack([torch.cat([row[name], torch.full((width - len(row[name]),), value,
                                                                     dtype=row[name].dtype)]) for row in rows])
                 for name, value in fill.items()}
        batch["attention_mask"] = shared_prefix_mask(batch.pop("segments"))
        # the padding's positions are those of a sequence of its own; the mask already isolates it
        batch["position_ids"] = stacked_positions([torch.cat([row["position_ids"], torch.arange(
            width - row["position_ids"].shape[1]).expand(len(row["position_ids"]), -1)], dim=1) for row in rows])
        real = sum(len(row["input_ids"]) for row in rows)
        batch[NON_PAD_FRACTION_KEY] = torch.tensor(real / batch["input_ids"].numel(), dtype=torch.float64)
        batch[TRUNCATED_KEY] = torch.tensor(sum(pair[name].get(TRUNCATED_KEY, 0) for pair in pairs
                                                for name in (CHOSEN, REJECTED)))
        return {**batch, **_pair_bookkeeping(pairs)}

    def _positions(self, sequence: dict[str, Any], grids: dict[str, torch.Tensor]) -> torch.Tensor:
        """(4, n): text positions, then the M-RoPE positions the model gives this sequence alone; (1, n) plain."""
        return sample_positions(self.rope_index, {**sequence, **grids})

    def _row(self, pair: dict[str, Any]) -> dict[str, torch.Tensor]:
        chosen, rejected = pair[CHOSEN], pair[REJECTED]
        grids = {name: pair[name] for name in GRID_INPUTS if name in pair}
        num_chosen, num_rejected = len(chosen["input_ids"]), len(rejected["input_ids"])
        shared = shared_prefix_length(chosen["input_ids"], rejected["input_ids"])
        if (chosen["mm_token_type_ids"][shared:] != 0).any() or (rejected["mm_token_type_ids"][shared:] != 0).any():
            raise ValueError("a pair whose answers differ before its last media token cannot share a prefix: "
                             "use data.pair_layout=two_rows")
        positions = [self._positions(chosen, grids), self._positions(rejected, grids)]
        assert torch.equal(positions[0][:, :shared], positions[1][:, :shared]), "same tokens, other positions"
        length = num_chosen + num_rejected - shared
        # where each rejected token sits in the row: the prefix, then after the whole chosen answer
        rejected_at = torch.cat([torch.arange(shared), torch.arange(num_chosen, length)])
        chosen_targets = torch.full((length,), IGNORE_INDEX, dtype=chosen["labels"].dtype)
        chosen_targets[: num_chosen - 1] = chosen["labels"][1:]  # the logit at t predicts the token at t + 1
        rejected_targets = torch.full((length,), IGNORE_INDEX, dtype=rejected["labels"].dtype)
        rejected_targets[rejected_at[:-1]] = rejected["labels"][1:]  # ... and the token after it in its sequence
        segments = torch.cat([torch.full((shared,), PREFIX), torch.full((num_chosen - shared,), CHOSEN_BLOCK),
                              torch.full((num_rejected - shared,), REJECTED_BLOCK)])
        return {
            "input_ids": torch.cat([chosen["input_ids"], rejected["input_ids"][shared:]]),
            "mm_token_type_ids": torch.cat([chosen["mm_token_type_ids"], rejected["mm_token_type_ids"][shared:]]),
            "position_ids": torch.cat([positions[0], positions[1][:, shared:]], dim=1),
            CHOSEN_TARGETS: chosen_targets, REJECTED_TARGETS: rejected_targets, "segments": segments,
        }
