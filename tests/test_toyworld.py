import numpy as np
import pytest

from tarsier_train.eval.event_f1 import parse_events
from tarsier_train.toyworld import describe, describe_grounded, generate_clip, render_frames
from tarsier_train.toyworld.world import COLOURS


def _clips(seed: int, n: int = 50):
    rng = np.random.default_rng(seed)
    return [generate_clip(rng, num_frames=16, frame_size=112) for _ in range(n)]


def test_generation_is_deterministic_per_seed():
    assert _clips(3) == _clips(3)
    assert _clips(3) != _clips(4)


def test_events_tile_the_clip_with_valid_spans():
    for clip in _clips(0, 200):
        assert 1 <= len(clip.events) <= 3
        assert clip.events[0].start == 0 and clip.events[-1].end == 15
        for before, after in zip(clip.events, clip.events[1:]):
            assert after.start == before.end + 1
        assert all(e.end - e.start + 1 >= 4 for e in clip.events)
        assert len(clip.track) == 16


def _object_pixels(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.argwhere(np.all(frame == np.array(COLOURS[colour], dtype=np.uint8), axis=-1))


@pytest.mark.parametrize("seed", range(5))
def test_rendered_frames_show_the_described_events(seed):
    for clip in _clips(seed, 40):
        frames = render_frames(clip, 112)
        for event in clip.events:
            first, last = _object_pixels(frames[event.start], clip.colour), _object_pixels(frames[event.end], clip.colour)
            if event.action == "appears":
                assert len(first) == 0 and len(last) > 0
            elif event.action == "disappears":
                assert len(first) > 0 and len(last) == 0
            elif event.action == "grows":
                assert len(last) > 1.5 * len(first)
            elif event.action == "shrinks":
                assert len(first) > 1.5 * len(last)
            else:
                (y0, x0), (y1, x1) = first.mean(0), last.mean(0)
                expected = {"moves left": x1 < x0 - 20, "moves right": x1 > x0 + 20,
                            "moves up": y1 < y0 - 20, "moves down": y1 > y0 + 20}[event.action]
                assert expected, (event, (x0, y0), (x1, y1))


def test_descriptions_parse_back_to_the_ground_truth():
    for clip in _clips(1, 100):
        keys = [(e.colour, e.shape, e.action) for e in clip.events]
        assert parse_events(describe(clip.events)) == keys
        assert parse_events(describe_grounded(clip.events, list(range(16)))) == keys


def test_grounded_description_uses_positions_of_sampled_frames():
    clip = next(c for c in _clips(2, 100) if len(c.events) == 2)
    first, second = clip.events
    sampled = [0, 5, 10, 15]
    text = describe_grounded(clip.events, sampled)
    seen_first = [i + 1 for i, f in enumerate(sampled) if first.start <= f <= first.end]
    assert text.startswith(f"<frame: {seen_first[0]}-{seen_first[-1]}> The {clip.colour} {clip.shape} {first.action}.")


def test_tracking_boxes_enclose_the_rendered_object():
    from tarsier_train.toyworld.shards import tracking_boxes

    for clip in _clips(2, 20):
        frames, boxes = render_frames(clip, 112), tracking_boxes(clip, 112)
        for t, frame in enumerate(frames):
            pixels = _object_pixels(frame, clip.colour)
            assert (str(t) in boxes) == (len(pixels) > 0)
            if len(pixels):
                x1, y1, x2, y2 = np.array(boxes[str(t)]) * 112
                (top, left), (bottom, right) = pixels.min(0), pixels.max(0)
                assert x1 - 1 <= left and right <= x2 + 1 and y1 - 1 <= top and bottom <= y2 + 1
                assert right - left >= 0.5 * (x2 - x1)  # tight: the shape fills most of its box


def test_derived_task_shards_share_the_caption_clips(tmp_path, processor):
    """QA/MCQA reuse each clip's video, images show its object, text-only questions read its description;
    every derived sample goes through the loader's transforms."""
    import json

    import webdataset as wds

    from tarsier_train.data.records import canonical_sample, media_bytes
    from tarsier_train.data.sampling import FrameSampler
    from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
    from tarsier_train.toyworld import ToyWorldSpec, ensure_derived, toyworld_shards

    spec = ToyWorldSpec(num_train_clips=4, num_val_clips=1)

    def read(shards):
        return list(wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None))

    captions = read(toyworld_shards(tmp_path, spec)["train"])
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    derived = {kind: read(ensure_derived(tmp_path, spec, kind)) for kind in ("qa", "image", "text")}
    assert ensure_derived(tmp_path, spec, "qa") == ensure_derived(tmp_path, spec, "qa")  # cached
    for kind, samples in derived.items():
        assert [s["__key__"] for s in samples] == [c["__key__"] for c in captions]
        for caption, sample in zip(captions, samples):
            record, events = json.loads(sample["json"]), json.loads(caption["json"])["extra_info"]["events"]
            answer = record["messages"][1]["content"][0]["text"]
            if kind == "qa":
                assert sample["mp4"] == caption["mp4"]
                assert answer == f"It {events[0]['action']}." if record["task"] == "video/qa" else answer in "ABCD"
            elif kind == "image":
                assert answer == f"A {events[0]['colour']} {events[0]['shape']}."
            else:
                assert answer.endswith(f"it {events[-1]['action']}.")
            out = transform(s := canonical_sample(sample["__key__"], record), media_bytes(s, sample))
            assert processor.tokenizer.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == answer + "<|im_end|>"
    assert [json.loads(s["json"])["task"] for s in derived["qa"]] == ["video/qa", "video/mcqa"] * 2
    with pytest.raises(ValueError, match="allowed values are train, qa, image, text"):
        ensure_derived(tmp_path, spec, "ocr")
