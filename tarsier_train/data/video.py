"""Media bytes <-> pixels. Video decoders sit behind one interface that reads only the frames a sampler
asks for, within a time limit: PyAV (pure pip, the default) decodes sequentially and converts only the
wanted frames; decord and torchcodec seek. An optional backend that is not installed fails with its
install hint before training, not mid-run. Images decode with Pillow."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import av
import numpy as np
from PIL import Image

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
                timeout_s: float | None = None) -> tuple[np.ndarray, list[int], float]:
    """(uint8 (N, H, W, 3) RGB frames, their indices, the video's fps); VideoDecodeError on any failure."""
    reader = {"pyav": _read_pyav, "decord": _read_decord, "torchcodec": _read_torchcodec}[backend]
    try:
        with _time_limit(timeout_s):
            return reader(data, choose)
    except VideoDecodeError:
        raise
    except _DecodeTimeout as error:
        raise VideoDecodeError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - decoders raise many types; all mean "this video is unusable"
        raise VideoDecodeError(f"{backend} cannot decode video ({len(data)} bytes): {error!r}") from error


class _DecodeTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """SIGALRM-based limit; loader workers decode in their main thread, where signals are delivered."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise _DecodeTimeout(f"decoding took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _checked_indices(indices: list[int], num_frames: int) -> list[int]:
    if not indices or min(indices) < 0 or max(indices) >= num_frames:
        raise VideoDecodeError(f"frames {indices[:8]} requested from a video of {num_frames} frames")
    return indices


def _read_pyav(data: bytes, choose: ChooseFrames) -> tuple[np.ndarray, list[int], float]:
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or DEFAULT_FPS
        if not stream.frames:  # the container does not say how many frames: decode them all first
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            indices = _checked_indices(choose(len(frames), fps), len(frames))
            return np.stack([frames[i] for i in indices]), indices, fps
        indices = _checked_indices(choose(stream.frames, fps), stream.frames)
        wanted, decoded = set(indices), {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                decoded[index] = frame.to_ndarray(format="rgb24")  # the costly step: only for wanted frames
            if len(decoded) == len(wanted):
                break
    missing = sorted(wanted - decoded.keys())
    if missing:
        raise VideoDecodeError(f"video ends before frame {missing[0]} (header says {stream.frames} frames)")
    return np.stack([decoded[i] for i in indices]), indices, fps


def _read_decord(data: bytes, choose: ChooseFrames) -> tuple[np.ndarray, list[int], float]:
    import decord

    reader = decord.VideoReader(io.BytesIO(data))
    fps = float(reader.get_avg_fps()) or DEFAULT_FPS
    indices = _checked_indices(choose(len(reader), fps), len(reader))
    return reader.get_batch(indices).asnumpy(), indices, fps


def _read_torchcodec(data: bytes, choose: ChooseFrames) -> tuple[np.ndarray, list[int], float]:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data)
    fps = float(decoder.metadata.average_fps or 0) or DEFAULT_FPS
    indices = _checked_indices(choose(decoder.metadata.num_frames, fps), decoder.metadata.num_frames)
    frames = decoder.get_frames_at(indices).data  # (N, C, H, W) uint8
    return frames.permute(0, 2, 3, 1).numpy(), indices, fps


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
