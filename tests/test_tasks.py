import numpy as np
import pytest

from tarsier_train.data.record_check import RecordError, check_record
from tarsier_train.data.records import VideoTextSample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.tasks import DEFAULT_PROMPTS, Visual, render_task
from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.toyworld import generate_clip, render_frames

EVENTS = [{"start": 0, "end": 6, "text": "The red circle moves left."},
          {"start": 7, "end": 15, "text": "The red circle grows."}]


def _sample(task, prompt="", target="", events=EVENTS):
    record = {"task": task, "extra_info": {"events": events}}
    return VideoTextSample("k1", prompt, target, ({"type": "video", "video": {"video_file": "k1.mp4"}},), record)


def _frames(n):
    """A video of n 2x2 frames whose pixel values are their time indices."""
    return (Visual("video", np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), dtype=np.uint8)),)


def test_records_with_their_own_text_are_used_as_written():
    out = render_task(_sample("video/qa", "What moves?", "The circle."), _frames(4), [0, 5, 10, 15], None)
    assert (out.prompt, out.target) == ("What moves?", "The circle.")
    assert render_task(_sample("video/caption"), _frames(4), [0, 5, 10, 15], None).prompt == DEFAULT_PROMPTS["video/caption"]


def test_grounding_tags_events_with_the_sampled_frame_positions():
    out = render_task(_sample("video/grounding"), _frames(4), [0, 5, 10, 15], None)
    assert out.target == "<frame: 1-2> The red circle moves left. <frame: 3-4> The red circle grows."
    out = render_task(_sample("video/grounding"), _frames(2), [8, 12], None)
    assert out.target == "<frame: 1-2> The red circle grows."  # the first event is not in the sampled frames
    with pytest.raises(ValueError, match="no event inside the sampled frames"):
        render_task(_sample("video/grounding", events=[{"start": 1, "end": 2, "text": "x"}]), _frames(2), [8, 12], None)


@pytest.mark.parametrize("num_frames", [8, 16, 24])
def test_frame_order_answer_restores_time_order(num_frames):
    frames = _frames(num_frames)
    out = render_task(_sample("video/frame_order"), frames, list(range(num_frames)), np.random.default_rng(num_frames))
    num_given = 3 * num_frames // 8
    given = [int(p) for p in out.prompt.split(" are frames ")[1].split(".")[0].split(", ")]
    answer = [int(p) for p in out.target.split(", ")]
    assert len(given) == num_given and len(answer) == num_frames - num_given
    shown = out.frames[:, 0, 0, 0]  # each frame's original time index
    assert [int(shown[p - 1]) for p in given + answer] == list(range(num_frames))
    assert not np.array_equal(shown, np.arange(num_frames))  # really shuffled
    evaluations = [render_task(_sample("video/frame_order"), frames, list(range(num_frames)), None) for _ in range(2)]
    assert evaluations[0].prompt == evaluations[1].prompt and evaluations[0].target == evaluations[1].target


def test_frame_order_through_the_transform_labels_the_answer(processor):
    video = encode_mp4(render_frames(generate_clip(np.random.default_rng(0))))
    transform = VideoTextTransform(processor, FrameSampler(num_frames=8))
    task_input = transform.prepare(_sample("video/frame_order"), [video], np.random.default_rng(1))
    out = transform.training_inputs(task_input)
    labelled = out["labels"][out["labels"] != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == task_input.target + "<|im_end|>"
    assert out["video_grid_thw"][0, 0] == 8  # 8 shuffled frames, each its own temporal step


def _tracking_sample(boxes, prompt=""):
    record = {"task": "video/tracking", "extra_info": {"tracking": {"object": "the red circle", "boxes": boxes}}}
    return VideoTextSample("k1", prompt, "", ({"type": "video", "video": {"video_file": "k1.mp4"}},), record)


def test_tracking_gives_the_first_box_and_asks_for_the_later_ones_interpolated():
    boxes = {"0": [0.0, 0.0, 0.2, 0.2], "10": [0.5, 0.0, 0.7, 0.2]}  # json keys are strings
    out = render_task(_tracking_sample(boxes), _frames(4), [0, 4, 10, 14], None)
    assert out.prompt == "The red circle is at [0.00, 0.00, 0.20, 0.20] in frame 1. Give its box in each later frame."
    assert out.target == "frame 2: [0.20, 0.00, 0.40, 0.20]; frame 3: [0.50, 0.00, 0.70, 0.20]"  # frame 14: unannotated
    late = render_task(_tracking_sample({5: [0.1, 0.1, 0.3, 0.3], 15: [0.3, 0.1, 0.5, 0.3]}), _frames(3), [0, 10, 15], None)
    assert "in frame 2." in late.prompt and late.target == "frame 3: [0.30, 0.10, 0.50, 0.30]"
    with pytest.raises(ValueError, match="at least two sampled frames"):
        render_task(_tracking_sample(boxes), _frames(2), [12, 14], None)
    # a record without boxes never reaches the template: the record check (the shard writer's too) refuses it
    messages = [{"role": "user", "content": [{"type": "video", "video": {"video_file": "k1.mp4"}}]},
                {"role": "assistant", "content": ""}]
    for boxes in ({}, {"0": [0.0, 0.0, 0.2, 0.2]}, {"0": [0.0, 0.2], "5": [0.0, 0.0, 0.2, 0.2]}):
        with pytest.raises(RecordError, match="bad_tracking: tracking needs extra_info.tracking.boxes"):
            check_record({"messages": messages, **_tracking_sample(boxes).record})


def test_video_tasks_refuse_samples_without_exactly_one_video():
    images = (Visual("image", np.zeros((4, 4, 3), np.uint8)),)
    with pytest.raises(ValueError, match="needs one video, got 0"):
        render_task(_sample("video/frame_order"), images, [], None)
    assert render_task(_sample("image/qa", "What is it?", "A square."), images, [], None).target == "A square."
    assert render_task(_sample("image/caption"), images, [], None).prompt == DEFAULT_PROMPTS["image/caption"]


def test_a_retasked_record_is_asked_the_new_task_s_question():
    from tarsier_train.data.records import canonical_sample

    record = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": {"video_file": "k.mp4"}},
                                     {"type": "text", "text": "Describe the video in detail."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The red circle moves left."}]}],
        "task": "video/caption", "extra_info": {"events": EVENTS}}
    grounded = render_task(canonical_sample("k", record, "video/grounding"), _frames(4), [0, 5, 10, 15], None)
    assert grounded.prompt == DEFAULT_PROMPTS["video/grounding"]
    written = render_task(canonical_sample("k", {**record, "task": "video/grounding"}), _frames(4), [0, 5, 10, 15], None)
    assert written.prompt == "Describe the video in detail."  # a grounding record's own question stays
    assert canonical_sample("k", record, "video/caption").retasked is False
