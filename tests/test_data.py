import functools
import importlib.util
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
import tarsier_train.data.stream as stream_module
from tarsier_train.data.skips import SKIP_REASONS_KEY
from tarsier_train.data.stream import POSITION_KEY, EvalStream, Source, StreamProgress, VideoTextStream
from tarsier_train.data.transform import IGNORE_INDEX, TRUNCATED_KEY, SampleTooLongError, VideoTextTransform
from tarsier_train.data.video import VideoDecodeError, check_backend, decode_video, encode_mp4, read_frames
from tarsier_train.toyworld import ToyWorldSpec, generate_clip, render_frames, toyworld_shards
from tarsier_train.toyworld.shards import clip_record

SPEC = ToyWorldSpec(num_train_clips=24, num_val_clips=4, clips_per_shard=10, seed=7)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    return toyworld_shards(tmp_path_factory.mktemp("toy"), SPEC)


def test_mp4_round_trip_is_real_h264_close_to_the_frames():
    clip = generate_clip(np.random.default_rng(0))
    frames = render_frames(clip)
    data = encode_mp4(frames)
    assert data[4:8] == b"ftyp"
    decoded = decode_video(data)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4


def test_corrupt_video_raises_a_decode_error():
    with pytest.raises(VideoDecodeError):
        decode_video(b"\x00\x00\x00\x18ftypmp42 not really a video")


def test_shard_round_trip_matches_regenerated_clips(shards):
    assert len(shards["train"]) == 3 and len(shards["val"]) == 1
    samples = list(wds.WebDataset(shards["train"], shardshuffle=False, nodesplitter=None, workersplitter=None))
    assert [s["__key__"] for s in samples] == [f"train_{i:07d}" for i in range(24)]
    rng = np.random.default_rng(SPEC.seed)
    for index, sample in enumerate(samples):
        clip = generate_clip(rng, SPEC.num_frames, SPEC.frame_size, SPEC.max_events)
        assert json.loads(sample["json"]) == clip_record(clip, sample["__key__"], index, SPEC)
        assert np.abs(decode_video(sample["mp4"]).astype(int) - render_frames(clip).astype(int)).mean() < 4


def test_generation_is_cached(shards, tmp_path):
    root = Path(shards["train"][0]).parent.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    assert toyworld_shards(root, SPEC) == shards
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")} == before


def _first_sample(shards):
    raw = next(iter(wds.WebDataset(shards["val"], shardshuffle=False, nodesplitter=None, workersplitter=None)))
    return canonical_sample(raw["__key__"], json.loads(raw["json"])), [raw["mp4"]]


def test_labels_are_exactly_the_assistant_tokens(shards, processor):
    sample, video = _first_sample(shards)
    out = VideoTextTransform(processor, FrameSampler(num_frames=8), duplicate_frames=True)(sample, video)
    tokenizer = processor.tokenizer
    target_ids = tokenizer(sample.target + "<|im_end|>", add_special_tokens=False)["input_ids"]
    labelled = out["labels"][out["labels"] != IGNORE_INDEX].tolist()
    assert labelled == target_ids
    # the labelled tokens close the sequence, right after the assistant header; only the template's newline follows
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][-len(target_ids) - 1:].tolist() == target_ids + newline
    assert (out["labels"][: -len(target_ids) - 1] == IGNORE_INDEX).all() and out["labels"][-1] == IGNORE_INDEX


@pytest.mark.parametrize("duplicate, num_frames, temporal_steps", [(True, 8, 8), (False, 8, 4), (False, 5, 3)])
def test_video_tokens_follow_frame_mode(shards, processor, duplicate, num_frames, temporal_steps):
    sample, video = _first_sample(shards)
    out = VideoTextTransform(processor, FrameSampler(num_frames=num_frames), duplicate_frames=duplicate)(sample, video)
    t, h, w = out["video_grid_thw"][0].tolist()
    assert (t, h, w) == (temporal_steps, 8, 8)
    video_token = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert (out["input_ids"] == video_token).sum() == t * h * w // 4
    assert (out["mm_token_type_ids"] == 2).sum() == t * h * w // 4


def _stream(shards, processor, **kwargs):
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    return VideoTextStream([Source(shards, lambda k, r, m, g: {"key": k, **transform(s := canonical_sample(k, r), media_bytes(s, m), g)})],
                           **kwargs)


