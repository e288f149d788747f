"""Keep the vision tower in every step, also when a batch holds no image or video."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from tarsier_train.models.families import dummy_vision_inputs


def dummy_vision_term(model: PreTrainedModel) -> torch.Tensor:
    """0 x the vision tower's output on its smallest input (`dummy_vision_inputs`). Added to a text-only batch's
    loss, it runs every vision parameter forward and backward, so sharded ranks issue the same collectives
    whatever their batch holds (DESIGN.md), at the cost of a few patches. Qwen3-VL's DeepStack features count too:
    their mergers must get gradients on every rank."""
    encoded = model.get_image_features(**dummy_vision_inputs(model), return_dict=True)
    features = list(encoded.pooler_output)
    for layer in getattr(encoded, "deepstack_features", None) or ():
        features.extend(layer)
    return sum(feature.float().sum() for feature in features) * 0.0


def text_only_vision_term(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """`dummy_vision_term` for a batch without images or videos, else 0: add it to any loss."""
    if {"pixel_values_videos", "pixel_values"} & batch.keys():
        return 0.0
    return dummy_vision_term(model)
