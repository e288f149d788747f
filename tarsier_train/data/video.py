"""Media bytes <-> pixels. Video decoders sit behind one interface that reads only the frames a sampler
asks for, scaled down to a pixel budget as they are decoded, within a time limit, in memory proportional
to the frames kept: PyAV (pure pip, the default) decodes sequentially and converts only the wanted frames;
decord and torchcodec seek. An optional backend that is not installed fails with its install hint before
training, not mid-run. Images decode with Pillow."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import math
import time
from collections.abc import Callable, Iterator
from typing import Literal

import av
import numpy as np
from PIL import Image

from tarsier_train.data.record_check import RecordError

DEFAULT_FPS = 25.0  # for containers that state no frame rate


class VideoDecodeError(ValueError):
    """A video or image that cannot be decoded; loaders skip and count such samples."""


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 18) -> bytes:
    """uint8 (T, H, W, 3) RGB frames -> H.264 mp4 bytes (every frame a keyframe-friendly short GOP)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "g": "8", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


VideoBackendName = Literal["pyav", "decord", "torchcodec"]
# (number of frames, frames per second) -> frame indices to read
ChooseFrames = Callable[[int, float], list[int]]
_INSTALL_HINT = {"pyav": "av", "decord": "decord", "torchcodec": "torchcodec (needs FFmpeg shared libraries)"}


def check_backend(name: str) -> None:
    """Fail early, naming the package to install, when a backend cannot be used here."""
    if name not in _INSTALL_HINT:
        raise ValueError(f"data.video_backend={name!r}: allowed values are {', '.join(_INSTALL_HINT)}")
    module = "av" if name == "pyav" else name
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"data.video_backend={name!r} needs the {_INSTALL_HINT[name]} package: pip install {module}")


def read_frames(data: bytes, choose: ChooseFrames, backend: VideoBackendName = "pyav",
                timeout_s: float | None = None, max_pixels: int | None = None) -> tuple[np.ndarray, list[int], float]:
    """(uint8 (N, H, W, 3) RGB frames, their indices, the video's fps); VideoDecodeError on any failure.

    Memory holds the chosen frames and the decoder's few working ones, whatever the video's length or container.
    Frames over max_pixels pixels are scaled down as they are decoded (aspect kept, never up), so no
    full-resolution copy of them is kept. timeout_s bounds the wall time in any thread and for every
    backend: the deadline is checked between decoder calls, so decoding ends at most one call after it
    (opening the file, or decoding one frame: for decord and torchcodec, from its keyframe on)."""
    deadline = _Deadline(timeout_s)
    try:
        video = _OPENERS[backend](data, max_pixels, deadline)
        indices = _checked_indices(choose(video.num_frames, video.fps), video.num_frames)
        deadline.check()
        return _gathered(indices, video.frames(sorted(set(indices)), deadline)), indices, video.fps
    except (VideoDecodeError, RecordError):  # RecordError: the record's frame selection does not fit the video
        raise
    except Exception as error:  # noqa: BLE001 - decoders raise many types; all mean "this video is unusable"
        raise VideoDecodeError(f"{backend} cannot decode video ({len(data)} bytes): {error!r}") from error


def decode_pixel_budget(processor_max_pixels: int) -> int:
    """read_frames' max_pixels for frames that a processor resizes to at most processor_max_pixels: twice as
    many, so that it still scales them down itself and picks the patch grid it would from full resolution
    (given frames of exactly its budget, Qwen2-VL's resize rounds instead, and a third of sizes get another
    grid). Whole-pixel rounding of the pre-scaled size still moves the grid by one 28-px step for about 1%
    of sizes, those on a rounding boundary (bench/decode_memory.py --grid)."""
    return 2 * processor_max_pixels


