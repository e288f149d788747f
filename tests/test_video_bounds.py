"""Video decoding in bounded memory and time whatever the file: containers without a frame count, frames
scaled down by the decoder, explicit frame lists capped, and a timeout that works in any thread and backend."""

import dataclasses
import functools
import io
import threading
import types

import av
import numpy as np
import pytest

from tarsier_train.data import video
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.tasks import Visual
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.data.video import VideoDecodeError, decode_pixel_budget, encode_mp4, read_frames

NUM_FRAMES, HEIGHT, WIDTH = 24, 48, 64
STEP = 10  # frame i is grey 10 * i, so a decoded frame tells which one it is


def _remuxed(data: bytes, container_format: str, options: dict[str, str] | None = None) -> bytes:
    """The same H.264 packets in another container: decoded pixels must be identical."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(out, "w", format=container_format,
                                                      options=options or {}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.dts is not None:  # the flush packet
                packet.stream = stream
                target.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module")
def mp4() -> bytes:
    frames = np.zeros((NUM_FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    frames[..., 1] = np.arange(WIDTH, dtype=np.uint8)  # some texture, so that scaling has something to average
    for index in range(NUM_FRAMES):
        frames[index, ..., 0] = STEP * index
    return encode_mp4(frames)


@pytest.fixture(scope="module", params=["matroska", "fragmented mp4"])
def uncounted(request, mp4) -> bytes:
    options = {"movflags": "frag_keyframe+empty_moov"} if request.param == "fragmented mp4" else None
    data = _remuxed(mp4, "matroska" if request.param == "matroska" else "mp4", options)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0  # the case under test: no count in the container
    return data


def _usable(backend: str) -> bool:
    """Installed and able to decode here (torchcodec imports without FFmpeg's libraries, then fails)."""
    try:
        read_frames(encode_mp4(np.zeros((2, 32, 32, 3), np.uint8)), lambda n, fps: [0], backend)
    except (ImportError, VideoDecodeError):
        return False
    return True


BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(not _usable(name), reason=f"{name} cannot decode here"))
            for name in ("pyav", "decord", "torchcodec")]


def _shown(frames: np.ndarray) -> list[int]:
    return [round(float(frame[..., 0].mean()) / STEP) for frame in frames]


@pytest.mark.parametrize("backend", BACKENDS)
def test_containers_without_a_frame_count_give_the_frames_of_the_counted_one(backend, mp4, uncounted):
    counts = []

    def choose(num_frames, fps):
        counts.append(num_frames)
        return [num_frames - 1, 0, 5, 5, 17]  # any order, repeats kept

    counted_frames, indices, fps = read_frames(mp4, choose, backend)
    frames, same_indices, same_fps = read_frames(uncounted, choose, backend)
    assert counts == [NUM_FRAMES, NUM_FRAMES] and indices == same_indices == [23, 0, 5, 5, 17]
    assert fps == same_fps == 8.0
    assert np.array_equal(frames, counted_frames)  # the same packets decode to the same pixels
    assert _shown(frames) == indices


def test_only_the_chosen_frames_are_converted(monkeypatch, mp4, uncounted):
    converted = []

    def counting(frame, max_pixels):
        converted.append(frame.pts)
        return original(frame, max_pixels)

    original = video._pyav_rgb
    monkeypatch.setattr(video, "_pyav_rgb", counting)
    for data in (mp4, uncounted):
        converted.clear()
        frames = read_frames(data, lambda n, fps: [20, 3, 3, 11])[0]
        assert len(converted) == 3 and _shown(frames) == [20, 3, 3, 11]  # 3 distinct frames, each converted once


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_over_max_pixels_are_scaled_down_keeping_their_aspect(backend, mp4, uncounted):
    for data in (mp4, uncounted):
        frames, _, _ = read_frames(data, lambda n, fps: [0, 12, 23], backend, max_pixels=800)
        _, height, width, _ = frames.shape
        assert height * width <= 800 and (width, height) == (32, 24)  # 64 x 48 -> 4:3 kept, 768 px
        assert _shown(frames) == [0, 12, 23]
        unscaled, _, _ = read_frames(data, lambda n, fps: [0, 12, 23], backend, max_pixels=WIDTH * HEIGHT)
        assert unscaled.shape[1:3] == (HEIGHT, WIDTH)  # within the budget: as decoded, never scaled up


