"""Video bytes <-> frames (PyAV)."""

from __future__ import annotations

import io

import av
import numpy as np


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
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise VideoDecodeError(f"cannot decode video ({len(data)} bytes): {error}") from error
    if not frames:
        raise VideoDecodeError(f"video ({len(data)} bytes) has no decodable frames")
    return np.stack(frames)