def _keys(batch):
    return [s["key"] for s in batch]


def test_stream_order_is_seeded_and_covers_each_epoch_once(shards, processor):
    def keys(seed):
        it = iter(_stream(shards["train"], processor, seed=seed, shuffle_block=4))
        return [next(it)["key"] for _ in range(48)]

    first = keys(0)
    assert first == keys(0) and first != keys(1)
    assert sorted(first[:24]) == sorted(first[24:]) == [f"train_{i:07d}" for i in range(24)]
    assert first[:24] != first[24:]  # a new order each epoch


def _run(stream, progress, num_workers, num_batches, batch_size=3):
    """Batches a loader delivers, recorded as trained on (what the datamodule does before each step)."""
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=lambda s: s)
    batches = []
    for batch in itertools.islice(loader, num_batches):
        progress.record(torch.tensor([s[POSITION_KEY] for s in batch]))
        batches.append(_keys(batch))
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_the_same_layout_replays_the_uninterrupted_batches(shards, processor, num_workers):
    workers = max(1, num_workers)
    stream = _stream(shards["train"], processor, seed=5, shuffle_block=4)
    full = _run(stream, StreamProgress(stream, 1, workers), num_workers, 9)

    first = _stream(shards["train"], processor, seed=5, shuffle_block=4)
    progress = StreamProgress(first, 1, workers)
    assert _run(first, progress, num_workers, 5) == full[:5]
    resumed = _stream(shards["train"], processor, seed=5, shuffle_block=4)
    resumed.resume_state = progress.state_dict(batches_per_rank=5)
    assert _run(resumed, StreamProgress(resumed, 1, workers), num_workers, 4) == full[5:]


def test_resume_on_another_layout_repeats_and_skips_nothing(shards, processor, monkeypatch):
    # Two ranks (simulated) x one worker consume 2 batches each, then 3 ranks take over.
    progress = None
    seen = []
    for rank in range(2):
        monkeypatch.setattr(stream_module, "_rank_and_world", lambda rank=rank: (rank, 2))
        stream = _stream(shards["train"], processor, seed=8, shuffle_block=4)
        progress = progress or StreamProgress(stream, 2, 1)
        seen += [k for batch in _run(stream, progress, 0, 2) for k in batch]
    state = progress.state_dict(batches_per_rank=2)
    for rank in range(3):
        monkeypatch.setattr(stream_module, "_rank_and_world", lambda rank=rank: (rank, 3))
        stream = _stream(shards["train"], processor, seed=8, shuffle_block=4)
        stream.resume_state = state
        schedule = stream.plan(3, 1).schedules[0]
        leftover = sum(len(r) for r in schedule.segment[rank])
        seen += [s["key"] for s in itertools.islice(iter(stream), leftover)]
    # every epoch that was started is read to its end, each sample exactly once per epoch
    num_epochs = schedule.first_epoch
    assert num_epochs >= 1 and Counter(seen) == {f"train_{i:07d}": num_epochs for i in range(24)}