@pytest.mark.parametrize(("width", "height", "budget", "expected"), [
    (3840, 2160, 460_800, (904, 509)), (1080, 1920, 460_800, (509, 905)), (64, 48, 10**6, (64, 48)),
    (5000, 2, 100, (100, 1))])
def test_scaled_sizes_stay_within_the_budget_with_their_aspect(width, height, budget, expected):
    scaled_width, scaled_height = video._scaled_size(width, height, budget)
    assert (scaled_width, scaled_height) == expected and scaled_width * scaled_height <= budget


def test_the_transform_decodes_within_twice_its_frame_budget_and_keeps_the_processors_grid(processor):
    clip = encode_mp4(np.random.default_rng(0).integers(0, 255, (4, 240, 320, 3), dtype=np.uint8))
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": "v.mp4"}},
                                                        {"type": "text", "text": "What happens?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}]}
    transform = VideoTextTransform(processor, FrameSampler(num_frames=2), max_pixels=112 * 112)
    task_input = transform.prepare(canonical_sample("v", record), [clip])
    _, height, width, _ = task_input.frames.shape
    assert height * width <= decode_pixel_budget(112 * 112) < 320 * 240 and abs(width / height - 4 / 3) < 0.01
    full = Visual("video", read_frames(clip, lambda n, fps: [0, n - 1])[0], task_input.visuals[0].seconds_per_frame)
    unscaled = dataclasses.replace(task_input, visuals=(full,))
    grids = [transform.training_inputs(t)["video_grid_thw"].tolist() for t in (task_input, unscaled)]
    assert grids[0] == grids[1] == [[2, 6, 8]]  # 84 x 112 px either way


def test_torchcodec_without_decoder_transforms_scales_after_decoding(monkeypatch, mp4):
    if not _usable("torchcodec"):
        pytest.skip("torchcodec cannot decode here")
    monkeypatch.setattr(video, "_torchcodec_resize", lambda data, max_pixels: None)  # as torchcodec < 0.9
    frames, _, _ = read_frames(mp4, lambda n, fps: [7], "torchcodec", max_pixels=800)
    assert frames.shape == (1, 24, 32, 3) and _shown(frames) == [7]


def test_explicit_frame_lists_are_capped_uniformly_in_their_order():
    sampler = FrameSampler("uniform", num_frames=4, max_n_frames=5)
    listed = [90, 1, 2, 3, 4, 5, 6, 7, 8, 50]
    assert sampler.indices({"frame_indices": listed}, 100, 25.0, rng=None) == [90, 2, 4, 7, 50]
    assert sampler.indices({"frame_indices": listed[:5]}, 100, 25.0, rng=None) == listed[:5]  # within: as given
    times = [t / 25 for t in range(0, 100, 10)]
    assert sampler.indices({"time_indices": times}, 100, 25.0, rng=None) == [0, 20, 40, 70, 90]


def _first_and_last(num_frames, fps):
    return [0, num_frames - 1]


def _raised_in_thread(call) -> BaseException | None:
    caught = []

    def run():
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            caught.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return caught[0] if caught else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_timeout_fires_off_the_main_thread(backend, mp4, uncounted):
    for data in (mp4, uncounted):
        read = functools.partial(read_frames, data, _first_and_last, backend)
        error = _raised_in_thread(functools.partial(read, timeout_s=1e-6))
        assert isinstance(error, VideoDecodeError) and "longer than 1e-06 s" in str(error)
        assert _raised_in_thread(functools.partial(read, timeout_s=30)) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_deadline_is_checked_between_frames(monkeypatch, backend, mp4):
    """A clock that ticks once per look: a deadline of 12 ticks ends a 24-frame decode part way, so no
    backend decodes the frames in one uninterruptible call."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(video, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))
    converted = []
    monkeypatch.setattr(video, "_gathered", lambda indices, frames: converted.extend(frames))
    with pytest.raises(VideoDecodeError, match="longer than 12 s"):
        read_frames(mp4, lambda n, fps: list(range(n)), backend, timeout_s=12)
    assert 0 < len(converted) < NUM_FRAMES
