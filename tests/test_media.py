"""Images, several media per sample, and Qwen2.5-VL's temporal spacing, through the real transform and model."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLProcessor

from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
from tarsier_train.data.video import VideoDecodeError, encode_mp4
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir
from tarsier_train.toyworld import generate_clip, render_frames


def _png(colour: str, size: tuple[int, int] = (56, 84)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(media: list[dict], answer: str = "A red square.") -> dict:
    return {"messages": [{"role": "user", "content": [*media, {"type": "text", "text": "What is shown?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "task": "image/qa"}


IMAGE = {"type": "image", "image": {"image_file": "a.png"}}
VIDEO = {"type": "video", "video": {"video_file": "v.mp4"}}


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_mp4(render_frames(generate_clip(np.random.default_rng(0))), fps=8)  # 16 frames at 8 fps


def test_single_multi_image_and_image_plus_video_samples_train_the_tiny_model(tiny_model_dir, processor, clip):
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    samples = [
        transform(canonical_sample("one", _record([IMAGE])), [_png("red")]),
        transform(canonical_sample("two", _record([IMAGE, {**IMAGE, "image": {"image_file": "b.png"}}])),
                  [_png("red"), _png("blue", (28, 28))]),
        transform(canonical_sample("mixed", _record([IMAGE, VIDEO])), [_png("red"), clip]),
    ]
    # 84 x 56 px -> 6 x 4 patches of 14; 28 x 28 px is raised to the 56 x 56 minimum -> 4 x 4
    assert [s["image_grid_thw"].tolist() for s in samples] == [[[1, 6, 4]], [[1, 6, 4], [1, 4, 4]], [[1, 6, 4]]]
    assert samples[2]["video_grid_thw"].tolist() == [[4, 8, 8]]
    mixed = samples[2]["mm_token_type_ids"].tolist()
    assert mixed.index(1) < mixed.index(2)  # media in the record's order: the image, then the video
    batch = VideoTextCollator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == sum(int(t.prod()) for s in samples for t in s["image_grid_thw"])

    model = load_model(tiny_model_dir)
    logits = model(**model_inputs(batch)).logits
    loss_sum, num_tokens = summed_token_cross_entropy(logits, batch["labels"])
    assert torch.isfinite(loss_sum) and int(num_tokens) == int((batch["labels"] != IGNORE_INDEX).sum())
    loss_sum.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_unreadable_images_are_decode_errors(processor):
    transform = VideoTextTransform(processor)
    with pytest.raises(VideoDecodeError, match="unreadable image"):
        transform(canonical_sample("bad", _record([IMAGE])), [b"\x89PNG not really"])


@pytest.mark.parametrize(("duplicate", "num_frames", "seconds"), [(True, 4, 0.625), (False, 4, 1.25), (True, 16, 0.125)])
def test_qwen2_5_vl_temporal_spacing_follows_the_sampled_frames(processor, clip, duplicate, num_frames, seconds):
    """16 frames at 8 fps sampled uniformly: 4 frames are 5/8 s apart, 16 are 1/8 s apart. A temporal step
    spans one sampled frame in duplicate mode and two in native mode."""
    qwen2_5 = Qwen2_5_VLProcessor(image_processor=processor.image_processor, video_processor=processor.video_processor,
                                  tokenizer=processor.tokenizer, chat_template=processor.chat_template)
    transform = VideoTextTransform(qwen2_5, FrameSampler(num_frames=num_frames), duplicate_frames=duplicate)
    task_input = transform.prepare(canonical_sample("v", _record([VIDEO])), [clip])
    for inputs in (transform.training_inputs(task_input), transform.generation_inputs(task_input)):
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([seconds])
    segment = VideoTextTransform(qwen2_5, FrameSampler("segment", num_frames=4), duplicate_frames=True)
    spread = segment.prepare(canonical_sample("v", _record([VIDEO])), [clip], np.random.default_rng(0))
    indices_span = spread.visuals[0].seconds_per_frame
    assert segment.training_inputs(spread)["second_per_grid_ts"].tolist() == pytest.approx([indices_span])


@pytest.mark.parametrize(("duplicate", "frame_sampling", "expected"), [
    (True, "uniform", ["<0.0 seconds>", "<0.6 seconds>", "<1.2 seconds>", "<1.9 seconds>"]),  # frames 0, 5, 10, 15
    (False, "uniform", ["<0.3 seconds>", "<1.6 seconds>"]),  # a step holds two sampled frames: their mean time
])
def test_qwen3_vl_prompt_timestamps_are_the_sampled_frames_times(cache_root, clip, duplicate, frame_sampling,
                                                                   expected):
    processor = load_processor(tiny_qwen_vl_dir(str(cache_root / "models"), family="qwen3_vl"))
    transform = VideoTextTransform(processor, FrameSampler(frame_sampling, num_frames=4), duplicate_frames=duplicate)
    inputs = transform.generation_inputs(transform.prepare(canonical_sample("v", _record([VIDEO])), [clip]))
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert re.findall(r"<[0-9.]+ seconds>", text) == expected
