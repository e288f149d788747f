"""One forward over both answers of preference pairs, with each pair's media encoded once, in either pair layout
(`tarsier_train.data.pairs`): two_rows shares the ViT's output between a pair's rows; shared_prefix has one row
per pair, so the ViT runs once per pair anyway and the language model reads the prefix once too."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tarsier_train.data.collate import model_inputs
from tarsier_train.data.packing import GRID_INPUTS
from tarsier_train.data.pairs import CHOSEN_TARGETS, RAW_KEY, REFERENCE_KEY, REJECTED_TARGETS
from tarsier_train.losses.dpo import SequenceLogps, sequence_logps, target_logps

PAIR_BOOKKEEPING = (CHOSEN_TARGETS, REJECTED_TARGETS, REFERENCE_KEY, RAW_KEY)


def pair_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a pair batch of either layout: no labels, targets or pair bookkeeping."""
    return {name: value for name, value in model_inputs(batch).items() if name not in PAIR_BOOKKEEPING}


def _for_both_rows(encoded: BaseModelOutputWithPooling) -> BaseModelOutputWithPooling:
    """The ViT's per-item features listed twice: once for the chosen rows, once for the rejected rows. Qwen3-VL's
    DeepStack features (early ViT layers' features, added into the first LLM layers) are per item too."""
    doubled = BaseModelOutputWithPooling(pooler_output=tuple(encoded.pooler_output) * 2)
    if getattr(encoded, "deepstack_features", None) is not None:
        encoded.pooler_output = doubled.pooler_output
        encoded.deepstack_features = [tuple(layer) * 2 for layer in encoded.deepstack_features]
        return encoded
    return doubled


def paired_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a pair batch (chosen rows, then rejected rows; `tarsier_train.data.pairs.PairCollator`).

    The vision tower runs once per pair: its features are handed to the language model for both rows
    (transformers' `mm_encoder_outputs`), so autograd sums both rows' gradients into one ViT pass.
    """
    inputs = pair_model_inputs(batch)
    encoded = {}
    if "pixel_values_videos" in inputs:
        video = model.get_video_features(pixel_values_videos=inputs.pop("pixel_values_videos"),
                                         video_grid_thw=inputs["video_grid_thw"], return_dict=True)
        encoded["video"] = _for_both_rows(video)
    if "pixel_values" in inputs:
        grid = {"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}  # Qwen's
        image = model.get_image_features(pixel_values=inputs.pop("pixel_values"), **grid, return_dict=True)
        encoded["image"] = _for_both_rows(image)
    for name in GRID_INPUTS:  # per media item: the rejected rows hold the same items again
        if name in inputs:
            inputs[name] = torch.cat([inputs[name], inputs[name]])
    return model(**inputs, mm_encoder_outputs=encoded or None, use_cache=False).logits


def shared_prefix_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a shared_prefix pair batch (`SharedPrefixPairCollator`): one row per pair, its 4D boolean mask and
    4-row positions handed to the model as they are (transformers uses a 4D mask as given)."""
    inputs = pair_model_inputs(batch)
    if model.config._attn_implementation == "eager":  # sdpa takes the boolean mask as is
        # eager attention adds the mask to the scores: it must be additive, 0 or the dtype's minimum
        mask, dtype = inputs["attention_mask"], model.get_input_embeddings().weight.dtype
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return model(**inputs, use_cache=False).logits


def pair_answer_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[SequenceLogps, SequenceLogps]:
    """Per-token log-probs of each pair's chosen and of its rejected answer, from one forward, in either layout.

    Both layouts give the same numbers (to float rounding): what a reference model stores with one holds for the other.
    """
    if CHOSEN_TARGETS in batch:
        logits = shared_prefix_logits(model, batch)
        return target_logps(logits, batch[CHOSEN_TARGETS]), target_logps(logits, batch[REJECTED_TARGETS])
    return sequence_logps(paired_logits(model, batch), batch["labels"]).split_chosen_rejected()
