"""Packed rows train exactly like the same samples one by one: positions, logits, loss, boundary labels."""

import itertools
import json

import pytest
import torch
import webdataset as wds
from conftest import EVERY_QWEN_FAMILY, FAMILIES

from tarsier_train.data.collate import NON_PAD_FRACTION_KEY, VideoTextCollator, model_inputs
from tarsier_train.data.packing import PackingCollator, pack_rows, rope_index_of
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models import load_model
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

FRAME_COUNTS = (4, 8, 16)  # 64, 128, 256 video tokens: a mixed-length batch


def _text_only_record() -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the video in detail."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "The red circle grows."}]}],
            "task": "video/caption"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory, processor) -> list[dict]:
    """Nine toy-world clips at 4, 8 and 16 frames, and two text-only samples, in mixed order."""
    spec = ToyWorldSpec(num_train_clips=9, num_val_clips=1, clips_per_shard=9)
    shards = toyworld_shards(tmp_path_factory.mktemp("toy"), spec)["train"]
    out = []
    for index, raw in enumerate(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)):
        transform = VideoTextTransform(processor, FrameSampler(num_frames=FRAME_COUNTS[index % 3]))
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        out.append(transform(sample, media_bytes(sample, raw)))
    text_only = VideoTextTransform(processor)(canonical_sample("t", _text_only_record()), [])
    return out[:4] + [text_only] + out[4:] + [text_only]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)  # float32, sdpa, eval mode (no dropout)


def _collator(processor, tiny_model_dir, **kwargs) -> PackingCollator:
    return PackingCollator(processor.tokenizer.pad_token_id, rope_index_of(tiny_model_dir), **kwargs)


