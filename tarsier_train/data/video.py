"""Video bytes <-> frames (PyAV)."""

from __future__ import annotations

import io

import av
import numpy as np


DEFAULT_FPS = 25.0  # for containers that state no frame rate


class VideoDecodeError(ValueError):
    """A video that cannot be decoded; loaders skip and count such samples."""


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


def decode_video(data: bytes) -> np.ndarray:
    """All frames of a video held in memory, as uint8 (T, H, W, 3) RGB."""
    return decode_video_and_fps(data)[0]


def decode_video_and_fps(data: bytes) -> tuple[np.ndarray, float]:
    """(frames as uint8 (T, H, W, 3) RGB, average frame rate) of a video held in memory."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or DEFAULT_FPS
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise VideoDecodeError(f"cannot decode video ({len(data)} bytes): {error}") from error
    if not frames:
        raise VideoDecodeError(f"video ({len(data)} bytes) has no decodable frames")
    return np.stack(frames), fps
