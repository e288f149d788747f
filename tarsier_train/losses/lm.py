"""Next-token cross-entropy on labelled (assistant) tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tarsier_train.data.transform import IGNORE_INDEX


def summed_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses, number of target tokens), so callers normalise over whatever they batch.

    Position t predicts label t+1; labels equal to IGNORE_INDEX (prompt, video, padding) add nothing.
    """
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss_sum, num_target_tokens(labels)


def num_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The labels a next-token loss predicts (every labelled position but the first of each row)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
