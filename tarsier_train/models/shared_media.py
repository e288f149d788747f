"""One forward over both answers of preference pairs, with each pair's media encoded once."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tarsier_train.data.collate import model_inputs

GRID_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def paired_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a pair batch (chosen rows, then rejected rows; `tarsier_train.data.pairs.PairCollator`).

    The vision tower runs once per pair: its features are handed to the language model for both rows
    (transformers' `mm_encoder_outputs`), so autograd sums both rows' gradients into one ViT pass.
    """
    inputs = model_inputs(batch)
    encoded = {}
    if "pixel_values_videos" in inputs:
        video = model.get_video_features(pixel_values_videos=inputs.pop("pixel_values_videos"),
                                         video_grid_thw=inputs["video_grid_thw"], return_dict=True)
        encoded["video"] = BaseModelOutputWithPooling(pooler_output=tuple(video.pooler_output) * 2)
    if "pixel_values" in inputs:
        image = model.get_image_features(pixel_values=inputs.pop("pixel_values"),
                                         image_grid_thw=inputs["image_grid_thw"], return_dict=True)
        encoded["image"] = BaseModelOutputWithPooling(pooler_output=tuple(image.pooler_output) * 2)
    for name in GRID_INPUTS:  # per media item: the rejected rows hold the same items again
        if name in inputs:
            inputs[name] = torch.cat([inputs[name], inputs[name]])
    return model(**inputs, mm_encoder_outputs=encoded or None, use_cache=False).logits
