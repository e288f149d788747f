import numpy as np
import pytest

from tarsier_train.data.sampling import (
    FrameSampler,
    FrameWindow,
    fps_frame_indices,
    record_frame_window,
    segment_frame_indices,
    uniform_frame_indices,
)


def test_uniform_is_tarsier_v1():
    assert uniform_frame_indices(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert uniform_frame_indices(100, 2) == [0, 99]
    with pytest.raises(ValueError):
        uniform_frame_indices(0, 4)


def test_segment_eval_takes_middle_frames():
    assert segment_frame_indices(16, 4, rng=None) == [1, 5, 9, 13]
    assert segment_frame_indices(3, 3, rng=None) == [0, 1, 2]


def test_segment_train_takes_one_random_frame_per_segment():
    rng = np.random.default_rng(0)
    draws = np.array([segment_frame_indices(40, 4, rng) for _ in range(500)])
    for k in range(4):
        assert draws[:, k].min() == 10 * k and draws[:, k].max() == 10 * k + 9  # covers its segment exactly
    assert (np.diff(draws, axis=1) > 0).all()
    # fewer frames than segments: every segment still gets a valid frame
    assert all(0 <= i < 3 for i in segment_frame_indices(3, 8, rng))


def test_fps_sampling_respects_rate_and_caps():
    assert len(fps_frame_indices(300, video_fps=30, target_fps=2, max_n_frames=64)) == 20  # 10 s at 2 fps
    assert len(fps_frame_indices(3000, video_fps=30, target_fps=2, max_n_frames=64)) == 64
    assert len(fps_frame_indices(10, video_fps=30, target_fps=1, max_n_frames=64, min_n_frames=4)) == 4


@pytest.mark.parametrize("item, expected", [
    ({}, FrameWindow(0, 100)),
    ({"start_frame": 10, "end_frame": 19}, FrameWindow(10, 20)),
    ({"start_time": 1.0, "end_time": 2.0}, FrameWindow(25, 50)),
    ({"frame_indices": [3, 1, 4]}, FrameWindow(0, 100, (3, 1, 4))),
    ({"time_indices": [0.0, 1.0, 3.99]}, FrameWindow(0, 100, (0, 25, 99))),
])
def test_record_windows(item, expected):
    assert record_frame_window(item, num_total=100, video_fps=25.0) == expected


def test_bad_record_windows_are_clear_errors():
    with pytest.raises(ValueError, match="outside a video of 100 frames"):
        record_frame_window({"frame_indices": [5, 100]}, 100, 25.0)
    with pytest.raises(ValueError, match="selects no frames"):
        record_frame_window({"start_frame": 50, "end_frame": 10}, 100, 25.0)


def test_frame_sampler_follows_the_record_window_and_mode():
    uniform = FrameSampler("uniform", num_frames=4)
    assert uniform.indices({"start_frame": 10, "end_frame": 19}, 100, 25.0, rng=None) == [10, 13, 16, 19]
    assert uniform.indices({"frame_indices": [7, 3]}, 100, 25.0, rng=None) == [7, 3]  # explicit: as given
    segment = FrameSampler("segment", num_frames=4)
    assert segment.indices({}, 40, 25.0, rng=None) == [4, 14, 24, 34]
    draws = {tuple(segment.indices({}, 40, 25.0, np.random.default_rng(i))) for i in range(20)}
    assert len(draws) > 10
    fps = FrameSampler("fps", target_fps=1.0, max_n_frames=64)
    assert len(fps.indices({"start_time": 2.0, "end_time": 6.0}, 250, 25.0, rng=None)) == 4


def test_frame_count_lists_draw_in_training_and_take_the_largest_in_eval():
    sampler = FrameSampler("uniform", num_frames=(4, 8, 16))
    counts = {len(sampler.indices({}, 64, 25.0, np.random.default_rng(i))) for i in range(30)}
    assert counts == {4, 8, 16}
    assert len(sampler.indices({}, 64, 25.0, rng=None)) == 16
    with pytest.raises(ValueError, match="allowed values are uniform, segment, fps"):
        FrameSampler("random")
