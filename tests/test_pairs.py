"""Preference pairs: transform, collation in both layouts, and the shared-media / shared-prefix forwards against
each answer run alone."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import EVERY_FAMILY
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from datamodules.preference_pairs import pair_collator
from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.packing import rope_index_of
from tarsier_train.data.pairs import (
    CHOSEN_TARGETS,
    REFERENCE_KEY,
    REJECTED_TARGETS,
    PairCollator,
    SharedPrefixPairCollator,
    pair_inputs,
    shared_prefix_length,
)
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import IGNORE_INDEX, VISUAL_INPUTS, VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.losses.dpo import pair_logps, sequence_logps
from tarsier_train.models import load_model
from tarsier_train.models.families import family_of
from tarsier_train.models.shared_media import pair_answer_logps, paired_logits
from tarsier_train.toyworld import ToyWorldSpec, ensure_derived, generate_clip, render_frames


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_submodule(family_of(model).vision[0].rstrip("."))


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


@EVERY_FAMILY
def test_shared_media_forward_equals_each_row_with_its_own_media(pairs, tiny_model_dir, processor):
    model = load_model(tiny_model_dir)
    calls = []
    vision_tower(model).register_forward_hook(lambda *args: calls.append(1))
    batch = PairCollator(processor.tokenizer.pad_token_id)(pairs)
    shared = paired_logits(model, batch)
    assert len(calls) == 1  # one vision pass for all pairs and both answers
    rows = VideoTextCollator(processor.tokenizer.pad_token_id)
    for pair_index, pair in enumerate(pairs):
        media = {k: pair[k] for k in VISUAL_INPUTS if k in pair}
        for offset, name in ((0, "chosen"), (len(pairs), "rejected")):
            alone = model(**model_inputs(rows([{**pair[name], **media}])), use_cache=False).logits[0]
            n = len(alone)
            torch.testing.assert_close(shared[pair_index + offset, :n], alone, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def toyworld_pairs(tmp_path_factory, processor, pairs) -> list[dict]:
    """Toy-world pair shards (true description vs. events reversed or an action flipped) at 4 and 8 frames, a
    text-only pair, and the pairs above (answers that share their first words): a batch of mixed lengths."""
    shards = ensure_derived(tmp_path_factory.mktemp("toy"), ToyWorldSpec(num_train_clips=3, num_val_clips=1), "pairs")
    out = []
    for index, raw in enumerate(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)):
        transform = VideoTextTransform(processor, FrameSampler(num_frames=(4, 8)[index % 2]))
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        out.append(pair_inputs(transform, sample, transform.prepare(sample, media_bytes(sample, raw))))
    record = _pair_record("The square moves up.", "The square moves down.")
    record["messages"][0]["content"] = record["messages"][0]["content"][1:]  # no video
    transform = VideoTextTransform(processor)
    text_only = canonical_sample("t", record)
    without_reference = [{k: v for k, v in pair.items() if k != REFERENCE_KEY} for pair in pairs]
    return [*out, pair_inputs(transform, text_only, transform.prepare(text_only, [])), *without_reference]


@torch.no_grad()
def _alone(model, pair: dict, name: str) -> torch.Tensor:
    """Per-token log-probs of one answer run as a plain row with its own media."""
    media = {k: pair[k] for k in VISUAL_INPUTS if k in pair}
    batch = VideoTextCollator(0)([{**pair[name], **media}])
    logps = sequence_logps(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
    return logps.per_token[logps.mask]


def test_shared_prefix_row_masks_the_answers_off_each_other_and_continues_positions(pairs, processor, tiny_model_dir):
    pair = pairs[1]  # "The blue square moves up." vs "The blue square appears.": the answers share "The blue square"
    chosen, rejected = pair["chosen"]["input_ids"], pair["rejected"]["input_ids"]
    shared = shared_prefix_length(chosen, rejected)
    first_label = int((pair["chosen"]["labels"] != IGNORE_INDEX).nonzero()[0])
    assert processor.tokenizer.decode(chosen[first_label:shared]) == "The blue square"
    batch = SharedPrefixPairCollator(0, rope_index_of(tiny_model_dir))(pairs)
    num_chosen, length = len(chosen), len(chosen) + len(rejected) - shared
    row = batch["input_ids"][1]
    assert torch.equal(row[:length], torch.cat([chosen, rejected[shared:]])) and (row[length:] == 0).all()
    mask = batch["attention_mask"][1, 0]
    assert torch.equal(mask[:shared, :shared], torch.ones(shared, shared, dtype=torch.bool).tril())
    assert not mask[:shared, shared:].any()  # the prefix sees no answer
    assert mask[num_chosen:length, :shared].all() and not mask[num_chosen:length, shared:num_chosen].any()
    assert torch.equal(mask[num_chosen:length, num_chosen:length], mask[:length - num_chosen, :length - num_chosen])
    assert torch.equal(mask[length:, length:], torch.ones(len(row) - length, len(row) - length).tril().bool())
    assert not mask[length:, :length].any() and not mask[:length, length:].any()  # padding isolated
    # each answer's positions are those the model itself gives it after the prefix
    for name, span in (("chosen", slice(0, num_chosen)), ("rejected", torch.cat([torch.arange(shared),
                                                                                 torch.arange(num_chosen, length)]))):
        alone = pair[name]
        expected, _ = load_model(tiny_model_dir).model.get_rope_index(
            alone["input_ids"][None], mm_token_type_ids=alone["mm_token_type_ids"][None],
            video_grid_thw=pair["video_grid_thw"])
        assert torch.equal(batch["position_ids"][1:, 1, span], expected[:, 0])
        assert torch.equal(batch["position_ids"][0, 1, span], torch.arange(len(alone["input_ids"])))
    for key, name in ((CHOSEN_TARGETS, "chosen"), (REJECTED_TARGETS, "rejected")):
        targets = batch[key][1]
        assert processor.tokenizer.decode(targets[targets != IGNORE_INDEX]) == \
            processor.tokenizer.decode(pair[name]["labels"][pair[name]["labels"] != IGNORE_INDEX])
    assert batch["pixel_values_videos"].shape[0] == sum(int(g.prod()) for g in batch["video_grid_thw"])


@EVERY_FAMILY
def test_shared_prefix_logps_equal_two_rows_and_each_answer_alone(toyworld_pairs, tiny_model_dir):
    model = load_model(tiny_model_dir)  # sdpa
    calls = []
    vision_tower(model).register_forward_hook(lambda *args: calls.append(1))
    layouts = {"shared_prefix": SharedPrefixPairCollator(0, rope_index_of(tiny_model_dir)),
               "two_rows": PairCollator(0)}
    logps, grads = {}, {}
    for name, collate in layouts.items():
        batch = collate(toyworld_pairs)
        logps[name] = pair_answer_logps(model, batch)
        assert len(calls) == 1  # one vision pass for all pairs and both answers, in both layouts
        calls.clear()
        chosen, rejected = pair_logps(*logps[name], ld_alpha=0.5)  # LD-DPO reads each answer's tokens in order
        (chosen - 2 * rejected).sum().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    assert layouts["shared_prefix"](toyworld_pairs)["input_ids"].numel() < \
        layouts["two_rows"](toyworld_pairs)["input_ids"].numel()
    for index, answer in enumerate(("chosen", "rejected")):
        shared, two_rows = logps["shared_prefix"][index], logps["two_rows"][index]
        assert torch.equal(shared.num_tokens, two_rows.num_tokens)
        for pair_index, pair in enumerate(toyworld_pairs):
            alone = _alone(model, pair, answer)
            for layout in (shared, two_rows):
                per_token = layout.per_token[pair_index][layout.mask[pair_index]]
                torch.testing.assert_close(per_token.detach(), alone, atol=1e-5, rtol=1e-5)
        for alpha in (None, 0.5):
            torch.testing.assert_close(pair_logps(*logps["shared_prefix"], alpha)[index],
                                       pair_logps(*logps["two_rows"], alpha)[index], atol=1e-4, rtol=1e-6)
    for name, grad in grads["two_rows"].items():
        torch.testing.assert_close(grads["shared_prefix"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_eager_attention_gets_the_shared_prefix_mask_as_an_additive_one(toyworld_pairs, tiny_model_dir):
    batch = SharedPrefixPairCollator(0, rope_index_of(tiny_model_dir))(toyworld_pairs)
    sdpa, eager = (pair_answer_logps(load_model(tiny_model_dir, attn_implementation=attention), batch)
                   for attention in ("sdpa", "eager"))
    for expected, actual in zip(sdpa, eager, strict=True):
        assert torch.equal(actual.mask, expected.mask)
        torch.testing.assert_close(actual.per_token, expected.per_token, atol=1e-5, rtol=1e-5)


def test_pair_layout_is_checked_against_the_attention(processor, tiny_model_dir, cache_root):
    assert isinstance(pair_collator(processor, "two_rows", "flash_attention_2"), PairCollator)
    assert isinstance(pair_collator(processor, "shared_prefix", "eager", tiny_model_dir), SharedPrefixPairCollator)
    with pytest.raises(ValueError, match="data.pair_layout='packed': allowed values are shared_prefix, two_rows"):
        pair_collator(processor, "packed")
    # through the composed config, as train.py builds the data (before the model): the default layout, then flash
    overrides = ["recipe=dpo", "experiment=toyworld_dpo", f"cache_root={cache_root}", f"init_from={tiny_model_dir}"]
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        default = compose("train", overrides=overrides)
        flash = compose("train", overrides=[*overrides, "model.attn_implementation=flash_attention_2"])
    data = instantiate(default.data, processor=processor, model_dir=tiny_model_dir)
    assert isinstance(data.train_collator, SharedPrefixPairCollator) and data.collator is data.train_collator
    with pytest.raises(InstantiationException, match="attn_implementation='flash_attention_2'.*pair_layout=two_rows"):
        instantiate(flash.data, processor=processor, model_dir=tiny_model_dir)
    flash.data.pair_layout = "two_rows"
    assert isinstance(instantiate(flash.data, processor=processor, model_dir=tiny_model_dir).collator, PairCollator)
