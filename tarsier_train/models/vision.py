"""Keep the vision tower in every step, also when a batch holds no image or video."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def dummy_vision_term(model: PreTrainedModel) -> torch.Tensor:
    """0 x the vision tower's output on its smallest input (one merged token). Added to a text-only batch's
    loss, it runs every vision parameter forward and backward, so sharded ranks issue the same collectives
    whatever their batch holds (DESIGN.md), at the cost of a few patches."""
    config = model.config.vision_config
    merge = config.spatial_merge_size
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    parameter = next(model.model.visual.parameters())
    pixels = torch.zeros(merge * merge, patch_dim, device=parameter.device, dtype=parameter.dtype)
    grid = torch.tensor([[1, merge, merge]], device=parameter.device)
    features = model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid).pooler_output
    return sum(feature.float().sum() for feature in features) * 0.0


def text_only_vision_term(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """`dummy_vision_term` for a batch without images or videos, else 0: add it to any loss."""
    if {"pixel_values_videos", "pixel_values"} & batch.keys():
        return 0.0
    return dummy_vision_term(model)
