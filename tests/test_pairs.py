"""Preference pairs: transform, collation, and the shared-media forward against the plain one."""

import numpy as np
import pytest
import torch

from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.pairs import REFERENCE_KEY, PairCollator, pair_inputs
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.models import load_model
from tarsier_train.models.shared_media import paired_logits
from tarsier_train.toyworld import generate_clip, render_frames


def _pair_record(chosen: str, rejected: str, reference=None) -> dict:
    record = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": {"video_file": "k.mp4"}},
                                     {"type": "text", "text": "Describe the video in detail."}]},
        {"role": "assistant", "content": [{"type": "text", "text": chosen, "chosen": chosen, "rejected": rejected}]}],
        "task": "video/caption"}
    if reference is not None:
        record["extra_info"] = {REFERENCE_KEY: {"chosen": reference[0], "rejected": reference[1]}}
    return record


@pytest.fixture(scope="module")
def pairs(processor):
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    out = []
    for seed, (chosen, rejected) in enumerate([("The red circle grows.", "The red circle moves left. It shrinks."),
                                               ("The blue square moves up.", "The blue square appears.")]):
        video = encode_mp4(render_frames(generate_clip(np.random.default_rng(seed))))
        sample = canonical_sample(f"k{seed}", _pair_record(chosen, rejected, (-1.5 - seed, -2.5)))
        out.append(pair_inputs(transform, sample, transform.prepare(sample, [video])))
    return out


def test_pair_inputs_label_each_answer_and_keep_the_media_once(pairs, processor):
    pair = pairs[0]
    for name, answer in (("chosen", "The red circle grows."), ("rejected", "The red circle moves left. It shrinks.")):
        labels = pair[name]["labels"]
        assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == answer + "<|im_end|>"
        assert "pixel_values_videos" not in pair[name]
    assert pair["video_grid_thw"].tolist() == [[4, 8, 8]] and pair[REFERENCE_KEY] == (-1.5, -2.5)
    prompt_length = int((pair["chosen"]["labels"] != IGNORE_INDEX).nonzero()[0])
    assert torch.equal(pair["chosen"]["input_ids"][:prompt_length], pair["rejected"]["input_ids"][:prompt_length])


def test_collated_pairs_put_chosen_rows_first_and_media_once(pairs):
    batch = PairCollator(0)(pairs)
    assert batch["input_ids"].shape[0] == 4 and batch["video_grid_thw"].shape[0] == 2
    assert batch["pixel_values_videos"].shape[0] == sum(int(g.prod()) for g in batch["video_grid_thw"])
    assert batch[REFERENCE_KEY].tolist() == [[-1.5, -2.5], [-2.5, -2.5]]
    with pytest.raises(ValueError, match="some pairs"):
        PairCollator(0)([pairs[0], {k: v for k, v in pairs[1].items() if k != REFERENCE_KEY}])


def test_shared_media_forward_equals_each_row_with_its_own_media(pairs, tiny_model_dir, processor):
    model = load_model(tiny_model_dir)
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    batch = PairCollator(processor.tokenizer.pad_token_id)(pairs)
    shared = paired_logits(model, batch)
    assert len(calls) == 1  # one vision pass for all pairs and both answers
    rows = VideoTextCollator(processor.tokenizer.pad_token_id)
    for pair_index, pair in enumerate(pairs):
        media = {k: pair[k] for k in ("pixel_values_videos", "video_grid_thw")}
        for offset, name in ((0, "chosen"), (len(pairs), "rejected")):
            alone = model(**model_inputs(rows([{**pair[name], **media}])), use_cache=False).logits[0]
            n = len(alone)
            torch.testing.assert_close(shared[pair_index + offset, :n], alone, atol=1e-4, rtol=1e-4)