def test_corrupt_samples_and_shards_are_skipped_and_counted(shards, processor, tmp_path):
    good = list(wds.WebDataset(shards["val"], shardshuffle=False, nodesplitter=None, workersplitter=None))
    bad_shard = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(bad_shard)) as sink:
        sink.write({"__key__": "good_a", "json": good[0]["json"], "mp4": good[0]["mp4"]})
        sink.write({"__key__": "truncated", "json": good[1]["json"], "mp4": good[1]["mp4"][: len(good[1]["mp4"]) // 3]})
        sink.write({"__key__": "bad_json", "json": b"{not json", "mp4": good[2]["mp4"]})
        sink.write({"__key__": "good_b", "json": good[3]["json"], "mp4": good[3]["mp4"]})
    broken_tar = tmp_path / "broken-000001.tar"
    broken_tar.write_bytes(bad_shard.read_bytes()[:1500])  # cut inside the first member
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    make = lambda k, r, m, g: {"key": k, **transform(s := canonical_sample(k, r), media_bytes(s, m), g)}  # noqa: E731
    out = list(EvalStream([str(bad_shard), str(broken_tar)], make))
    assert [s["key"] for s in out] == ["good_a", "good_b"]
    assert [s[SKIP_REASONS_KEY] for s in out] == [{}, {"undecodable_media": 1, "bad_json": 1}]
    # the training stream skips them too, in its own order, and never stalls
    stream = VideoTextStream([Source([str(bad_shard)], make)], shuffle=False)
    assert stream.shard_sizes == [[4]]
    train = list(itertools.islice(iter(stream), 4))
    assert [s["key"] for s in train] == ["good_a", "good_b", "good_a", "good_b"]
    assert [sum(s[SKIP_REASONS_KEY].values()) for s in train] == [0, 2, 0, 2]


@pytest.mark.parametrize("budget, expected_hw", [(None, (8, 8)), (16 * 56 * 56, (4, 4)), (16 * 84 * 84, (6, 6)), (1, (4, 4))])
def test_per_sample_pixel_budget_is_shared_by_all_frames(shards, processor, budget, expected_hw):
    sample, video = _first_sample(shards)
    transform = VideoTextTransform(processor, FrameSampler(num_frames=8), duplicate_frames=True, total_pixels=budget)
    task_input = transform.prepare(sample, video)
    frames = transform.processor_frames(task_input.frames)
    assert len(frames) == 16  # 8 sampled frames, each duplicated
    t, h, w = transform.training_inputs(task_input)["video_grid_thw"][0].tolist()
    assert (t, h, w) == (8, *expected_hw)  # a budget of 1 px still keeps the processor's minimum (56 x 56)
    if budget and budget > 1:
        assert len(frames) * h * w * 14 * 14 <= budget


def _toy_video(num_frames=16):
    return encode_mp4(render_frames(generate_clip(np.random.default_rng(3), num_frames=num_frames)))


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=pytest.mark.skipif(
    importlib.util.find_spec("decord") is None, reason="decord not installed"))])