class _Deadline:
    """Checked between decoder calls rather than signalled: SIGALRM reaches only the main thread, and a
    Python handler cannot interrupt a C decode anyway."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = time.monotonic() + seconds if seconds else math.inf

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise VideoDecodeError(f"decoding took longer than {self.seconds} s")


@dataclasses.dataclass(frozen=True)
class _Video:
    num_frames: int
    fps: float
    # (ascending distinct frame indices, deadline) -> those frames as uint8 (H, W, 3) RGB, in that order
    frames: Callable[[list[int], _Deadline], Iterator[np.ndarray]]


def _checked_indices(indices: list[int], num_frames: int) -> list[int]:
    if not indices or min(indices) < 0 or max(indices) >= num_frames:
        raise VideoDecodeError(f"frames {indices[:8]} requested from a video of {num_frames} frames")
    return indices


def _gathered(indices: list[int], frames: Iterator[np.ndarray]) -> np.ndarray:
    """The frames in the order (and with the repeats) of indices, written into one array as they come
    so that no second copy of them all is made."""
    positions: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        positions.setdefault(index, []).append(position)
    out = None
    for index, frame in zip(sorted(positions), frames, strict=True):
        if out is None:
            out = np.empty((len(indices), *frame.shape), np.uint8)
        out[positions[index]] = frame
    return out


def _scaled_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) of at most max_pixels pixels, aspect kept to a pixel; frames within it keep their size.
    Integer square root, so that rounding never takes the product over the budget."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scaled_height = max(1, math.isqrt(max_pixels * height // width))
    return max(1, min(width * scaled_height // height, max_pixels // scaled_height)), scaled_height


def _open_pyav(data: bytes, max_pixels: int | None, deadline: _Deadline) -> _Video:
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or DEFAULT_FPS
        # No count in the container (webm, mkv, fragmented mp4): decode them all once to count, converting
        # none; packet counts can differ from frames (e.g. VP8's hidden alt-ref frames).
        num_frames = stream.frames or sum(1 for _ in _pyav_decoded(container, deadline))
    return _Video(num_frames, fps, functools.partial(_pyav_frames, data, num_frames, max_pixels))


def _pyav_decoded(container: av.container.InputContainer, deadline: _Deadline) -> Iterator[av.VideoFrame]:
    for frame in container.decode(video=0):
        deadline.check()
        yield frame


def _pyav_frames(data: bytes, num_frames: int, max_pixels: int | None, wanted: list[int],
                 deadline: _Deadline) -> Iterator[np.ndarray]:
    """Decodes sequentially up to the last wanted frame; only wanted frames are converted (the costly step)."""
    pending = iter(wanted)
    target = next(pending)
    with av.open(io.BytesIO(data), mode="r") as container:
        for index, frame in enumerate(_pyav_decoded(container, deadline)):
            if index < target:
                continue
            yield _pyav_rgb(frame, max_pixels)
            target = next(pending, None)
            if target is None:
                return
    raise VideoDecodeError(f"video ends before frame {target} ({num_frames} frames expected)")


def _pyav_rgb(frame: av.VideoFrame, max_pixels: int | None) -> np.ndarray:
    width, height = _scaled_size(frame.width, frame.height, max_pixels)
    if (width, height) == (frame.width, frame.height):
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")


def _open_decord(data: bytes, max_pixels: int | None, deadline: _Deadline) -> _Video:
    import decord

    # Not decord's own width/height: at some sizes (48 or 72 px wide, ...) it returns 4 channels and fails
    # (dmlc/decord#93, #336), so frames are scaled after decoding, one at a time.
    reader = decord.VideoReader(io.BytesIO(data))
    deadline.check()
    return _Video(len(reader), float(reader.get_avg_fps()) or DEFAULT_FPS,
                  _one_call_per_frame(lambda index: _fitted(reader.get_batch([index]).asnumpy()[0], max_pixels)))


def _open_torchcodec(data: bytes, max_pixels: int | None, deadline: _Deadline) -> _Video:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, dimension_order="NHWC", transforms=_torchcodec_resize(data, max_pixels))
    deadline.check()
    return _Video(decoder.metadata.num_frames, float(decoder.metadata.average_fps or 0) or DEFAULT_FPS,
                  _one_call_per_frame(lambda index: _fitted(decoder.get_frame_at(index).data.numpy(), max_pixels)))


def _torchcodec_resize(data: bytes, max_pixels: int | None) -> list | None:
    """A decoder-side Resize for frames over max_pixels, sized from the header (whose width and height are
    those of the frames it returns, rotation applied)."""
    if not max_pixels:
        return None
    try:
        from torchcodec.transforms import Resize
    except ImportError:  # a torchcodec without decoder transforms: _fitted scales each frame after decoding
        return None
    from torchcodec.decoders import VideoDecoder

    header = VideoDecoder(data, seek_mode="approximate").metadata  # reads the header only, no scan
    if not header.width or not header.height:
        return None
    width, height = _scaled_size(header.width, header.height, max_pixels)
    return [Resize((height, width))] if (width, height) != (header.width, header.height) else None


def _fitted(frame: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """A uint8 (H, W, 3) frame within max_pixels (area-averaged like PyAV's); as it is when already within."""
    height, width = frame.shape[:2]
    size = _scaled_size(width, height, max_pixels)
    if size == (width, height):
        return frame
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BOX))


def _one_call_per_frame(decode: Callable[[int], np.ndarray]) -> Callable[[list[int], _Deadline], Iterator[np.ndarray]]:
    """Frames read one decoder call each, so that the deadline is checked between them (a batch call cannot
    be cut short). Ascending indices let the decoder run on within a keyframe interval instead of seeking."""
    def frames(wanted: list[int], deadline: _Deadline) -> Iterator[np.ndarray]:
        for index in wanted:
            frame = decode(index)
            deadline.check()
            yield frame
    return frames


_OPENERS: dict[str, Callable[[bytes, int | None, _Deadline], _Video]] = {
    "pyav": _open_pyav, "decord": _open_decord, "torchcodec": _open_torchcodec}


def decode_video(data: bytes) -> np.ndarray:
    """Every frame of a video, as uint8 (T, H, W, 3) RGB (PyAV)."""
    return read_frames(data, lambda num_frames, fps: list(range(num_frames)))[0]


def seconds_between(indices: list[int], fps: float) -> float:
    """Mean time between consecutive sampled frames (one frame's duration for a single frame)."""
    if len(indices) < 2:
        return 1.0 / fps
    return (max(indices) - min(indices)) / (len(indices) - 1) / fps


def decode_image(data: bytes) -> np.ndarray:
    """An image (jpg, png, or a gif's first frame) as uint8 (H, W, 3) RGB; VideoDecodeError when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))  # a writable copy: torch refuses read-only arrays
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise VideoDecodeError(f"unreadable image: {error}") from error