def _spans(collator: PackingCollator, samples: list[dict]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sample inside the packed batch, by sample index."""
    spans = [None] * len(samples)
    for row, indices in enumerate(collator.layout([len(s["input_ids"]) for s in samples])):
        starts = itertools.accumulate((len(samples[i]["input_ids"]) for i in indices), initial=0)
        for index, start in zip(indices, starts):
            spans[index] = (row, start, start + len(samples[index]["input_ids"]))
    return spans


def _alone(processor, sample: dict) -> dict:
    return VideoTextCollator(processor.tokenizer.pad_token_id)([sample])


@pytest.fixture(scope="module")
def unpacked(samples, processor, model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits, summed token loss, target count) of each sample run alone: the reference."""
    out = []
    with torch.no_grad():
        for sample in samples:
            batch = _alone(processor, sample)
            logits = model(**model_inputs(batch), use_cache=False).logits
            out.append((logits[0], *summed_token_cross_entropy(logits, batch["labels"])))
    return out


@EVERY_QWEN_FAMILY
def test_each_sample_keeps_the_positions_the_model_gives_it_alone(samples, processor, tiny_model_dir, model):
    collator = _collator(processor, tiny_model_dir, max_tokens_per_row=700)
    batch = collator(samples)
    assert batch["position_ids"].shape == (4, *batch["input_ids"].shape)
    for sample, (row, start, end) in zip(samples, _spans(collator, samples)):
        single = _alone(processor, sample)
        model.model.rope_deltas = None  # what a training forward of this sample alone computes
        spacing = {"second_per_grid_ts": single["second_per_grid_ts"]} if "second_per_grid_ts" in single else {}
        expected = model.model.compute_3d_position_ids(
            input_ids=single["input_ids"], inputs_embeds=None, image_grid_thw=single.get("image_grid_thw"),
            video_grid_thw=single.get("video_grid_thw"), attention_mask=single["attention_mask"], cache=None,
            mm_token_type_ids=single["mm_token_type_ids"], **spacing)
        if expected is None:  # text only: the language model counts 0, 1, 2, ... on all three rows
            expected = torch.arange(end - start).expand(3, 1, -1)
        assert torch.equal(batch["position_ids"][1:, row, start:end], expected[:, 0])
        assert torch.equal(batch["position_ids"][0, row, start:end], torch.arange(end - start))
        assert torch.equal(batch["input_ids"][row, start:end], sample["input_ids"])
    video_rows = [s for s in samples if "video_grid_thw" in s]
    assert not torch.equal(video_rows[0]["video_grid_thw"], video_rows[2]["video_grid_thw"])  # frame counts differ


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_each_sample_alone(samples, processor, tiny_model_dir, unpacked, attn_implementation):
    """Any attention across a boundary would change the later sample's logits (reference: sdpa, alone)."""
    model = load_model(tiny_model_dir, attn_implementation=attn_implementation)
    collator = _collator(processor, tiny_model_dir, max_tokens_per_row=700)
    batch = collator(samples)
    assert max(len(row) for row in collator.layout([len(s["input_ids"]) for s in samples])) >= 3
    with torch.no_grad():
        packed = model(**model_inputs(batch), use_cache=False).logits
    for (alone, _, _), (row, start, end) in zip(unpacked, _spans(collator, samples)):
        torch.testing.assert_close(packed[row, start:end], alone, rtol=1e-4, atol=1e-4)


LAYOUTS = [{"max_tokens_per_row": 700}, {"max_tokens_per_row": 400}, {"single_row": True}]


@pytest.mark.parametrize("tiny_model_dir,layout", [("qwen2_vl", layout) for layout in LAYOUTS] + [
    (family, LAYOUTS[0]) for family in FAMILIES[1:]], indirect=["tiny_model_dir"])
def test_packed_loss_equals_unpacked_loss(samples, processor, tiny_model_dir, model, unpacked, layout):
    """Sum of token cross-entropy and target count, packed vs one sample at a time (single_row: the
    flash-attn varlen layout, here run on sdpa, which reads the same boundaries from the positions)."""
    batch = _collator(processor, tiny_model_dir, **layout)(samples)
    with torch.no_grad():
        packed_sum, packed_count = summed_token_cross_entropy(
            model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
    assert int(packed_count) == sum(int(count) for _, _, count in unpacked) > 0
    torch.testing.assert_close(packed_sum, sum(loss for _, loss, _ in unpacked), rtol=1e-6, atol=1e-3)


def test_labels_at_sample_boundaries_are_masked(samples, processor, tiny_model_dir):
    # Every token labelled, so the first token of each sample would be a target if nothing masked it.
    labelled = [{**s, "labels": s["input_ids"].clone()} for s in samples]
    collator = _collator(processor, tiny_model_dir, max_tokens_per_row=700)
    batch = collator(labelled)
    spans = _spans(collator, labelled)
    for sample, (row, start, end) in zip(labelled, spans):
        assert batch["labels"][row, start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][row, start + 1:end], sample["input_ids"][1:])
    real = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for row, start, end in spans:
        real[row, start:end] = True
    assert (batch["labels"][~real] == IGNORE_INDEX).all()  # row-end padding is never a target
    assert (batch["input_ids"][~real] == processor.tokenizer.pad_token_id).all()
    # the next-token targets are exactly those of each sample alone: n - 1 per sample
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum() == sum(len(s["input_ids"]) - 1 for s in labelled)


def test_packing_fills_at_least_95_percent_of_the_token_slots(samples, processor, tiny_model_dir):
    batch = _collator(processor, tiny_model_dir, max_tokens_per_row=1024)(samples)
    padded = VideoTextCollator(processor.tokenizer.pad_token_id)(samples)
    padded_fraction = padded["attention_mask"].float().mean().item()
    packed_fraction = batch[NON_PAD_FRACTION_KEY].item()
    lengths = sorted(len(s["input_ids"]) for s in samples)
    print(f"\n{len(samples)} samples of {lengths[0]}..{lengths[-1]} tokens: non-pad fraction "
          f"padded {padded_fraction:.1%} ({tuple(padded['input_ids'].shape)}), "
          f"packed {packed_fraction:.1%} ({tuple(batch['input_ids'].shape)}, budget 1024)")
    assert packed_fraction == sum(lengths) / batch["input_ids"].numel()
    assert packed_fraction >= 0.95 > padded_fraction


def test_pack_rows_places_every_sample_once_within_the_budget():
    lengths = [93, 163, 292, 87, 156, 290, 92, 150, 285, 100, 156, 284, 31, 31]
    for budget in (300, 512, 700, 1024, 4096):
        rows = pack_rows(lengths, budget)
        assert sorted(itertools.chain(*rows)) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in row) for row in rows) <= budget
    assert pack_rows([5000, 10, 20], 100) == [[0], [2, 1]]  # over the budget: a row of its own, never cut