def test_backends_read_only_the_chosen_frames(backend):
    data = _toy_video()
    everything = decode_video(data)
    frames, indices, fps = read_frames(data, lambda n, fps: [0, n // 2, n - 1], backend=backend)
    assert indices == [0, 8, 15] and fps == 8.0
    assert np.abs(frames.astype(int) - everything[indices].astype(int)).mean() < 2


def test_frames_past_the_end_and_missing_backends_are_clear_errors(monkeypatch):
    with pytest.raises(VideoDecodeError, match="requested from a video of 16 frames"):
        read_frames(_toy_video(), lambda n, fps: [0, 16])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="data.video_backend='torchcodec' needs the torchcodec"):
        check_backend("torchcodec")


def test_slow_decodes_time_out_as_decode_errors():
    data = _toy_video()

    def slow_choice(n, fps):
        import time
        time.sleep(2)
        return [0]

    with pytest.raises(VideoDecodeError, match="longer than 0.2 s"):
        read_frames(data, slow_choice, timeout_s=0.2)
    assert read_frames(data, lambda n, fps: [1], timeout_s=60)[1] == [1]  # a generous limit does not fire


def _tagged(tag):
    return functools.partial(_tag_sample, tag)


def _tag_sample(tag, key, record, members, rng):
    return {"key": f"{tag}/{key}"}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = toyworld_shards(root, ToyWorldSpec(num_train_clips=30, num_val_clips=1, clips_per_shard=6, seed=1))["train"]
    b = toyworld_shards(root, ToyWorldSpec(num_train_clips=12, num_val_clips=1, clips_per_shard=4, seed=2))["train"]
    return a, b


def _mixture(two_sources, seed=0):
    a, b = two_sources
    return VideoTextStream([Source(a, _tagged("a"), weight=3.0), Source(b, _tagged("b"), weight=1.0)], seed=seed,
                           shuffle_block=4)


def test_mixture_draws_follow_the_weights(two_sources):
    keys = [s["key"] for s in itertools.islice(iter(_mixture(two_sources)), 800)]
    share_a = sum(k.startswith("a/") for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.05
    assert keys == [s["key"] for s in itertools.islice(iter(_mixture(two_sources)), 800)]  # seeded
    assert keys != [s["key"] for s in itertools.islice(iter(_mixture(two_sources, seed=1)), 800)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixture_resume_replays_and_elastic_resume_covers_each_source_once(two_sources, num_workers):
    workers = max(1, num_workers)
    full_stream = _mixture(two_sources)
    full = _run(full_stream, StreamProgress(full_stream, 1, workers), num_workers, 12, batch_size=4)
    first = _mixture(two_sources)
    progress = StreamProgress(first, 1, workers)
    seen = [k for batch in _run(first, progress, num_workers, 5, batch_size=4) for k in batch]
    state = progress.state_dict(batches_per_rank=5)
    resumed = _mixture(two_sources)
    resumed.resume_state = state
    assert _run(resumed, StreamProgress(resumed, 1, workers), num_workers, 7, batch_size=4) == full[5:]
    # On one more worker than before, each source's started epochs are finished exactly once.
    elastic = _mixture(two_sources)
    elastic.resume_state = state
    plan = elastic.plan(1, workers + 1)
    for source, tag, size in ((0, "a", 30), (1, "b", 12)):
        left = [sum(len(r) for r in plan.schedules[source].segment[c]) for c in range(workers + 1)]
        items = [k for c in range(workers + 1)
                 for _, k, _, _ in itertools.islice(elastic._source_items(source, plan.schedules[source], c, 0), left[c])]
        mine = [k for k in seen if k.startswith(tag + "/")] + [f"{tag}/{k}" for k in items]
        epochs = plan.schedules[source].first_epoch
        assert Counter(mine) == {f"{tag}/train_{i:07d}": epochs for i in range(size)}


def test_too_long_samples_lose_text_never_visual_tokens(shards, processor):
    sample, video = _first_sample(shards)
    full = VideoTextTransform(processor, FrameSampler(num_frames=8))(sample, video)
    length, last_visual = len(full["input_ids"]), int((full["mm_token_type_ids"] != 0).nonzero()[-1])
    assert full[TRUNCATED_KEY] == 0

    cut = VideoTextTransform(processor, FrameSampler(num_frames=8), max_seq_len=length - 3)(sample, video)
    assert cut[TRUNCATED_KEY] == 1 and torch.equal(cut["input_ids"], full["input_ids"][: length - 3])
    assert torch.equal(cut["labels"], full["labels"][: length - 3]) and torch.equal(cut["pixel_values_videos"], full["pixel_values_videos"])

    with pytest.raises(SampleTooLongError, match="visual tokens run past"):
        VideoTextTransform(processor, FrameSampler(num_frames=8), max_seq_len=last_visual)(sample, video)
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(SampleTooLongError, match="no target left"):
        VideoTextTransform(processor, FrameSampler(num_frames=8), max_seq_len=first_label)(sample, video)


def test_bad_mixture_sources_fail_when_the_datamodule_is_built(processor):
    from datamodules.video_shards import VideoShardDataModule

    with pytest.raises(ValueError, match=r"data.sources\[1\]: unknown keys \['wieght'\]"):
        VideoShardDataModule(processor, sources=[{"shards": "a"}, {"shards": "b", "wieght": 2}])
    with pytest.raises(ValueError, match="allowed values are uniform, segment, fps"):
        VideoShardDataModule(processor, sources=[{"shards": "a", "frame_sampling": "random"}])
    with pytest.raises(ValueError, match="not both"):
        VideoShardDataModule(processor, train_shards="x", sources=[{"shards": "a"}])
    with pytest.raises(ValueError, match=r"data.sources\[0\].task='video/grounded': allowed values are null"):
        VideoShardDataModule(processor, sources=[{"shards": "a", "task": "video/grounded"}])
    with pytest.raises(ValueError, match=r"data.task='caption': allowed values"):
        VideoShardDataModule(processor, train_shards="x", task="caption")


def test_a_source_can_train_captions_as_another_task(two_sources, processor):
    """One toy-world source as written, the same kind of shards as frame-order prediction."""
    from datamodules.video_shards import VideoShardDataModule

    a, b = two_sources
    datamodule = VideoShardDataModule(processor, sources=[{"shards": a}, {"shards": b, "task": "video/frame_order"}],
                                      task="video/grounding", num_frames=8)
    first, second = datamodule.train_sources()
    decode = processor.tokenizer.decode

    def target(source, shard):
        raw = next(iter(wds.WebDataset(shard[:1], shardshuffle=False, nodesplitter=None, workersplitter=None)))
        sample = source.make_sample(raw["__key__"], json.loads(raw["json"]), raw, np.random.default_rng(0))
        return decode(sample["labels"][sample["labels"] != IGNORE_INDEX])

    assert target(first, a).startswith("<frame: 1-")  # data.task applies to sources without their own
    assert re.fullmatch(r"(\d+, ){4}\d+<\|im_end\|>", target(second, b))  # 8 frames: 3 given, 5 asked
