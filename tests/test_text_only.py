"""Text-only records train next to video ones, and never leave the vision tower out of a step."""

import functools

import numpy as np
import torch

from recipes.lm import LMRecipe
from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.models import load_model
from tarsier_train.optim import warmup_cosine
from tarsier_train.toyworld import generate_clip, render_frames


def _record(with_video: bool) -> dict:
    content = [{"type": "text", "text": "Describe the video in detail."}]
    if with_video:
        content.insert(0, {"type": "video", "video": {"video_file": "k.mp4"}})
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": "The red circle grows."}]}],
            "task": "video/caption"}


def _recipe(model_dir, processor):
    return LMRecipe(load_model(model_dir), processor, functools.partial(torch.optim.AdamW, lr=1e-3),
                    functools.partial(warmup_cosine, warmup_steps=1, total_steps=2))


def _vision_grads(recipe):
    return [p.grad for p in recipe.model.model.visual.parameters()]


def test_text_only_and_mixed_batches_train_with_every_vision_parameter(tiny_model_dir, processor):
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    text_only = transform(canonical_sample("t", _record(False)), [])
    assert "pixel_values_videos" not in text_only and (text_only["mm_token_type_ids"] == 0).all()
    assert processor.tokenizer.decode(text_only["labels"][text_only["labels"] != IGNORE_INDEX]) == \
        "The red circle grows.<|im_end|>"
    video = encode_mp4(render_frames(generate_clip(np.random.default_rng(0))))
    with_video = transform(canonical_sample("k", _record(True)), [video])
    collate = VideoTextCollator(processor.tokenizer.pad_token_id)

    recipe = _recipe(tiny_model_dir, processor)
    loss, count = recipe._loss(collate([text_only]))
    reference = _recipe(tiny_model_dir, processor)
    inputs = model_inputs(collate([text_only]))
    plain = torch.nn.functional.cross_entropy(reference.model(**inputs).logits[0, :-1], text_only["labels"][1:],
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(loss, plain)  # the dummy vision term adds exactly nothing
    loss.backward()
    grads = _vision_grads(recipe)
    assert all(g is not None for g in grads) and all((g == 0).all() for g in grads)

    mixed = collate([text_only, with_video])
    assert mixed["video_grid_thw"].shape == (1, 3) and mixed["input_ids"].shape[0] == 2
    recipe.model.zero_grad(set_to_none=True)
    loss, count = recipe._loss(mixed)
    loss.backward()
    assert any((g != 0).any() for g in _vision_grads(recipe))  # a real video moves the vision tower
